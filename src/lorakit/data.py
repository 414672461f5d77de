"""Data: JSONL rows -> chat messages -> token ids with a loss mask taken from the chat template.

The mask is derived by rendering the conversation prefix by prefix with the tokenizer's own chat
template: the text each assistant turn adds (between the render that ends with the generation
prompt and the render that includes the turn) is what the model must produce. Every other token
(system, user, template scaffolding) gets label -100. Inside an assistant turn, tokens are
supervised up to and including the template's end-of-turn token (e.g. `<|im_end|>`), so the model
learns to stop; whatever the template writes after it (ChatML's "\\n") is never generated at
inference and is not supervised.

Segments are tokenized one by one and concatenated: that is exactly what happens at inference,
where the prompt is tokenized alone and the answer is generated token by token. Tokenizing the
full render instead can merge tokens across a segment boundary; such rows are counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from .errors import LorakitError
from .io import say, world_size

IGNORE_INDEX = -100

# Used only when a tokenizer has no chat template; lorakit says so when it happens.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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


# --------------------------------------------------------------------------------------------
# Formats -> messages

FORMATS = ("alpaca", "chat", "sharegpt", "completion", "text")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
FORMAT_KEYS = {
    "alpaca": "instruction/input/output",
    "chat": "messages",
    "sharegpt": "conversations",
    "completion": "prompt/completion",
    "text": "text",
}


def detect_format(row: dict) -> str | None:
    """mlx-lm's rule: the keys of a row say its format."""
    if "messages" in row:
        return "chat"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "prompt" in row or "completion" in row:
        return "completion"
    if "text" in row:
        return "text"
    return None


@dataclass
class Sample:
    """A validated row: chat messages, or raw text for continued pre-training."""

    where: str
    format: str
    messages: list[dict[str, str]] | None = None
    text: str | None = None

    def key(self) -> str:
        """The content, unambiguously (each field length-prefixed), without the row's place."""
        if self.messages is None:
            return f"text\x1f{self.text}"
        return "\x1e".join(f"{m['role']}\x1f{len(m['content'])}\x1f{m['content']}" for m in self.messages)

    def digest(self) -> bytes:
        return hashlib.blake2b(self.key().encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _text(row: dict, key: str, where: str, *, required: bool = True, nonempty: bool = False) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise LorakitError(f"{where}: missing key '{key}'")
        return ""
    if not isinstance(value, str):
        raise LorakitError(f"{where}: key '{key}' must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise LorakitError(f"{where}: key '{key}' is empty")
    return value


def _check_messages(msgs: list[dict], where: str, key: str) -> list[dict]:
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i != 0:
            raise LorakitError(f"{where}: {key}[{i}]: a system message may only come first")
        if m["role"] == "assistant" and not m["content"].strip():
            raise LorakitError(
                f"{where}: {key}[{i}]: empty assistant content (nothing to learn); remove the turn or fill it"
            )
    if not any(m["role"] == "assistant" for m in msgs):
        raise LorakitError(f"{where}: '{key}' has no assistant turn: nothing to learn from this row")
    if msgs[-1]["role"] != "assistant":
        raise LorakitError(
            f"{where}: '{key}' ends with a {msgs[-1]['role']} turn; the last turn must be the assistant's"
        )
    return msgs


def _chat(row: dict, where: str) -> list[dict]:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise LorakitError(f"{where}: key 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise LorakitError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if m.get("role") not in ("system", "user", "assistant"):
            raise LorakitError(
                f"{where}: messages[{i}]: unknown role {m.get('role')!r} (use system, user or assistant)"
            )
        if not isinstance(m.get("content"), str):
            raise LorakitError(
                f"{where}: messages[{i}]: 'content' must be a string, got {type(m.get('content')).__name__}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return _check_messages(out, where, "messages")


def _sharegpt(row: dict, where: str) -> list[dict]:
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise LorakitError(
            f"{where}: key 'conversations' must be a non-empty list of {{from, value}} objects"
        )
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise LorakitError(f"{where}: conversations[{i}] must be an object with 'from' and 'value'")
        if t.get("from") not in SHAREGPT_ROLES:
            raise LorakitError(
                f"{where}: conversations[{i}]: unknown 'from' {t.get('from')!r} (use system, human or gpt)"
            )
        if not isinstance(t.get("value"), str):
            raise LorakitError(f"{where}: conversations[{i}]: 'value' must be a string")
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return _check_messages(out, where, "conversations")


def _alpaca(row: dict, where: str) -> list[dict]:
    """The guide's format: user = instruction, a blank line, input (the instruction alone if input is empty)."""
    instruction = _text(row, "instruction", where, nonempty=True)
    extra = _text(row, "input", where, required=False)
    output = _text(row, "output", where)
    if not output.strip():
        raise LorakitError(f"{where}: key 'output' is empty: no non-empty assistant answer to learn")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _completion(row: dict, where: str) -> list[dict]:
    prompt = _text(row, "prompt", where, nonempty=True)
    completion = _text(row, "completion", where)
    if not completion.strip():
        raise LorakitError(f"{where}: key 'completion' is empty: no non-empty assistant answer to learn")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def to_sample(row: dict, fmt: str, where: str, system_prompt: str) -> Sample:
    if fmt == "text":
        return Sample(where, fmt, text=_text(row, "text", where, nonempty=True))
    msgs = {"alpaca": _alpaca, "chat": _chat, "sharegpt": _sharegpt, "completion": _completion}[fmt](
        row, where
    )
    system = _text(row, "system", where, required=False) if fmt in ("alpaca", "completion") else ""
    system = system or system_prompt
    if system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}] + msgs
    return Sample(where, fmt, messages=msgs)


def row_to_messages(row: dict, where: str, system_prompt: str) -> list[dict[str, str]]:
    """Any chat-shaped row -> messages (the system prompt added unless the row has its own)."""
    fmt = detect_format(row)
    if fmt is None or fmt == "text":
        raise LorakitError(f"{where}: not a conversation row (keys: {', '.join(sorted(row)) or 'none'})")
    return to_sample(row, fmt, where, system_prompt).messages


def _file_of(where: str) -> str:
    return where.rsplit(":", 1)[0] if ":" in where else where.split("[")[0]


def iter_samples(
    rows: Iterable[tuple[str, Any]],
    dataset_format: str,
    system_prompt: str,
    skip_bad_rows: bool,
    report: DataReport,
) -> Iterator[Sample]:
    """Validate and convert rows one at a time, counting them and the bad ones in `report`.

    One format per file: with `auto`, the first row's keys fix it and a row of another format is
    an error naming its line. Without skip_bad_rows, the first bad row stops the samples; the
    rest are still read, to say how many are bad, then the whole dataset fails.
    """
    file_format: dict[str, tuple[str, str]] = {}
    yielded = 0
    for where, row in rows:
        report.rows += 1
        if isinstance(row, LorakitError):  # a line that is not a JSON object (kept by iter_jsonl)
            report.skipped.append(str(row))
            continue
        fmt = dataset_format if dataset_format != "auto" else detect_format(row)
        if fmt is not None:
            first = file_format.setdefault(_file_of(where), (fmt, where))
            if fmt != first[0]:  # never skippable: a mixed file is a wrong file
                raise LorakitError(
                    f"{where}: {fmt} row in a file of {first[0]} rows (first at {first[1]}); "
                    "one format per file, or --dataset_format to force one"
                )
        try:
            if fmt is None:
                raise LorakitError(
                    f"{where}: cannot tell the row's format from its keys ({', '.join(sorted(row)) or 'none'}); "
                    f"use one of: {'; '.join(FORMAT_KEYS.values())}"
                )
            sample = to_sample(row, fmt, where, system_prompt)
        except LorakitError as e:
            report.skipped.append(str(e))
            continue
        if skip_bad_rows or not report.skipped:
            yielded += 1
            yield sample
    bad = report.skipped
    if bad and not skip_bad_rows:
        more = f" (and {len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
        raise LorakitError(f"{bad[0]}{more}; fix it, or pass --skip_bad_rows to skip bad rows")
    if not yielded:
        raise LorakitError(
            f"no valid rows: all {report.rows} rows are bad (first: {bad[0] if bad else 'none'})"
        )


def to_samples(
    rows: list[tuple[str, dict]], dataset_format: str, system_prompt: str, skip_bad_rows: bool = False
) -> tuple[list[Sample], list[str]]:
    """iter_samples as a list; returns (samples, skipped-row messages)."""
    report = DataReport()
    samples = list(iter_samples(rows, dataset_format, system_prompt, skip_bad_rows, report))
    return samples, report.skipped


class Seen:
    """Which samples were seen, by a 16-byte hash of their content: ~100 bytes a row in memory,
    so exact duplicates are found in a million rows without holding the rows."""

    def __init__(self):
        self.hashes: set[bytes] = set()

    def add(self, sample: Sample) -> bool:
        """Record the sample; False if it was seen before."""
        h = sample.digest()
        if h in self.hashes:
            return False
        self.hashes.add(h)
        return True

    def __contains__(self, sample: Sample) -> bool:
        return sample.digest() in self.hashes


def iter_unique(samples: Iterable[Sample], seen: Seen, report: DataReport) -> Iterator[Sample]:
    """The samples not seen before (the first of each duplicate is kept); the dropped rows are
    listed in report.duplicates and the kept ones counted by format."""
    for s in samples:
        if seen.add(s):
            report.formats[s.format] = report.formats.get(s.format, 0) + 1
            yield s
        else:
            report.duplicates.append(s.where)


def dedupe(samples: list[Sample]) -> tuple[list[Sample], list[str]]:
    """Drop exact duplicates (same messages or text), keeping the first; returns the dropped rows."""
    report = DataReport()
    kept = list(iter_unique(samples, Seen(), report))
    return kept, report.duplicates


def validation_indices(n: int, val_size: float, seed: int) -> set[int]:
    """Which of n de-duplicated rows are held out for validation: deterministic under the seed;
    duplicates were removed first, so none cross the split."""
    import random

    if val_size <= 0:
        return set()
    k = int(val_size) if val_size >= 1 else max(1, round(n * val_size))
    if k >= n:
        raise LorakitError(f"--val_size {val_size:g} leaves no training rows ({n} rows after de-duplication)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[:k])


def split_validation(samples: list[Sample], val_size: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training, validation) samples, in their order (validation_indices)."""
    val_idx = validation_indices(len(samples), val_size, seed)
    return [s for i, s in enumerate(samples) if i not in val_idx], [
        s for i, s in enumerate(samples) if i in val_idx
    ]


# --------------------------------------------------------------------------------------------
# Template rendering and masking


class ChatFormat:
    """The tokenizer's chat template, with what the masking and inference need to know about it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.fallback = not getattr(tokenizer, "chat_template", None)
        if self.fallback:
            say("lorakit: the tokenizer has no chat template; using ChatML (<|im_start|>role ... <|im_end|>)")
            tokenizer.chat_template = CHATML_TEMPLATE
        # Tokens the tokenizer itself puts before any text (BOS for Llama-style tokenizers).
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.prefix_ids: list[int] = (
            with_special[: len(with_special) - len(plain)] if with_special[-len(plain) :] == plain else []
        )
        self.special_ids = set(tokenizer.all_special_ids) | {
            i
            for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
            if getattr(t, "special", False)
        }
        self.special_texts = sorted(
            {tokenizer.convert_ids_to_tokens(i) for i in self.special_ids}, key=len, reverse=True
        )
        self.batched = self._backend_matches()
        self.end_of_turn_id = self._probe_end_of_turn()
        probe = self._encode(self.render([{"role": "user", "content": "x"}], add_generation_prompt=True))
        self.template_writes_bos = bool(self.prefix_ids) and probe[: len(self.prefix_ids)] == self.prefix_ids
        if self.template_writes_bos:
            # Tokenizing such a render with add_special_tokens=True (what many scripts do) gives
            # <bos><bos>; lorakit adds none of its own here.
            say("lorakit: the chat template writes BOS itself; not adding a second one")

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _probe_end_of_turn(self) -> int | None:
        """The special token the template writes after an assistant's content (e.g. <|im_end|>)."""
        msgs = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
        delta = self.render(msgs)[len(self.render(msgs[:1], add_generation_prompt=True)) :]
        ids = self._supervised_span(delta, "pong")[0]
        end = next((i for i in ids if i in self.special_ids), None)
        return end if end is not None else self.tokenizer.eos_token_id

    def stop_ids(self) -> list[int]:
        ids = [self.end_of_turn_id, self.tokenizer.eos_token_id]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def _backend_matches(self) -> bool:
        """Whether the Rust tokenizer behind a fast HF tokenizer, called directly, gives the ids
        and offsets the HF call gives (it does unless a tokenizer adds Python-side processing):
        then whole batches go to it in one call, which splits them over the machine's cores."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return False
        probes = ["a", " Hello  world\n\n", "\tx\r\n12345 é日本 🙂", *self.special_texts[:8]]
        probes.append(
            self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
        )
        for text in probes:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            fast = backend.encode(text, add_special_tokens=False)
            if fast.ids != enc["input_ids"] or [tuple(o) for o in fast.offsets] != [
                tuple(o) for o in enc["offset_mapping"]
            ]:
                return False
        return True

    def _tokenize(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character offsets) of each text, without special tokens added."""
        if getattr(self, "batched", False):
            encodings = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
            return [(e.ids, e.offsets) for e in encodings]
        out = []
        for text in texts:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            out.append((enc["input_ids"], enc["offset_mapping"]))
        return out

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens added (no offsets: cheaper)."""
        if getattr(self, "batched", False):
            return [
                e.ids for e in self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
            ]
        return [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

    def _encode(self, text: str) -> list[int]:
        return self._ids([text])[0]

    def _supervised_span(self, delta: str, content: str) -> tuple[list[int], list[int]]:
        """Split an assistant turn's text into (supervised ids, unsupervised trailing ids)."""
        return self._split_turn(*self._tokenize([delta])[0], delta, content)

    def _split_turn(self, ids: list[int], offsets, delta: str, content: str) -> tuple[list[int], list[int]]:
        """(supervised ids, trailing ids) of an assistant turn's tokens: supervised up to and
        including the first special token after the content (its end of turn)."""
        content = content.strip()  # templates such as Llama 3's trim the content
        start = delta.find(content) if content else -1
        content_end = start + len(content) if start >= 0 else 0
        for k, (i, (s, _)) in enumerate(zip(ids, offsets)):
            if i in self.special_ids and s >= content_end:
                return ids[: k + 1], ids[k + 1 :]
        return ids, []

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a prompt at inference: the same rendering and BOS rule as training."""
        return self._with_prefix(self._encode(self.render(messages, add_generation_prompt=True)))

    def _with_prefix(self, ids: list[int]) -> list[int]:
        # Templates such as Llama 3's write BOS themselves; adding the tokenizer's BOS as well
        # would give the duplicated <bos><bos> that silently hurts quality.
        if self.prefix_ids and ids[: len(self.prefix_ids)] != self.prefix_ids:
            return self.prefix_ids + ids
        return ids

    def check_content(self, messages: list[dict]) -> None:
        """Special-token text inside a message would be parsed as the token itself (an early
        end of turn, a fake header): refuse it instead of training on a broken conversation."""
        for i, m in enumerate(messages):
            hit = next((t for t in self.special_texts if t and t in m["content"]), None)
            if hit:
                raise LorakitError(
                    f"message {i} ({m['role']}) contains the special token text {hit!r}; remove or escape it"
                )

    def encode_text(self, text: str) -> tuple[list[int], list[int]]:
        """Raw text (continued pre-training): loss on every token, EOS appended."""
        ids = self._encode(text)
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        full = self._with_prefix(ids + eos)
        n_prefix = len(full) - len(ids) - len(eos)
        return full, [IGNORE_INDEX] * n_prefix + full[n_prefix:]

    def encode_conversation(
        self, messages: list[dict], last_only: bool = False
    ) -> tuple[list[int], list[int], bool]:
        """(input_ids, labels, boundary_merge) for a conversation; loss on every assistant turn
        (or only the last one)."""
        [result] = self.encode_conversations([messages], last_only)
        if isinstance(result, LorakitError):
            raise result
        return result

    def encode_conversations(
        self, conversations: list[list[dict]], last_only: bool = False
    ) -> list[tuple[list[int], list[int], bool] | LorakitError]:
        """encode_conversation for many conversations, with their texts tokenized in one batch;
        a conversation that cannot be encoded gets its LorakitError in its place."""
        plans: list = []
        plain: list[str] = []  # the text before each turn, and each whole render
        deltas: list[str] = []  # each assistant turn's text (tokenized with offsets)
        for messages in conversations:
            try:
                turns, done = self._turns(messages)
            except LorakitError as e:
                plans.append(e)
                continue
            plans.append((turns, done))
            for before, delta, _, _ in turns:
                plain.append(before)
                deltas.append(delta)
            plain.append(done)
        plain_ids, delta_tokens = iter(self._ids(plain)), iter(self._tokenize(deltas))
        results: list = []
        for messages, plan in zip(conversations, plans):
            if isinstance(plan, LorakitError):
                results.append(plan)
                continue
            turns, _ = plan
            pieces = [(next(plain_ids), next(delta_tokens)) for _ in turns]
            results.append(self._assemble(messages, turns, pieces, next(plain_ids), last_only))
        return results

    def _turns(self, messages: list[dict]) -> tuple[list[tuple[str, str, str, int]], str]:
        """The texts of a conversation's assistant turns, rendered prefix by prefix: for each,
        (text before it, the turn's text, its content, its index); and the whole render."""
        self.check_content(messages)
        turns = []
        done = ""  # text rendered so far
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[: i + 1])
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise LorakitError(
                    "the chat template does not render conversations prefix by prefix "
                    "(a later turn changes earlier text), so the assistant tokens cannot be located"
                )
            turns.append((prompt[len(done) :], full[len(prompt) :], msg["content"], i))
            done = full
        return turns, done

    def _assemble(self, messages, turns, pieces, full_ids: list[int], last_only: bool):
        """Ids and labels from the tokenized turns: each segment tokenized alone, as inference
        sees it (the prompt alone, then the answer token by token)."""
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        ids: list[int] = []
        labels: list[int] = []
        for (_, delta, content, i), (before, (delta_ids, offsets)) in zip(turns, pieces):
            sup, trailing = self._split_turn(delta_ids, offsets, delta, content)
            if not any(t in self.special_ids for t in sup) and self.tokenizer.eos_token_id is not None:
                sup = sup + [self.tokenizer.eos_token_id]  # a template with no end marker: teach EOS
            ids += before + sup + trailing
            targets = sup if (i == last or not last_only) else [IGNORE_INDEX] * len(sup)
            labels += [IGNORE_INDEX] * len(before) + targets + [IGNORE_INDEX] * len(trailing)
        boundary_merge = full_ids != ids
        with_prefix = self._with_prefix(ids)
        labels = [IGNORE_INDEX] * (len(with_prefix) - len(ids)) + labels
        return with_prefix, labels, boundary_merge


# --------------------------------------------------------------------------------------------
# Datasets


@dataclass
class DataReport:
    rows: int = 0
    kept: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # bad rows (with --skip_bad_rows)
    duplicates: list[str] = field(default_factory=list)
    dropped_overlength: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    boundary_merges: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    lengths: list[int] = field(default_factory=list)  # token length of each kept row (before truncation)
    val_rows: int = 0
    val_leaks_removed: int = 0
    chatml_fallback: bool = False

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=0)

    def summary(self) -> str:
        frac = self.supervised_tokens / max(self.tokens, 1)
        s = f"{self.kept}/{self.rows} rows, {self.tokens} tokens ({frac:.0%} supervised), longest {self.max_length}"
        if self.val_rows:
            s += f", {self.val_rows} validation rows"
        if self.duplicates:
            s += f"; dropped {len(self.duplicates)} exact duplicates (first: {self.duplicates[0]})"
        if self.skipped:
            s += f"; skipped {len(self.skipped)} bad rows"
        if self.dropped_overlength:
            s += f"; dropped {len(self.dropped_overlength)} over max_seq_length (first: {self.dropped_overlength[0]})"
        if self.truncated:
            s += f"; truncated {len(self.truncated)} to max_seq_length"
        return s


ENCODE_CHUNK = 1024  # conversations tokenized per batched call
_WORKER_CHAT: ChatFormat | None = None  # the ChatFormat a forked worker inherits


def _encode_chunk(job: tuple[list[Sample], bool]) -> list:
    """(ids, labels, boundary_merge) or the LorakitError of each sample of a chunk."""
    chunk, last_only = job
    chat = _WORKER_CHAT
    results = iter(chat.encode_conversations([s.messages for s in chunk if s.text is None], last_only))
    out: list = []
    for s in chunk:
        if s.text is None:
            out.append(next(results))
            continue
        try:
            out.append((*chat.encode_text(s.text), False))
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
            ids, labels, merged = result
            report.boundary_merges += merged
            if all(label == IGNORE_INDEX for label in labels):
                raise LorakitError("no supervised token after rendering (the template dropped the answer)")
        except LorakitError as e:
            msg = str(e) if str(e).startswith(s.where) else f"{s.where}: {e}"
            if not skip_bad_rows:
                raise LorakitError(msg) from None
            report.skipped.append(msg)
            continue
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
    seen = Seen()
    samples = list(iter_unique(_config_samples(cfg, cfg.dataset, report), seen, report))
    if cfg.val_dataset:
        val = list(_val_samples(cfg, seen, report))
    else:
        samples, val = split_validation(samples, cfg.val_size, cfg.seed)
    return Samples(samples, val, report)


def count_samples(cfg) -> int:
    """How many training rows load_samples(cfg) would give, read as a stream (bounded memory)."""
    report = DataReport()
    seen = Seen()
    n = sum(1 for _ in iter_unique(_config_samples(cfg, cfg.dataset, report), seen, report))
    if cfg.val_dataset:
        return n
    return n - len(validation_indices(n, cfg.val_size, cfg.seed))


def _config_samples(cfg, dataset: str, report: DataReport, progress=None) -> Iterator[Sample]:
    rows = iter_rows(dataset or str(demo_path("train")), cfg.skip_bad_rows, progress)
    return iter_samples(rows, cfg.dataset_format, cfg.system_prompt or "", cfg.skip_bad_rows, report)


def _val_samples(cfg, train_seen: Seen, report: DataReport, progress=None) -> Iterator[Sample]:
    """The --val_dataset samples, de-duplicated, without those also in the training data (a
    validation row seen in training measures nothing), counted in report.val_leaks_removed."""
    val_report = DataReport()
    for s in iter_unique(_config_samples(cfg, cfg.val_dataset, val_report, progress), Seen(), val_report):
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

    With `cache`, the encoding is read from the data cache (datacache.py), or streamed into it
    once: rows are read, validated, de-duplicated and encoded a chunk at a time, so memory stays
    bounded at any dataset size. Without it (or when the cache cannot be written), `samples`
    (load_samples(cfg), or a function returning it; by default read from cfg) are encoded in
    memory. Both give the same rows, report and digest."""
    from . import datacache

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
    over: dict[int, str]  # row (in this chunk) -> file:line, for rows over max_seq_length
    errors: list[tuple[int, str]]  # (place, message)


def _encode_job(job: tuple) -> tuple[list, list]:
    """Encode a chunk of samples and write its rows into the entry folder (in a worker
    process, or inline for small data); returns per-row facts, small enough to send back."""
    from . import datacache

    name, start, chunk, last_only, max_seq_length, folder = job
    rows, facts, errors = [], [], []
    for k, (s, result) in enumerate(zip(chunk, _encode_chunk((chunk, last_only)))):
        if not isinstance(result, LorakitError) and all(t == IGNORE_INDEX for t in result[1]):
            result = LorakitError("no supervised token after rendering (the template dropped the answer)")
        if isinstance(result, LorakitError):
            errors.append(
                (start + k, str(result) if str(result).startswith(s.where) else f"{s.where}: {result}")
            )
            continue
        ids, labels, merged = result
        within = labels[:max_seq_length]
        over = s.where if len(ids) > max_seq_length else ""
        facts.append((start + k, len(ids), len(within) - within.count(IGNORE_INDEX), merged, over))
        rows.append({"input_ids": ids, "labels": labels, "source": s.where})
    datacache.write_rows(folder, name, rows)
    return facts, errors


def _chunk_of(name: str, facts: list, errors: list) -> _EncodedChunk:
    import numpy as np

    cols = list(zip(*facts)) or [(), (), (), (), ()]
    over = {j: where for j, where in enumerate(cols[4]) if where}
    return _EncodedChunk(
        name,
        np.asarray(cols[0], dtype=np.int64),
        np.asarray(cols[1], dtype=np.int64),
        np.asarray(cols[2], dtype=np.int64),
        np.asarray(cols[3], dtype=bool),
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
        count += len(facts) + len(errors)
        progress.add_rows(len(facts) + len(errors))
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
        report.skipped += [msg for place, msg in c.errors if selected[place]]
        parts.append((c.name, np.where(kept, np.minimum(c.n_tokens, max_seq_length), 0)))
    return parts


def _encode_into_cache(cfg, chat: ChatFormat, key: str, max_seq_length: int, train_on: str, files) -> tuple:
    """Stream the config's data into a new data cache entry; returns datacache.load(key)."""
    import numpy as np

    from . import datacache
    from .io import Progress, staging_dir

    report = DataReport(chatml_fallback=chat.fallback)
    seen = Seen()
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
    from . import datacache

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


class Collator:
    """Right-pads a batch to its longest row, or packs it into one row (padding_free).

    Labels are padded with -100 by position, never derived by comparing ids with the pad id:
    SmolLM2 (and many chat models) use one id for pad and EOS, and masking by id would hide
    every EOS from the loss, so the model would never learn to stop.

    Packed rows restart their position ids; with no attention mask, transformers derives a
    block-diagonal causal mask from them, so no token attends across a row boundary, and the
    first label of each row is -100 so no row predicts the next row's first token.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1, padding_free: bool = False):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of
        self.padding_free = padding_free

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        sources = [b.get("source") for b in batch]  # "file:line", so a NaN loss can name its rows
        if self.padding_free:
            ids = torch.tensor([t for b in batch for t in b["input_ids"]]).unsqueeze(0)
            labels = torch.tensor(
                [t for b in batch for t in ([IGNORE_INDEX] + list(b["labels"][1:]))]
            ).unsqueeze(0)
            positions = torch.tensor([p for b in batch for p in range(len(b["input_ids"]))]).unsqueeze(0)
            return {"input_ids": ids, "labels": labels, "position_ids": positions, "sources": sources}
        longest = max(len(b["input_ids"]) for b in batch)
        longest = -(-longest // self.multiple) * self.multiple
        ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "sources": sources}
