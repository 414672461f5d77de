"""Batched generation for `lorakit serve`: concurrent requests decoded together, each with its own
adapter, in one forward pass per token (continuous batching on transformers + PEFT).

- New requests are prefilled together, right-padded (a prompt token never attends to padding, and
  each request keeps only its own part of the cache). Their rows (one per `n`) then join the
  running batch between two decode steps.
- The batch's KV cache is a transformers DynamicCache whose rows are left-padded to a common width;
  a 2D padding mask hides the padding and each row gets its own position ids, so a row attends to
  exactly the keys it would see alone. PEFT's `adapter_names=` applies each row's adapter
  ("__base__" = none) inside the shared pass.
- A prompt's keys and values depend only on its tokens and its adapter, so those of recent prompts
  are kept (PrefixCache): a new prompt that starts like one of them (the same system prompt and
  chat template head, an earlier turn of the conversation) only runs its remaining tokens.
- A row leaves the batch at the step where it ends (its stop tokens, a stop string, its max_tokens,
  or its request cancelled because the client went away); its request learns that it is over only
  once no row of it is generating, so a freed slot means the work really stopped.

Written here because model.generate() cannot add or drop rows between steps, and transformers'
continuous-batching manager (transformers/generation/continuous_batching) never passes PEFT's
`adapter_names`, so its batches cannot mix adapters. One thread owns the model; requests reach it
through a bounded queue.
"""

from __future__ import annotations

import collections
import inspect
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from .decoding import Sampling, TextStream, sample
from .kvcache import PackedLinears, PrefixCache

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class Busy(Exception):
    """The queue is full (or the engine is closing): the request was not taken."""

    def __init__(self, message: str, closing: bool = False):
        super().__init__(message)
        self.closing = closing


@dataclass
class Event:
    """What the engine tells a request: `text` (a delta of choice `index`), `finish` (that choice
    ended, with its reason), `error` (the request failed) and `done` (nothing generates any more)."""

    kind: str
    index: int = 0
    text: str = ""
    reason: str | None = None


class Job:
    """One request: a prompt, an adapter (a PEFT adapter name or BASE), sampling, `n` choices."""

    def __init__(
        self,
        prompt: list[int],
        adapter: str,
        sampling: Sampling,
        n: int = 1,
        on_event: Callable[[Event], None] | None = None,
    ):
        self.prompt, self.adapter, self.sampling, self.n = prompt, adapter, sampling, n
        self.on_event = on_event or (lambda event: None)
        self.completion_tokens = 0  # generated tokens over all choices, end tokens included
        self.done = threading.Event()  # set once no row of this job is generating
        self._cancelled = threading.Event()
        self._rows_left = n

    def cancel(self) -> None:
        """Stop generating for this request at the next step boundary."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Row:
    """One choice being generated."""

    def __init__(self, job: Job, index: int, tokenizer, kv, length: int, device):
        import torch

        self.job, self.index = job, index
        self.text = TextStream(tokenizer, job.sampling.stop)
        self.generator = None
        if job.sampling.temperature > 0:  # its own generator: a seed gives the same answer in any batch
            self.generator = torch.Generator(device=device)
            seed = job.sampling.seed
            if seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(seed + index)
        self.count = 0  # tokens generated, end token included
        self.kv = kv  # this row's own cache until it joins the batch: [(keys, values)] per layer
        self.length = length  # real (non-pad) tokens in its cache
        self.next_token: int | None = None
        self.reason: str | None = None  # set when it has finished


class BatchEngine:
    """Owns the model in one thread; `submit` hands it jobs; `status` says what it is doing."""

    def __init__(
        self,
        model,
        tokenizer,
        stop_ids: list[int],
        max_rows: int = 8,
        max_queued: int = 32,
        peft: bool = False,
        threads: int = 0,
        prefill_tokens: int = 4096,
        prefix_cache_bytes: int = 256 << 20,
        packed_rows: int = 8,
        packed_bytes: int = 2 << 30,
    ):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, set(stop_ids)
        self.max_rows, self.max_queued, self.peft, self.threads = max_rows, max_queued, peft, threads
        self.prefill_tokens = prefill_tokens
        self.prefixes = PrefixCache(prefix_cache_bytes)  # 0 bytes: no prompt is kept
        # Decode steps of 2..packed_rows rows on prepacked weights when the fp32 linear weights take
        # at most packed_bytes (SmolLM2-135M: 0.5 GB; 0 rows or 0 bytes: never). Capped at 8 rows:
        # a 2-row step computes all of them, which 8 rows keep cheap (1 thread, SmolLM2-135M: 4- and
        # 8-row steps took 101 and 107 ms unpacked, as weights stream from memory) and more may not.
        self.packed = PackedLinears(model, min(packed_rows, max_rows), packed_bytes)
        base = model.get_base_model() if peft else model
        params = inspect.signature(base.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self._keeps_logits = "logits_to_keep" in params
        self.steps = 0  # decode steps run so far
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._rows: list[Row] = []
        self._cache = None  # DynamicCache of the batch, rows left-padded to one width
        self._mask = None  # [rows, width] 1 = real token, 0 = padding
        self._working = False
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the requests' side
    def submit(self, job: Job) -> None:
        if job.n > self.max_rows:
            raise ValueError(f"n={job.n} is more than the {self.max_rows} rows generated at once")
        with self._cv:
            if self._closing:
                raise Busy("the server is shutting down", closing=True)
            if len(self._queue) >= self.max_queued:
                raise Busy(f"{len(self._queue)} requests already wait for a place; retry shortly")
            self._queue.append(job)
            self._cv.notify()

    def status(self) -> dict:
        with self._cv:
            return {
                "rows": len(self._rows),
                "requests": len({id(r.job) for r in self._rows}),
                "queued": len(self._queue),
                "generating": self._working or bool(self._rows),
                "decode_steps": self.steps,
                "max_rows": self.max_rows,
                "max_queued": self.max_queued,
            }

    def close(self, timeout: float = 30) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)
        self.packed.close()

    # ---------------------------------------------------------------- the engine thread
    def _loop(self) -> None:
        import torch

        torch.set_grad_enabled(False)  # this thread only runs inference
        if self.threads:
            torch.set_num_threads(self.threads)  # OpenMP's thread count is per calling thread
        while True:
            with self._cv:
                while not self._closing and not self._queue and not self._rows:
                    self._cv.wait()
                if self._closing:
                    break
                dropped = [job for job in self._queue if job.cancelled]
                self._queue = collections.deque(job for job in self._queue if not job.cancelled)
                joining = []
                room = self.max_rows - len(self._rows)
                while self._queue and self._queue[0].n <= room:
                    job = self._queue.popleft()
                    room -= job.n
                    joining.append(job)
                self._working = True
            for job in dropped:
                self._job_over(job, job.n)
            try:
                self._admit(joining)
                self._leave()
                if self._rows:
                    self._step()
                    self._leave()
            except Exception as e:  # a bug or an out-of-memory: fail this batch, keep serving
                traceback.print_exc(file=sys.stderr)
                self._fail_batch(f"generation failed: {type(e).__name__}: {e}")
            finally:
                with self._cv:
                    self._working = False
        self._shut_down()

    def _forward(self, ids, mask, positions, cache, adapters: list[str], last: list[int] | None = None):
        """Logits [rows, vocab] at each row's position `last` (default: the final column)."""
        import torch

        kwargs = {"adapter_names": adapters} if self.peft else {}
        kwargs[self._cache_kwarg] = cache
        columns = sorted(set(last)) if last is not None else [ids.shape[1] - 1]
        if self._keeps_logits:
            # Logits of the needed positions only: a prefill would otherwise multiply every prompt
            # position by the vocabulary matrix (for SmolLM2 as much work as the rest of the model).
            kwargs["logits_to_keep"] = torch.tensor(columns, device=ids.device) if last is not None else 1
        else:
            columns = list(range(ids.shape[1]))
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        if last is None:
            return out.logits[:, -1, :].float()
        picked = torch.tensor([columns.index(c) for c in last], device=ids.device)
        return out.logits[torch.arange(len(last), device=ids.device), picked].float()

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the new jobs, take each one's first token, and join their rows to the batch."""
        live = [job for job in jobs if not job.cancelled]
        for job in jobs:
            if job.cancelled:
                self._job_over(job, job.n)
        new_rows = []
        for group in self._prefill_groups(live):
            try:
                prefilled = self._prefill(group)
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                for job in group:
                    job.on_event(Event("error", text=f"generation failed: {type(e).__name__}: {e}"))
                    self._job_over(job, job.n)
                continue
            for job, (kv, logits) in zip(group, prefilled):
                for index in range(job.n):
                    row = Row(job, index, self.tokenizer, kv, len(job.prompt), self.model.device)
                    self._accept(row, sample(logits, job.sampling, row.generator))
                    if row.reason is None:
                        new_rows.append(row)
                    else:
                        self._job_over(job, 1)
        if new_rows:
            self._join(new_rows)

    def _prefill_groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Jobs prefilled together, at most `prefill_tokens` padded prompt tokens per forward pass."""
        groups: list[list[Job]] = []
        for job in jobs:
            if groups:
                wide = max(len(j.prompt) for j in [*groups[-1], job])
                if wide * (len(groups[-1]) + 1) <= self.prefill_tokens:
                    groups[-1].append(job)
                    continue
            groups.append([job])
        return groups

    def _prefill(self, jobs: list[Job]) -> list[tuple[list, object]]:
        """One forward pass over the prompts' uncached tokens. Returns, per job, its own cache
        (padding cut off) and the logits at its last prompt token.

        Row i's cached first n_i tokens sit left-padded in the cache ([rows, kv_heads, head, dim],
        head = max n_i) and its remaining tokens follow, right-padded: a prompt token never sees
        padding that comes after it and always sees itself, so no query row is fully masked."""
        import torch
        from transformers import DynamicCache

        device = self.model.device
        cached = [self.prefixes.lookup(j.adapter, j.prompt) for j in jobs]
        done = [n for _, n in cached]
        rest = [j.prompt[n:] for j, n in zip(jobs, done)]
        head, wide = max(done), max(len(r) for r in rest)
        pad = next(iter(self.stop_ids))  # any id: padded positions are masked and then cut off
        ids = torch.tensor([r + [pad] * (wide - len(r)) for r in rest], device=device)
        mask = torch.tensor(
            [[0] * (head - n) + [1] * (n + len(r)) + [0] * (wide - len(r)) for n, r in zip(done, rest)],
            device=device,
        )
        positions = torch.tensor(done, device=device)[:, None] + torch.arange(wide, device=device)[None]
        cache = self._prefix_batch(cached, head) if head else DynamicCache()
        logits = self._forward(
            ids, mask, positions, cache, [j.adapter for j in jobs], [len(r) - 1 for r in rest]
        )
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        out = []
        for i, (job, n) in enumerate(zip(jobs, done)):
            span = slice(head - n, head + len(rest[i]))  # the row's prompt, padding cut off
            kv = [(k[i : i + 1, :, span], v[i : i + 1, :, span]) for k, v in layers]
            self.prefixes.add(job.adapter, job.prompt, kv)
            out.append((kv, logits[i]))
        return out

    @staticmethod
    def _prefix_batch(cached: list[tuple[list | None, int]], head: int):
        """A DynamicCache of the rows' cached prefixes, left-padded to `head` columns (a row with
        no cached prefix is all padding)."""
        import torch
        import torch.nn.functional as F
        from transformers import DynamicCache

        shape = next(kv for kv, _ in cached if kv is not None)
        layers = []
        for i, (k0, v0) in enumerate(shape):
            keys, values = [], []
            for kv, n in cached:
                if kv is None:
                    keys.append(k0.new_zeros((*k0.shape[:2], head, k0.shape[-1])))
                    values.append(v0.new_zeros((*v0.shape[:2], head, v0.shape[-1])))
                else:
                    keys.append(F.pad(kv[i][0], (0, 0, head - n, 0)))
                    values.append(F.pad(kv[i][1], (0, 0, head - n, 0)))
            layers.append((torch.cat(keys), torch.cat(values)))
        return DynamicCache(ddp_cache_data=layers)

    def _join(self, new_rows: list[Row]) -> None:
        import torch
        import torch.nn.functional as F
        from transformers import DynamicCache

        width = self._mask.shape[1] if self._rows else 0
        wide = max([width, *(r.length for r in new_rows)])
        old = [(layer.keys, layer.values) for layer in self._cache.layers] if self._rows else None
        layers = []
        for i in range(len(new_rows[0].kv)):
            keys, values = [], []
            if old:
                keys.append(F.pad(old[i][0], (0, 0, wide - width, 0)))
                values.append(F.pad(old[i][1], (0, 0, wide - width, 0)))
            for r in new_rows:
                keys.append(F.pad(r.kv[i][0], (0, 0, wide - r.length, 0)))
                values.append(F.pad(r.kv[i][1], (0, 0, wide - r.length, 0)))
            layers.append((torch.cat(keys), torch.cat(values)))
        device = self.model.device
        masks = [F.pad(self._mask, (wide - width, 0))] if self._rows else []
        masks += [
            F.pad(torch.ones((1, r.length), dtype=torch.long, device=device), (wide - r.length, 0))
            for r in new_rows
        ]
        for r in new_rows:
            r.kv = None
        self._cache, self._mask = DynamicCache(ddp_cache_data=layers), torch.cat(masks)
        with self._cv:
            self._rows = self._rows + new_rows

    def _step(self) -> None:
        """One decode step: every row's last token in, every row's next token out."""
        import torch

        device = self.model.device
        rows = self._rows
        ids = torch.tensor([[r.next_token] for r in rows], device=device)
        positions = torch.tensor([[r.length] for r in rows], device=device)
        self._mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.long, device=device)], 1)
        self.packed.on = 2 <= len(rows) <= self.packed.rows
        try:
            logits = self._forward(ids, self._mask, positions, self._cache, [r.job.adapter for r in rows])
        finally:
            self.packed.on = False
        self.steps += 1
        for r, row_logits in zip(rows, logits):
            r.length += 1
            self._accept(r, sample(row_logits, r.job.sampling, r.generator))

    def _accept(self, row: Row, token: int) -> None:
        """Record a generated token; end the row on a stop token, a stop string or max_tokens."""
        row.count += 1
        job = row.job
        if token in self.stop_ids:
            self._finish(row, "stop", row.text.flush())
            return
        delta, hit = row.text.push(token)
        if hit:
            self._finish(row, "stop", delta)
        elif row.count >= job.sampling.max_tokens:
            self._finish(row, "length", delta + row.text.flush())
        else:
            if delta:
                job.on_event(Event("text", row.index, delta))
            row.next_token = token

    def _finish(self, row: Row, reason: str, delta: str) -> None:
        row.reason = reason
        row.job.completion_tokens += row.count
        if row.job.cancelled:
            return
        if delta:
            row.job.on_event(Event("text", row.index, delta))
        row.job.on_event(Event("finish", row.index, reason=reason))

    def _leave(self) -> None:
        """Drop the rows that finished or whose request was cancelled; trim padding no row needs."""
        for r in self._rows:
            if r.reason is None and r.job.cancelled:
                r.reason = "cancelled"
                r.job.completion_tokens += r.count
        keep = [k for k, r in enumerate(self._rows) if r.reason is None]
        if len(keep) == len(self._rows):
            return
        gone = [r for r in self._rows if r.reason is not None]
        self._select(keep)
        for r in gone:
            self._job_over(r.job, 1)

    def _select(self, keep: list[int]) -> None:
        import torch
        from transformers import DynamicCache

        with self._cv:
            self._rows = [self._rows[k] for k in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask[index]
        first = int(mask.any(0).nonzero()[0])  # columns before it are padding in every row left
        layers = [
            (layer.keys[index, :, first:], layer.values[index, :, first:]) for layer in self._cache.layers
        ]
        self._cache, self._mask = DynamicCache(ddp_cache_data=layers), mask[:, first:]

    def _job_over(self, job: Job, rows: int) -> None:
        job._rows_left -= rows
        if job._rows_left == 0:
            job.on_event(Event("done"))
            job.done.set()

    def _fail_batch(self, message: str) -> None:
        jobs = {id(r.job): r.job for r in self._rows}
        with self._cv:
            self._rows = []
        self._cache = self._mask = None
        for job in jobs.values():
            job.on_event(Event("error", text=message))
            job._rows_left = 1
            self._job_over(job, 1)

    def _shut_down(self) -> None:
        with self._cv:
            waiting, self._queue = list(self._queue), collections.deque()
        self._fail_batch("the server is shutting down")
        for job in waiting:
            job.on_event(Event("error", text="the server is shutting down"))
            self._job_over(job, job.n)
