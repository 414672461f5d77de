"""The encoded-dataset cache: a dataset is tokenized and masked once, then reused by train, resume,
sweep trials, plan, eval and `data check`.

An entry is keyed by everything that determines the encoding: the content (SHA-256) of every data
file, the tokenizer (its whole serialized definition), the chat template and special tokens, the
system prompt, the format, the length policy, the train_on setting, bad-row skipping and the
validation split. A changed input is a new key, never a stale hit. Each split is stored as flat
int32 arrays of ids and labels plus row offsets (`.npy`), memory-mapped when read, so a run holds
in memory only the rows of the batch it is on. Entries are written to a temporary directory and
renamed: a killed process never leaves a half-written entry. Written by hand because `datasets`'
own fingerprinting keys on the Python function, not on these inputs, and its Arrow rows come back
as Python lists only after a copy of the whole column.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .io import atomic_write_json, staging_dir

CACHE_VERSION = 2  # 2: rows built from the inference prompt (data.ChatFormat)


def cache_dir() -> Path:
    from .models import lorakit_home

    return lorakit_home() / "data"


def _source_identity(sources: list[Path] | str) -> list[str]:
    """Path and content hash of each data file (a datasets id stands for itself)."""
    if isinstance(sources, str):
        return [f"datasets:{sources}"]
    # Hashed every time, not remembered by size and mtime: a file rewritten within the
    # filesystem's timestamp granularity would otherwise give a stale hit (~1.5 GB/s here).
    digests = []
    for f in sources:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        digests.append(f"{f}:{h.hexdigest()}")  # rows name their file:line, so the path counts too
    return digests


def cache_key(cfg: Any, chat: Any, max_seq_length: int, train_on: str, data_files, val_files) -> str:
    """The key of an encoding: every input that changes its result, and nothing else.
    `data_files` / `val_files`: what the dataset values resolve to (files, or a datasets id)."""
    tok = chat.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    parts = {
        "version": CACHE_VERSION,
        "data": _source_identity(data_files),
        "val_data": _source_identity(val_files) if val_files else [],
        "tokenizer": hashlib.sha256(backend.to_str().encode()).hexdigest() if backend else type(tok).__name__,
        "vocab": hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest(),
        "chat_template": tok.chat_template,
        "template_variables": getattr(chat, "variables", {}),  # e.g. today's date, for Llama 3.2
        "special": [sorted(chat.special_ids), chat.prefix_ids, tok.eos_token_id, chat.end_of_turn_id],
        "system_prompt": cfg.system_prompt or "",
        "dataset_format": cfg.dataset_format,
        "max_seq_length": max_seq_length,
        "overlength": cfg.overlength,
        "train_on": train_on,
        "skip_bad_rows": cfg.skip_bad_rows,
        "split": [cfg.val_size, cfg.seed] if not cfg.val_dataset else [],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class EncodedRows(Sequence):
    """Encoded rows ({"input_ids", "labels", "source"} dicts) read from memory-mapped arrays."""

    def __init__(self, folder: Path, split: str):
        import numpy as np

        # Plain ndarray views of the maps: slicing a np.memmap object costs ~5x more per row.
        self.ids = np.asarray(np.load(folder / f"{split}_ids.npy", mmap_mode="r"))
        self.labels = np.asarray(np.load(folder / f"{split}_labels.npy", mmap_mode="r"))
        self.offsets = np.load(folder / f"{split}_offsets.npy")
        self.sources = json.loads((folder / f"{split}_sources.json").read_text(encoding="utf-8"))

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        return {
            "input_ids": self.ids[a:b].tolist(),
            "labels": self.labels[a:b].tolist(),
            "source": self.sources[index],
        }

    def lengths(self) -> list[int]:
        import numpy as np

        return np.diff(self.offsets).tolist()

    def supervised(self, limit: int | None = None) -> list[int]:
        """Supervised tokens of each row (among its first `limit` tokens), without reading rows."""
        import numpy as np

        starts = self.offsets[:-1]
        ends = self.offsets[1:] if limit is None else np.minimum(self.offsets[1:], starts + limit)
        marked = np.concatenate([[0], np.cumsum(self.labels != -100)])
        return (marked[ends] - marked[starts]).tolist()


def _write_split(folder: Path, split: str, rows: Sequence[dict]) -> None:
    import numpy as np

    lengths = [len(r["input_ids"]) for r in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    empty = np.zeros(0, dtype=np.int32)
    ids = np.concatenate([np.asarray(r["input_ids"], dtype=np.int32) for r in rows] or [empty])
    labels = np.concatenate([np.asarray(r["labels"], dtype=np.int32) for r in rows] or [empty])
    np.save(folder / f"{split}_ids.npy", ids)
    np.save(folder / f"{split}_labels.npy", labels)
    np.save(folder / f"{split}_offsets.npy", offsets)
    (folder / f"{split}_sources.json").write_text(json.dumps([r["source"] for r in rows]), encoding="utf-8")


def store(
    key: str, train: Sequence[dict], val: Sequence[dict], report: Any, digest: str, dataset: str
) -> Path:
    """Write an entry (atomically); returns its folder."""
    final = cache_dir() / key[:32]
    if (final / "meta.json").is_file():
        return final
    with staging_dir(final) as tmp:
        _write_split(tmp, "train", train)
        _write_split(tmp, "val", val)
        atomic_write_json(tmp / "report.json", dataclasses.asdict(report))
        meta = {"key": key, "dataset": dataset, "train_rows": len(train), "val_rows": len(val)}
        meta |= {"digest": digest, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(tmp / "meta.json", meta)  # written last: an entry without it is not one
    return final


def load(key: str) -> tuple[EncodedRows, EncodedRows, dict, str] | None:
    """(train rows, validation rows, report fields, digest) of a cached encoding, or None."""
    folder = cache_dir() / key[:32]
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        return EncodedRows(folder, "train"), EncodedRows(folder, "val"), report, meta["digest"]
    except (OSError, ValueError, KeyError):  # absent, or damaged: encoded again and rewritten
        return None


def entries() -> list[dict]:
    """The cached encodings, newest first, with their size on disk."""
    rows = []
    root = cache_dir()
    for folder in sorted(root.glob("*")) if root.is_dir() else []:
        meta_file = folder / "meta.json"
        if folder.name.startswith(".") or not meta_file.is_file():
            continue
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except ValueError:
            meta = {"dataset": "(damaged entry)"}
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        rows.append({"folder": str(folder), "bytes": size, **meta})
    return sorted(rows, key=lambda r: r.get("created", ""), reverse=True)


def clear() -> int:
    """Remove every cached encoding; returns how many."""
    root = cache_dir()
    n = 0
    for folder in list(root.glob("*")) if root.is_dir() else []:
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            n += 1
    return n


def data_cache(cfg: Any) -> list[dict]:
    """`lorakit data cache`: list the cached encodings, or remove them with --clear."""
    from .io import say

    if cfg.clear:
        say(f"lorakit: removed {clear()} cached encodings from {cache_dir()}")
        return []
    rows = entries()
    if not rows:
        say(f"lorakit: no cached encodings in {cache_dir()}")
    for r in rows:
        say(
            f"{r.get('created', '?')}  {r.get('train_rows', '?'):>8} + {r.get('val_rows', '?'):>6} rows  "
            f"{r['bytes'] / 2**20:8.1f} MiB  {r.get('dataset', '?')}  ({r['folder']})"
        )
    return rows
