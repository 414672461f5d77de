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
from .kvcache import (
    BatchCache,
    PackedLinears,
    PrefixCache,
    cache_layers,
    dynamic_cache,
    left_pad_join,
    slice_layers,
)

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
    """One choice being generated: its text, its own generator, and when it ends."""

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

    def advance(self, logits, stop_ids: set[int]) -> None:
        """Sample the next token from this row's logits [vocab] and record it; end the row on a
        stop token, a stop string or max_tokens."""
        token = sample(logits, self.job.sampling, self.generator)
        self.count += 1
        if token in stop_ids:
            self._finish("stop", self.text.flush())
            return
        delta, hit = self.text.push(token)
        if hit:
            self._finish("stop", delta)
        elif self.count >= self.job.sampling.max_tokens:
            self._finish("length", delta + self.text.flush())
        else:
            if delta:
                self.job.on_event(Event("text", self.index, delta))
            self.next_token = token

    def _finish(self, reason: str, delta: str) -> None:
        self.reason = reason
        self.job.completion_tokens += self.count
        if self.job.cancelled:
            return
        if delta:
            self.job.on_event(Event("text", self.index, delta))
        self.job.on_event(Event("finish", self.index, reason=reason))


class Scheduler:
    """The jobs waiting for rows, first come first served: which of them join the batch, and
    which of those are prefilled together. The engine holds its lock around every call."""

    def __init__(self, max_rows: int, max_queued: int, prefill_tokens: int):
        self.max_rows, self.max_queued, self.prefill_tokens = max_rows, max_queued, prefill_tokens
        self.queue: collections.deque[Job] = collections.deque()

    def add(self, job: Job) -> None:
        if len(self.queue) >= self.max_queued:
            raise Busy(f"{len(self.queue)} requests already wait for a place; retry shortly")
        self.queue.append(job)

    def take(self, running: int) -> tuple[list[Job], list[Job]]:
        """(the cancelled jobs, now out of the queue; the jobs at its head whose rows fit beside
        `running` rows)."""
        dropped = [job for job in self.queue if job.cancelled]
        self.queue = collections.deque(job for job in self.queue if not job.cancelled)
        joining = []
        room = self.max_rows - running
        while self.queue and self.queue[0].n <= room:
            job = self.queue.popleft()
            room -= job.n
            joining.append(job)
        return dropped, joining

    def drain(self) -> list[Job]:
        """Every waiting job, the queue emptied."""
        waiting, self.queue = list(self.queue), collections.deque()
        return waiting

    def prefill_groups(self, jobs: list[Job]) -> list[list[Job]]:
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


class Forward:
    """One forward pass of the model over rows that each name their adapter."""

    def __init__(self, model, peft: bool):
        self.model, self.peft = model, peft
        base = model.get_base_model() if peft else model
        params = inspect.signature(base.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.keeps_logits = "logits_to_keep" in params

    def __call__(self, ids, mask, positions, cache, adapters: list[str], last: list[int] | None = None):
        """Logits [rows, vocab] at each row's position `last` (default: the final column)."""
        import torch

        kwargs = {"adapter_names": adapters} if self.peft else {}
        kwargs[self.cache_kwarg] = cache
        columns = sorted(set(last)) if last is not None else [ids.shape[1] - 1]
        if self.keeps_logits:
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


class Prefill:
    """New prompts through the model together, the cached part of each skipped (PrefixCache)."""

    def __init__(self, forward: Forward, prefixes: PrefixCache, stop_ids: set[int]):
        self.forward, self.prefixes, self.stop_ids = forward, prefixes, stop_ids

    def __call__(self, jobs: list[Job]) -> list[tuple[list, object]]:
        """One forward pass over the prompts' uncached tokens. Returns, per job, its own cache
        (padding cut off) and the logits at its last prompt token.

        Row i's cached first n_i tokens sit left-padded in the cache ([rows, kv_heads, head, dim],
        head = max n_i) and its remaining tokens follow, right-padded: a prompt token never sees
        padding that comes after it and always sees itself, so no query row is fully masked."""
        import torch

        device = self.forward.model.device
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
        # the cached prefixes, left-padded to `head` columns (a row with none is all padding there)
        cache = dynamic_cache(left_pad_join(cached, head) if head else None)
        logits = self.forward(
            ids, mask, positions, cache, [j.adapter for j in jobs], [len(r) - 1 for r in rest]
        )
        layers = cache_layers(cache)
        out = []
        for i, (job, n) in enumerate(zip(jobs, done)):
            span = slice(head - n, head + len(rest[i]))  # the row's prompt, padding cut off
            kv = slice_layers(layers, slice(i, i + 1), span)
            self.prefixes.add(job.adapter, job.prompt, kv)
            out.append((kv, logits[i]))
        return out


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
        self.forward = Forward(model, peft)
        self.prefill = Prefill(self.forward, self.prefixes, self.stop_ids)
        self.scheduler = Scheduler(max_rows, max_queued, prefill_tokens)
        self.cache = BatchCache()  # the rows' keys and values, left-padded to one width
        self.steps = 0  # decode steps run so far
        self._cv = threading.Condition()
        self._rows: list[Row] = []
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
            self.scheduler.add(job)
            self._cv.notify()

    def status(self) -> dict:
        with self._cv:
            return {
                "rows": len(self._rows),
                "requests": len({id(r.job) for r in self._rows}),
                "queued": len(self.scheduler.queue),
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
                while not self._closing and not self.scheduler.queue and not self._rows:
                    self._cv.wait()
                if self._closing:
                    break
                dropped, joining = self.scheduler.take(len(self._rows))
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

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the new jobs, take each one's first token, and join their rows to the batch."""
        live = [job for job in jobs if not job.cancelled]
        for job in jobs:
            if job.cancelled:
                self._job_over(job, job.n)
        new_rows = []
        for group in self.scheduler.prefill_groups(live):
            try:
                prefilled = self.prefill(group)
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                for job in group:
                    job.on_event(Event("error", text=f"generation failed: {type(e).__name__}: {e}"))
                    self._job_over(job, job.n)
                continue
            for job, (kv, logits) in zip(group, prefilled):
                for index in range(job.n):
                    row = Row(job, index, self.tokenizer, kv, len(job.prompt), self.model.device)
                    row.advance(logits, self.stop_ids)
                    if row.reason is None:
                        new_rows.append(row)
                    else:
                        self._job_over(job, 1)
        if new_rows:
            self.cache.join([(r.kv, r.length) for r in new_rows], self.model.device)
            for r in new_rows:
                r.kv = None
            with self._cv:
                self._rows = self._rows + new_rows

    def _step(self) -> None:
        """One decode step: every row's last token in, every row's next token out."""
        import torch

        device = self.model.device
        rows = self._rows
        ids = torch.tensor([[r.next_token] for r in rows], device=device)
        positions = torch.tensor([[r.length] for r in rows], device=device)
        self.cache.grow()
        self.packed.on = 2 <= len(rows) <= self.packed.rows
        try:
            logits = self.forward(
                ids, self.cache.mask, positions, self.cache.cache, [r.job.adapter for r in rows]
            )
        finally:
            self.packed.on = False
        self.steps += 1
        for r, row_logits in zip(rows, logits):
            r.length += 1
            r.advance(row_logits, self.stop_ids)

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
        with self._cv:
            self._rows = [self._rows[k] for k in keep]
        self.cache.select(keep)
        for r in gone:
            self._job_over(r.job, 1)

    def _job_over(self, job: Job, rows: int) -> None:
        job._rows_left -= rows
        if job._rows_left == 0:
            job.on_event(Event("done"))
            job.done.set()

    def _fail_batch(self, message: str) -> None:
        jobs = {id(r.job): r.job for r in self._rows}
        with self._cv:
            self._rows = []
        self.cache.clear()
        for job in jobs.values():
            job.on_event(Event("error", text=message))
            job._rows_left = 1
            self._job_over(job, 1)

    def _shut_down(self) -> None:
        with self._cv:
            waiting = self.scheduler.drain()
        self._fail_batch("the server is shutting down")
        for job in waiting:
            job.on_event(Event("error", text="the server is shutting down"))
            self._job_over(job, job.n)
