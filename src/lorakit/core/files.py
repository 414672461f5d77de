"""Output: atomic file and directory writes (a killed process never leaves a half-written output
behind) and the rank-aware console line."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def world_size() -> int:
    """Processes of this run: torchrun and accelerate launch set WORLD_SIZE; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    """Rank 0 of a multi-process run (RANK), or a single process: a RANK left by a cluster
    without WORLD_SIZE > 1 silences nothing."""
    return world_size() <= 1 or int(os.environ.get("RANK", "0") or 0) == 0


def say(*args: Any, **kwargs: Any) -> None:
    """print() on the main process only, flushed: one log for a distributed run."""
    if is_main_process():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def staging_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success rename it to `final`.

    If `final` appeared meanwhile (another process finished first), ours is discarded. On any
    error the temporary directory is removed, so `final` either exists complete or not at all.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def staged_files(target: str | Path, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory inside `target`; on success move its files into `target`.

    For outputs that land in a directory the user already has (output_dir): each file is moved
    by an atomic rename, so it is either the old one or the complete new one, and the files a
    loader looks for first (e.g. adapter_config.json) are moved last. On error nothing is moved.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=target))
    try:
        yield tmp
        names = sorted(p.name for p in tmp.iterdir())
        for name in [n for n in names if n not in last] + [n for n in last if n in names]:
            src, dst = tmp / name, target / name
            if src.is_dir() and dst.is_dir():
                shutil.rmtree(dst)
            os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Progress:
    """One progress line for long data passes: rows, rows/s and an ETA from the bytes read.
    Drawn only after the first 2 s (short passes print nothing), at most once a second on a
    terminal (rewritten in place) and every 15 s otherwise (a log file gets a few lines)."""

    def __init__(self, total_bytes: int, what: str = "encoding"):
        import sys
        import time

        self.total, self.what, self.clock = max(total_bytes, 1), what, time.monotonic
        self.stream = sys.stderr
        self.tty = self.stream.isatty()
        self.started = self.last = self.clock()
        self.bytes = self.rows = 0
        self.drawn = False

    def advance(self, nbytes: int) -> None:
        self.bytes += nbytes

    def add_rows(self, n: int) -> None:
        self.rows += n
        now = self.clock()
        if now - self.started >= 2 and now - self.last >= (1 if self.tty else 15):
            self.last = now
            self._draw(now)

    def _draw(self, now: float, end: str = "") -> None:
        if not is_main_process():
            return
        elapsed = now - self.started
        done = min(self.bytes / self.total, 1.0)
        eta = elapsed * (1 - done) / done if done > 0 else 0.0
        line = f"lorakit: {self.what}: {self.rows:,} rows, {self.rows / max(elapsed, 1e-9):,.0f} rows/s, {done:.0%}"
        line += f", ETA {eta:.0f} s" if done < 1 else f", {elapsed:.0f} s"
        self.stream.write(("\r" + line + end) if self.tty else line + "\n")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.bytes = self.total
            self._draw(self.clock(), "\n" if self.tty else "")
