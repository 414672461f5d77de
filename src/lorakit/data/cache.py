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

from ..core.files import atomic_write_json
from ..core.labels import IGNORE_INDEX

CACHE_VERSION = 3  # 2: memory-mapped sources and split digests; 3: rows built from the inference prompt


def cache_dir() -> Path:
    from ..models.loading import lorakit_home

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
        self.labels_path = folder / f"{split}_labels.npy"
        self.labels = np.asarray(np.load(self.labels_path, mmap_mode="r"))
        self.offsets = np.load(folder / f"{split}_offsets.npy")
        # "file:line" of each row as one UTF-8 blob and its offsets: a million rows' sources as
        # Python strings would be ~100 MB held for the whole run.
        self._sources = np.asarray(np.load(folder / f"{split}_sources.npy", mmap_mode="r"))
        self._source_offsets = np.load(folder / f"{split}_source_offsets.npy")
        self.digest = ""  # set by load() from the entry's meta.json

    def __len__(self) -> int:
        return len(self.offsets) - 1

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
            "source": self.source(index),
        }

    def source(self, index: int) -> str:
        a, b = int(self._source_offsets[index]), int(self._source_offsets[index + 1])
        return self._sources[a:b].tobytes().decode("utf-8")

    def sources(self) -> list[str]:
        return [self.source(i) for i in range(len(self))]

    def lengths(self) -> list[int]:
        import numpy as np

        return np.diff(self.offsets).tolist()

    def supervised(self, limit: int | None = None) -> list[int]:
        """Supervised tokens of each row (among its first `limit` tokens), without reading rows:
        the labels are read a block of rows at a time with plain file reads (not through the
        map, whose touched pages would count as this process's memory)."""
        import numpy as np

        counts = []
        for first in range(0, len(self), SUPERVISED_BLOCK_ROWS):
            last = min(first + SUPERVISED_BLOCK_ROWS, len(self))
            base = int(self.offsets[first])
            labels = _read_range(self.labels_path, base, int(self.offsets[last]) - base)
            starts = self.offsets[first:last] - base
            ends = self.offsets[first + 1 : last + 1] - base
            if limit is not None:
                ends = np.minimum(ends, starts + limit)
            marked = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX)])
            counts += (marked[ends] - marked[starts]).tolist()
        return counts


SUPERVISED_BLOCK_ROWS = 8192


def _read_range(path: Path, start: int, count: int):
    """Elements [start, start + count) of a 1-D .npy file, read from disk (no memory map)."""
    import numpy as np

    with open(path, "rb") as f:
        fmt = np.lib.format
        version = fmt.read_magic(f)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        _, _, dtype = read_header(f)
        f.seek(f.tell() + start * dtype.itemsize)
        return np.fromfile(f, dtype=dtype, count=count)


class _Digest:
    """SHA-256 of a split's row boundaries, ids and labels, each fed in pieces."""

    def __init__(self):
        self.parts = [hashlib.sha256() for _ in range(3)]

    def update(self, offsets=None, ids=None, labels=None) -> None:
        for h, array in zip(self.parts, (offsets, ids, labels)):
            if array is not None:
                h.update(memoryview(array).cast("B"))

    def hexdigest(self) -> str:
        return "".join(h.hexdigest() for h in self.parts)


def rows_arrays(rows: Sequence[dict]):
    """(offsets int64, ids int32, labels int32) of encoded rows held as Python lists."""
    import numpy as np

    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r["input_ids"]) for r in rows], out=offsets[1:])
    empty = np.zeros(0, dtype=np.int32)
    ids = np.concatenate([np.asarray(r["input_ids"], dtype=np.int32) for r in rows] or [empty])
    labels = np.concatenate([np.asarray(r["labels"], dtype=np.int32) for r in rows] or [empty])
    return offsets, ids, labels


def split_digest(rows: Sequence[dict]) -> str:
    """The digest of one split: stored in the entry for cached rows, computed for rows in lists."""
    if hasattr(rows, "digest"):
        return rows.digest
    d = _Digest()
    d.update(*rows_arrays(rows))
    return d.hexdigest()


def digest(splits: Sequence[Sequence[dict]]) -> str:
    """SHA-256 over the splits' digests: the same value whether rows are cached or in lists."""
    return hashlib.sha256("|".join(split_digest(rows) for rows in splits).encode()).hexdigest()


def _save_sources(folder: Path, name: str, sources: list[str]) -> None:
    import numpy as np

    blobs = [s.encode("utf-8") for s in sources]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    np.save(folder / f"{name}_sources.npy", np.frombuffer(b"".join(blobs), dtype=np.uint8))
    np.save(folder / f"{name}_source_offsets.npy", offsets)


def write_rows(folder: Path, name: str, rows: Sequence[dict]) -> None:
    """Encoded rows (lists) as arrays named `name` in `folder`: a split, or a chunk of one."""
    import numpy as np

    offsets, ids, labels = rows_arrays(rows)
    np.save(folder / f"{name}_ids.npy", ids)
    np.save(folder / f"{name}_labels.npy", labels)
    np.save(folder / f"{name}_offsets.npy", offsets)
    _save_sources(folder, name, [r["source"] for r in rows])


def _npy_writer(path: Path, count: int):
    """An open .npy file of `count` int32 values, header written; the values are appended."""
    import numpy as np

    f = open(path, "wb")
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.dtype(np.int32).str, "fortran_order": False, "shape": (count,)}
    )
    return f


def gather(folder: Path, split: str, parts: list[tuple[str, Any]]) -> str:
    """Write split `split` from chunks written by write_rows: `parts` = (chunk name, tokens of
    each of its rows to keep: 0 leaves a row out, fewer than its length truncates it), in
    order. A chunk at a time, with plain file writes (no map: memory stays at one chunk).
    Returns the split's digest."""
    import numpy as np

    total = sum(int(keep.sum()) for _, keep in parts)
    d = _Digest()
    lengths, sources = [], []
    with (
        _npy_writer(folder / f"{split}_ids.npy", total) as ids_out,
        _npy_writer(folder / f"{split}_labels.npy", total) as labels_out,
    ):
        for name, keep in parts:
            rows = np.flatnonzero(keep)
            if not len(rows):
                continue
            offsets = np.load(folder / f"{name}_offsets.npy")
            ids, labels = np.load(folder / f"{name}_ids.npy"), np.load(folder / f"{name}_labels.npy")
            row_lengths = np.diff(offsets)
            within = np.arange(len(ids)) - np.repeat(offsets[:-1], row_lengths)
            mask = within < np.repeat(keep, row_lengths)
            kept_ids, kept_labels = np.ascontiguousarray(ids[mask]), np.ascontiguousarray(labels[mask])
            ids_out.write(kept_ids.tobytes())
            labels_out.write(kept_labels.tobytes())
            d.update(ids=kept_ids, labels=kept_labels)
            lengths.append(keep[rows])
            blob = np.load(folder / f"{name}_sources.npy").tobytes()
            starts = np.load(folder / f"{name}_source_offsets.npy")
            sources += [blob[starts[i] : starts[i + 1]].decode("utf-8") for i in rows]
    offsets = np.zeros(len(sources) + 1, dtype=np.int64)
    if sources:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    d.update(offsets=offsets)
    np.save(folder / f"{split}_offsets.npy", offsets)
    _save_sources(folder, split, sources)
    return d.hexdigest()


def drop_chunks(folder: Path, names: list[str]) -> None:
    for name in names:
        for f in folder.glob(f"{name}_*.npy"):
            f.unlink()


def finish(
    folder: Path, key: str, report: Any, digests: tuple[str, str], dataset: str, counts: tuple[int, int]
) -> str:
    """Write an entry's report and meta.json (last: an entry without it is not one); returns
    the digest of the whole encoding."""
    atomic_write_json(folder / "report.json", dataclasses.asdict(report))
    whole = hashlib.sha256("|".join(digests).encode()).hexdigest()
    meta = {"key": key, "dataset": dataset, "train_rows": counts[0], "val_rows": counts[1]}
    meta |= {"digest": whole, "split_digests": list(digests), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(folder / "meta.json", meta)
    return whole


def entry_dir(key: str) -> Path:
    return cache_dir() / key[:32]


def load(key: str) -> tuple[EncodedRows, EncodedRows, dict, str] | None:
    """(train rows, validation rows, report fields, digest) of a cached encoding, or None."""
    folder = entry_dir(key)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        train, val = EncodedRows(folder, "train"), EncodedRows(folder, "val")
        train.digest, val.digest = meta["split_digests"]
        return train, val, report, meta["digest"]
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
    from ..core.files import say

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
