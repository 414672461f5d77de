"""Row formats -> chat messages: alpaca, chat (messages), sharegpt, completion and text rows,
detected from each row's keys, checked with file:line errors; the data report.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import LorakitError

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


# --------------------------------------------------------------------------------------------
# The data report: what reading, checking and encoding a dataset found


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
    split_conversations: int = (
        0  # conversations trained as several rows (the template rewrites earlier turns)
    )
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
        if self.split_conversations:
            s += (
                f"; {self.split_conversations} conversations trained as one row per run of turns "
                "(the chat template rewrites earlier turns)"
            )
        return s
