"""Reading rows: JSONL and JSON files, directories, globs and Hugging Face datasets, each row with
where it came from (file:line) for one-line errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from ..core.errors import LorakitError


def demo_path(split: str) -> Path:
    """The bundled demo dataset (`train` or `test`)."""
    return Path(str(resources.files("lorakit") / "assets" / f"demo_{split}.jsonl"))


# --------------------------------------------------------------------------------------------
# Reading rows: files, directories, globs and HF datasets


def resolve_sources(spec: str) -> list[Path] | str:
    """The files a --dataset value names, or the spec itself when it is a HF datasets id."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json") and p.is_file())
        if files:
            return files
        if (
            any(p.suffix in (".parquet", ".csv", ".arrow") for p in path.rglob("*"))
            or (path / "dataset_info.json").exists()
        ):
            return str(path)  # a datasets folder (parquet/csv/arrow): loaded through `datasets`
        raise LorakitError(f"dataset directory {path} has no .jsonl/.json (or parquet/csv) files")
    if any(c in spec for c in "*?["):
        files = (
            sorted(p for p in Path().glob(spec) if p.is_file())
            if not path.is_absolute()
            else sorted(p for p in Path(path.anchor).glob(str(path.relative_to(path.anchor))) if p.is_file())
        )
        if not files:
            raise LorakitError(f"dataset glob {spec} matches no files")
        return files
    if path.suffix in (".jsonl", ".json") or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise LorakitError(f"dataset file not found: {path} (check --dataset)")
    return spec


def iter_jsonl(path: str | Path, keep_errors: bool = False, progress=None) -> Iterator[tuple[str, Any]]:
    """Rows of a JSONL (or JSON array) file as ("file:line", object), read a line at a time
    (bounded memory at any file size); problems name file:line.

    With keep_errors, a line that is not a JSON object becomes ("file:line", LorakitError) so
    that --skip_bad_rows can list it; otherwise it raises. `progress` (io.Progress) is told the
    bytes read.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise LorakitError(f"dataset file not found: {path} (check --dataset)")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        if path.suffix == ".json" and head.startswith(b"["):
            yield from _read_json_array(path, _utf8(path, path.read_bytes(), 0))
            return
        f.seek(0)
        any_row = False
        for n, raw in enumerate(f, start=1):
            if progress is not None:
                progress.advance(len(raw))
            line = _utf8(path, raw, n)
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                obj = LorakitError(
                    f"{where}: invalid JSON at column {e.colno} ({e.msg}); one JSON object per line"
                )
            if not isinstance(obj, (dict, LorakitError)):
                obj = LorakitError(f"{where}: a row must be a JSON object, got {type(obj).__name__}")
            if isinstance(obj, LorakitError) and not keep_errors:
                raise obj
            any_row = True
            yield where, obj
    if not any_row:
        raise LorakitError(f"{path}: no rows (expected one JSON object per line)")


def _utf8(path: Path, raw: bytes, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line or raw[: e.start].count(b"\n") + 1
        raise LorakitError(
            f"{path}:{line}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8"
        ) from None


def read_jsonl(path: str | Path, keep_errors: bool = False) -> list[tuple[str, Any]]:
    """iter_jsonl as a list."""
    return list(iter_jsonl(path, keep_errors))


def _read_json_array(path: Path, text: str) -> list[tuple[str, dict]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise LorakitError(f"{path}:{e.lineno}: invalid JSON at column {e.colno} ({e.msg})") from None
    rows = []
    for k, obj in enumerate(items):
        if not isinstance(obj, dict):
            raise LorakitError(f"{path}[{k}]: a row must be a JSON object, got {type(obj).__name__}")
        rows.append((f"{path}[{k}]", obj))
    if not rows:
        raise LorakitError(f"{path}: empty JSON array")
    return rows


def _read_hf(spec: str) -> list[tuple[str, dict]]:
    """A HF datasets id or path, loaded through `datasets` (train split)."""
    try:
        import datasets
    except ImportError:
        raise LorakitError(f"--dataset {spec}: not a file; install `datasets` to load hub datasets") from None
    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # datasets raises many types (offline, missing, bad split)
        raise LorakitError(
            f"--dataset {spec}: not a local file and `datasets` cannot load it ({str(e).splitlines()[0][:200]})"
        ) from None
    return [(f"{name}[{split or 'train'}]:{k}", dict(row)) for k, row in enumerate(ds)]


def iter_rows(spec: str, keep_errors: bool = False, progress=None) -> Iterator[tuple[str, Any]]:
    """The rows a --dataset value names, one at a time."""
    sources = resolve_sources(spec)
    if isinstance(sources, str):
        yield from _read_hf(sources)
        return
    for f in sources:
        yield from iter_jsonl(f, keep_errors, progress)


def load_rows(spec: str, keep_errors: bool = False) -> list[tuple[str, Any]]:
    return list(iter_rows(spec, keep_errors))
