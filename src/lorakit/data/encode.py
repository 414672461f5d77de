"""Encoding a dataset: samples -> token ids and labels from the chat template, in memory or
streamed into the data cache, with the length policy and the data report.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ..core.errors import LorakitError
from ..core.files import say, world_size
from ..core.labels import IGNORE_INDEX
from .formats import DataReport, Sample, iter_samples, to_samples
from .sources import demo_path, iter_rows, resolve_sources
from .split import SeenSamples, iter_unique, split_validation, validation_indices
from .template import ChatFormat

ENCODE_CHUNK = 1024  # conversations tokenized per batched call
_WORKER_CHAT: ChatFormat | None = None  # the ChatFormat a forked worker inherits


def _encode_chunk(job: tuple[list[Sample], bool]) -> list:
    """The training rows ((ids, labels, boundary_merge) each) or the LorakitError of each sample
    of a chunk."""
    chunk, last_only = job
    chat = _WORKER_CHAT
    results = iter(chat.encode_conversations([s.messages for s in chunk if s.text is None], last_only))
    out: list = []
    for s in chunk:
        if s.text is None:
            out.append(next(results))
            continue
        try:
            out.append([(*chat.encode_text(s.text), False)])
        except LorakitError as e:
            out.append(e)
    return out


def _quiet_worker() -> None:
    # A forked worker tokenizes on its own core; the Rust tokenizer's threads stay off.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _can_fork() -> bool:
    """Worker processes are forked only where that is safe and useful: on a platform with fork,
    in a single-process run, before any CUDA context exists."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods() or world_size() > 1:
        return False
    torch = sys.modules.get("torch")
    return not (torch is not None and torch.cuda.is_initialized())


def _encoded_in_chunks(samples: list[Sample], chat: ChatFormat, last_only: bool):
    """(ids, labels, boundary_merge) or the LorakitError of each sample, in order, a chunk at a
    time (one batched tokenizer call per chunk), in this process: the in-memory path, for small
    data (large data streams through the cache's worker processes)."""
    global _WORKER_CHAT
    _WORKER_CHAT = chat
    try:
        for i in range(0, len(samples), ENCODE_CHUNK):
            yield from _encode_chunk((samples[i : i + ENCODE_CHUNK], last_only))
    finally:
        _WORKER_CHAT = None


def encode_samples(
    samples: list[Sample],
    chat: ChatFormat,
    max_seq_length: int,
    overlength: str = "drop",
    train_on: str = "all_assistant",
    report: DataReport | None = None,
    skip_bad_rows: bool = False,
) -> list[dict[str, Any]]:
    """Token ids and labels per sample, with the length policy applied and counted in `report`."""
    report = report if report is not None else DataReport(rows=len(samples))
    examples: list[dict[str, Any]] = []
    encoded = _encoded_in_chunks(samples, chat, train_on == "last_assistant")
    for s, result in zip(samples, encoded):
        try:
            if isinstance(result, LorakitError):
                raise result
            if any(all(label == IGNORE_INDEX for label in labels) for _, labels, _ in result):
                raise LorakitError("no supervised token after rendering (the template dropped the answer)")
        except LorakitError as e:
            msg = str(e) if str(e).startswith(s.where) else f"{s.where}: {e}"
            if not skip_bad_rows:
                raise LorakitError(msg) from None
            report.skipped.append(msg)
            continue
        report.split_conversations += len(result) > 1
        for ids, labels, merged in result:
            report.boundary_merges += merged
            row = fit_length(
                {"input_ids": ids, "labels": labels, "source": s.where}, max_seq_length, overlength, report
            )
            if row is not None:
                examples.append(row)
    return examples


def fit_length(row: dict[str, Any], max_seq_length: int, overlength: str, report: DataReport) -> dict | None:
    """The length policy for one encoded row (None: dropped), counted in `report`."""
    ids, labels = row["input_ids"], row["labels"]
    within = labels[:max_seq_length] if len(labels) > max_seq_length else labels
    supervised = len(within) - within.count(IGNORE_INDEX)
    kept = length_policy(row["source"], len(ids), supervised, max_seq_length, overlength, report)
    if kept is None:
        return None
    return {"input_ids": ids[:kept], "labels": labels[:kept], "source": row["source"]}


def length_policy(
    where: str, n_tokens: int, supervised: int, max_seq_length: int, overlength: str, report: DataReport
) -> int | None:
    """How many tokens of a row the length policy keeps (None: the row is dropped), counted in
    `report`; `supervised` counts the supervised tokens among the first max_seq_length."""
    if n_tokens > max_seq_length:
        if overlength == "error":
            raise LorakitError(
                f"{where}: {n_tokens} tokens > max_seq_length {max_seq_length}; "
                "raise --max_seq_length or use --overlength drop|truncate"
            )
        if overlength == "drop" or supervised == 0:  # truncation would cut the whole answer
            report.dropped_overlength.append(where)
            return None
        report.truncated.append(where)
    report.lengths.append(n_tokens)
    kept = min(n_tokens, max_seq_length)
    report.tokens += kept
    report.supervised_tokens += supervised
    return kept


class Samples(NamedTuple):
    """Validated rows of a dataset, split, with what was found on the way."""

    train: list[Sample]
    val: list[Sample]
    report: DataReport


class Encoded(NamedTuple):
    """Token ids and labels of a dataset as training sees them (dicts with input_ids, labels,
    source), the report with the length policy applied, and the chat format used."""

    train: Sequence[dict[str, Any]]
    val: Sequence[dict[str, Any]]
    report: DataReport
    chat: ChatFormat
    digest: str  # SHA-256 of every row's ids and labels (what a resume must find unchanged)


def load_samples(cfg) -> Samples:
    """Read, validate, de-duplicate and split the data of a config with DataArgs and PromptArgs
    (in memory: for the encoded dataset of a run, see encode_data)."""
    report = DataReport()
    seen = SeenSamples()
    samples = list(iter_unique(_config_samples(cfg, cfg.dataset, report), seen, report))
    if cfg.val_dataset:
        val = list(_val_samples(cfg, seen, report))
    else:
        samples, val = split_validation(samples, cfg.val_size, cfg.seed)
    return Samples(samples, val, report)


def count_samples(cfg) -> int:
    """How many training rows load_samples(cfg) would give, read as a stream (bounded memory)."""
    report = DataReport()
    seen = SeenSamples()
    n = sum(1 for _ in iter_unique(_config_samples(cfg, cfg.dataset, report), seen, report))
    if cfg.val_dataset:
        return n
    return n - len(validation_indices(n, cfg.val_size, cfg.seed))


def _config_samples(cfg, dataset: str, report: DataReport, progress=None) -> Iterator[Sample]:
    rows = iter_rows(dataset or str(demo_path("train")), cfg.skip_bad_rows, progress)
    return iter_samples(rows, cfg.dataset_format, cfg.system_prompt or "", cfg.skip_bad_rows, report)


def _val_samples(cfg, train_seen: SeenSamples, report: DataReport, progress=None) -> Iterator[Sample]:
    """The --val_dataset samples, de-duplicated, without those also in the training data (a
    validation row seen in training measures nothing), counted in report.val_leaks_removed."""
    val_report = DataReport()
    for s in iter_unique(
        _config_samples(cfg, cfg.val_dataset, val_report, progress), SeenSamples(), val_report
    ):
        if s in train_seen:
            report.val_leaks_removed += 1
        else:
            yield s
    report.skipped += val_report.skipped


def encode_data(
    samples: Samples | Callable[[], Samples] | None,
    chat: ChatFormat,
    cfg,
    *,
    max_seq_length: int | None = None,
    train_on: str | None = None,
    allow_empty: bool = False,
    cache: bool = True,
) -> Encoded:
    """The one encoding path of train, doctor, plan, evaluate and sweep: the config's data
    encoded with its length policy and train_on setting (each overridable).

    With `cache`, the encoding is read from the data cache (data/cache.py), or streamed into it
    once: rows are read, validated, de-duplicated and encoded a chunk at a time, so memory stays
    bounded at any dataset size. Without it (or when the cache cannot be written), `samples`
    (load_samples(cfg), or a function returning it; by default read from cfg) are encoded in
    memory. Both give the same rows, report and digest."""
    from . import cache as datacache

    max_seq_length, train_on = max_seq_length or cfg.max_seq_length, train_on or cfg.train_on
    hit = None
    if cache:
        data_files = resolve_sources(cfg.dataset or str(demo_path("train")))
        val_files = resolve_sources(cfg.val_dataset) if cfg.val_dataset else []
        key = datacache.cache_key(cfg, chat, max_seq_length, train_on, data_files, val_files)
        hit = datacache.load(key)
        if hit is None:
            try:
                hit = _encode_into_cache(cfg, chat, key, max_seq_length, train_on, [*data_files, *val_files])
            except OSError as e:  # the cache is a shortcut, never a reason to stop
                say(f"lorakit: note: the data cache could not be written ({e.strerror}); encoding in memory")
    if hit is not None:
        train, val, fields, digest = hit
        report = DataReport(**fields)
    else:
        samples = samples() if callable(samples) else samples or load_samples(cfg)
        train, val, report = _encode_in_memory(samples, chat, cfg, max_seq_length, train_on)
        digest = rows_digest(train, val)
    if not train and not allow_empty:
        raise LorakitError(
            f"no trainable rows left of {report.rows}: {report.summary()} (raise --max_seq_length?)"
        )
    return Encoded(train, val, report, chat, digest)


def _encode_in_memory(samples: Samples, chat: ChatFormat, cfg, max_seq_length: int, train_on: str):
    import copy

    report = copy.deepcopy(samples.report)
    report.chatml_fallback = chat.fallback
    kw = {"max_seq_length": max_seq_length, "overlength": cfg.overlength, "train_on": train_on}
    train = encode_samples(samples.train, chat, report=report, skip_bad_rows=cfg.skip_bad_rows, **kw)
    val_report = DataReport()
    val = encode_samples(samples.val, chat, report=val_report, skip_bad_rows=cfg.skip_bad_rows, **kw)
    report.skipped += val_report.skipped
    report.kept, report.val_rows = len(train), len(val)
    return train, val, report


# --------------------------------------------------------------------------------------------
# Streaming a dataset into the data cache

PARALLEL_MIN_BYTES = 4 << 20  # data files below ~4 MB (~4000 rows): worker processes cost more than they save


@dataclass
class _EncodedChunk:
    """What a worker reports of a chunk of samples it encoded (its rows are on disk as `name`):
    for each encoded row, its place in the de-duplicated order, token count, supervised tokens
    within max_seq_length and whether tokens merge across turns; the rows that failed."""

    name: str
    index: Any  # np.ndarray[int64]
    n_tokens: Any  # np.ndarray[int64]
    supervised: Any  # np.ndarray[int64]
    merged: Any  # np.ndarray[bool]
    split: Any  # np.ndarray[bool]: the first row of a conversation trained as several rows
    over: dict[int, str]  # row (in this chunk) -> file:line, for rows over max_seq_length
    errors: list[tuple[int, str]]  # (place, message)


def _encode_job(job: tuple) -> tuple[list, list]:
    """Encode a chunk of samples and write its rows into the entry folder (in a worker
    process, or inline for small data); returns per-row facts, small enough to send back."""
    from . import cache as datacache

    name, start, chunk, last_only, max_seq_length, folder = job
    rows, facts, errors = [], [], []
    for k, (s, result) in enumerate(zip(chunk, _encode_chunk((chunk, last_only)))):
        if not isinstance(result, LorakitError) and any(
            all(t == IGNORE_INDEX for t in labels) for _, labels, _ in result
        ):
            result = LorakitError("no supervised token after rendering (the template dropped the answer)")
        if isinstance(result, LorakitError):
            errors.append(
                (start + k, str(result) if str(result).startswith(s.where) else f"{s.where}: {result}")
            )
            continue
        for j, (ids, labels, merged) in enumerate(result):  # several rows: see mask.Masker._rows
            within = labels[:max_seq_length]
            over = s.where if len(ids) > max_seq_length else ""
            split = j == 0 and len(result) > 1
            facts.append((start + k, len(ids), len(within) - within.count(IGNORE_INDEX), merged, over, split))
            rows.append({"input_ids": ids, "labels": labels, "source": s.where})
    datacache.write_rows(folder, name, rows)
    return facts, errors


def _chunk_of(name: str, facts: list, errors: list) -> _EncodedChunk:
    import numpy as np

    cols = list(zip(*facts)) or [()] * 6
    over = {j: where for j, where in enumerate(cols[4]) if where}
    return _EncodedChunk(
        name,
        np.asarray(cols[0], dtype=np.int64),
        np.asarray(cols[1], dtype=np.int64),
        np.asarray(cols[2], dtype=np.int64),
        np.asarray(cols[3], dtype=bool),
        np.asarray(cols[5], dtype=bool),
        over,
        errors,
    )


class _Encoder:
    """Runs chunk jobs in order: inline, or on one forked worker per core with a bounded number
    in flight (the rows are read and validated here while the workers tokenize, and at most a
    few chunks are ever held in memory)."""

    def __init__(self, chat: ChatFormat, parallel: bool):
        global _WORKER_CHAT
        _WORKER_CHAT = chat
        self.workers = min(os.cpu_count() or 1, 8) if parallel and _can_fork() else 1
        self.pool = None
        if self.workers > 1:
            import multiprocessing

            self.pool = multiprocessing.get_context("fork").Pool(self.workers, initializer=_quiet_worker)

    def run(self, jobs: Iterable[tuple]) -> Iterator[tuple[str, list, list]]:
        from collections import deque

        if self.pool is None:
            for job in jobs:
                yield (job[0], *_encode_job(job))
            return
        window: deque = deque()
        for job in jobs:
            window.append((job[0], self.pool.apply_async(_encode_job, (job,))))
            if len(window) >= 2 * self.workers:
                name, result = window.popleft()
                yield (name, *result.get())
        while window:
            name, result = window.popleft()
            yield (name, *result.get())

    def close(self) -> None:
        global _WORKER_CHAT
        _WORKER_CHAT = None
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _encode_stream(
    samples: Iterable[Sample],
    encoder: _Encoder,
    prefix: str,
    folder: Path,
    cfg,
    last_only: bool,
    max_seq_length: int,
    progress,
) -> tuple[list[_EncodedChunk], int]:
    """Encode a stream of samples into chunk files named prefix + number; (chunks, samples)."""
    import itertools

    def jobs():
        it = iter(samples)
        for n in itertools.count():
            chunk = list(itertools.islice(it, ENCODE_CHUNK))
            if not chunk:
                return
            yield (f"{prefix}{n:06d}", n * ENCODE_CHUNK, chunk, last_only, max_seq_length, folder)

    chunks, count = [], 0
    for name, facts, errors in encoder.run(jobs()):
        if errors and not cfg.skip_bad_rows:
            raise LorakitError(errors[0][1])
        if cfg.overlength == "error" and any(f[4] for f in facts):
            where, n = next((f[4], f[1]) for f in facts if f[4])
            raise LorakitError(
                f"{where}: {n} tokens > max_seq_length {max_seq_length}; "
                "raise --max_seq_length or use --overlength drop|truncate"
            )
        chunks.append(_chunk_of(name, facts, errors))
        samples_done = len({f[0] for f in facts}) + len(errors)
        count += samples_done
        progress.add_rows(samples_done)
    return chunks, count


def _policy_parts(
    chunks: list[_EncodedChunk], selected, cfg, max_seq_length: int, report: DataReport
) -> list:
    """The length policy over the selected rows of the chunks, counted in `report` as
    length_policy would; (chunk name, tokens kept per row) for datacache.gather."""
    import numpy as np

    parts = []
    for c in chunks:
        sel = selected[c.index] if len(c.index) else np.zeros(0, dtype=bool)
        over = c.n_tokens > max_seq_length
        drop = over & ((cfg.overlength == "drop") | (c.supervised == 0))
        kept = sel & ~drop
        report.dropped_overlength += [c.over[int(j)] for j in np.flatnonzero(sel & drop)]
        report.truncated += [c.over[int(j)] for j in np.flatnonzero(kept & over)]
        report.lengths += c.n_tokens[kept].tolist()
        report.tokens += int(np.minimum(c.n_tokens[kept], max_seq_length).sum())
        report.supervised_tokens += int(c.supervised[kept].sum())
        report.boundary_merges += int(c.merged[sel].sum())
        report.split_conversations += int(c.split[sel].sum())
        report.skipped += [msg for place, msg in c.errors if selected[place]]
        parts.append((c.name, np.where(kept, np.minimum(c.n_tokens, max_seq_length), 0)))
    return parts


def _encode_into_cache(cfg, chat: ChatFormat, key: str, max_seq_length: int, train_on: str, files) -> tuple:
    """Stream the config's data into a new data cache entry; returns datacache.load(key)."""
    import numpy as np

    from ..core.files import Progress, staging_dir
    from . import cache as datacache

    report = DataReport(chatml_fallback=chat.fallback)
    seen = SeenSamples()
    size = sum(f.stat().st_size for f in files if isinstance(f, Path))
    progress = Progress(size, f"encoding {cfg.dataset or 'demo'}")
    encoder = _Encoder(chat, parallel=size >= PARALLEL_MIN_BYTES)
    last_only = train_on == "last_assistant"
    try:
        with staging_dir(datacache.entry_dir(key)) as folder:
            args = (folder, cfg, last_only, max_seq_length, progress)
            train_samples = iter_unique(_config_samples(cfg, cfg.dataset, report, progress), seen, report)
            chunks, n = _encode_stream(train_samples, encoder, "t", *args)
            val_report = DataReport()
            if cfg.val_dataset:
                val_chunks, n_val = _encode_stream(
                    _val_samples(cfg, seen, report, progress), encoder, "v", *args
                )
                train_parts = _policy_parts(chunks, np.ones(n, dtype=bool), cfg, max_seq_length, report)
                val_parts = _policy_parts(
                    val_chunks, np.ones(n_val, dtype=bool), cfg, max_seq_length, val_report
                )
                chunks += val_chunks
            else:
                is_val = np.zeros(n, dtype=bool)
                is_val[list(validation_indices(n, cfg.val_size, cfg.seed))] = True
                train_parts = _policy_parts(chunks, ~is_val, cfg, max_seq_length, report)
                val_parts = _policy_parts(chunks, is_val, cfg, max_seq_length, val_report)
            report.skipped += val_report.skipped
            digests = (
                datacache.gather(folder, "train", train_parts),
                datacache.gather(folder, "val", val_parts),
            )
            datacache.drop_chunks(folder, [c.name for c in chunks])
            report.kept, report.val_rows = (
                sum(int((keep > 0).sum()) for _, keep in p) for p in (train_parts, val_parts)
            )
            datacache.finish(
                folder, key, report, digests, cfg.dataset or "demo", (report.kept, report.val_rows)
            )
    finally:
        encoder.close()
        progress.close()
    return datacache.load(key)


def row_lengths(rows: Sequence[dict]) -> list[int]:
    """Token length of each encoded row (from the cache's offsets when it has them)."""
    return rows.lengths() if hasattr(rows, "lengths") else [len(r["input_ids"]) for r in rows]


def supervised_counts(rows: Sequence[dict], limit: int | None = None) -> list[int]:
    """Supervised tokens of each encoded row, among its first `limit` tokens."""
    if hasattr(rows, "supervised"):
        return rows.supervised(limit)
    return [len(r["labels"][:limit]) - r["labels"][:limit].count(IGNORE_INDEX) for r in rows]


def rows_digest(train: Sequence[dict], val: Sequence[dict]) -> str:
    """SHA-256 of the encoded rows (ids, labels and row boundaries), training rows then validation rows."""
    from . import cache as datacache

    return datacache.digest([train, val])


def encode_rows(
    rows: list[tuple[str, dict]],
    tokenizer,
    system_prompt: str,
    max_seq_length: int,
    overlength: str = "drop",
    chat: ChatFormat | None = None,
) -> tuple[list[dict[str, Any]], DataReport]:
    """Encode rows of any format (no de-duplication or split): a shortcut for tests and tools."""
    samples, _ = to_samples(rows, "auto", system_prompt)
    report = DataReport(rows=len(rows))
    examples = encode_samples(
        samples, chat or ChatFormat(tokenizer), max_seq_length, overlength, report=report
    )
    report.kept = len(examples)
    if not examples:
        raise LorakitError(
            f"no trainable rows left: all {report.rows} exceed max_seq_length {max_seq_length} (raise --max_seq_length)"
        )
    return examples, report
