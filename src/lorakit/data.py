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

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import LorakitError

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
# Reading rows


def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    """Rows of a JSONL file as (\"file:line\", object); every problem is an error naming file:line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LorakitError(f"dataset file not found: {path} (check --dataset)")
    rows: list[tuple[str, dict]] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LorakitError(f"{where}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LorakitError(f"{where}: invalid JSON at column {e.colno} ({e.msg}); one JSON object per line") from None
            if not isinstance(obj, dict):
                raise LorakitError(f"{where}: a row must be a JSON object, got {type(obj).__name__}")
            rows.append((where, obj))
    if not rows:
        raise LorakitError(f"{path}: no rows (expected one JSON object per line)")
    return rows


def _text(row: dict, key: str, where: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise LorakitError(f"{where}: missing key '{key}' (an instruction row needs instruction, output and optionally input)")
        return ""
    if not isinstance(value, str):
        raise LorakitError(f"{where}: key '{key}' must be a string, got {type(value).__name__}")
    return value


def row_to_messages(row: dict, where: str, system_prompt: str) -> list[dict[str, str]]:
    """An `instruction`/`input`/`output` row (optional `system`) or a `messages` row -> chat messages.

    The user turn is the instruction, a blank line and the input (the guide's format); with an
    empty input it is the instruction alone, with no trailing blank line.
    """
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise LorakitError(f"{where}: key 'messages' must be a non-empty list of {{role, content}} objects")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise LorakitError(f"{where}: messages[{i}] must be {{\"role\": system|user|assistant, \"content\": string}}")
            out.append({"role": m["role"], "content": m["content"]})
        if system_prompt and out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": system_prompt})
    else:
        instruction = _text(row, "instruction", where)
        user = instruction
        extra = _text(row, "input", where, required=False)
        if extra.strip():
            user = f"{instruction}\n\n{extra}"
        output = _text(row, "output", where)
        system = _text(row, "system", where, required=False) or system_prompt
        out = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": output},
        ]
        if not instruction.strip():
            raise LorakitError(f"{where}: key 'instruction' is empty")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise LorakitError(f"{where}: no non-empty assistant answer ('output'): nothing to learn from this row")
    return out


# --------------------------------------------------------------------------------------------
# Template rendering and masking


class ChatFormat:
    """The tokenizer's chat template, with what the masking and inference need to know about it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.fallback = not getattr(tokenizer, "chat_template", None)
        if self.fallback:
            print("lorakit: the tokenizer has no chat template; using ChatML (<|im_start|>role ... <|im_end|>)", flush=True)
            tokenizer.chat_template = CHATML_TEMPLATE
        # Tokens the tokenizer itself puts before any text (BOS for Llama-style tokenizers).
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.prefix_ids: list[int] = with_special[: len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []
        self.special_ids = set(tokenizer.all_special_ids) | {
            i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
        }
        self.end_of_turn_id = self._probe_end_of_turn()

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _probe_end_of_turn(self) -> int | None:
        """The special token the template writes after an assistant's content (e.g. <|im_end|>)."""
        msgs = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
        delta = self.render(msgs)[len(self.render(msgs[:1], add_generation_prompt=True)):]
        ids = self._supervised_span(delta, "pong")[0]
        end = next((i for i in ids if i in self.special_ids), None)
        return end if end is not None else self.tokenizer.eos_token_id

    def stop_ids(self) -> list[int]:
        ids = [self.end_of_turn_id, self.tokenizer.eos_token_id]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _supervised_span(self, delta: str, content: str) -> tuple[list[int], list[int]]:
        """Split an assistant turn's text into (supervised ids, unsupervised trailing ids)."""
        enc = self.tokenizer(delta, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
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

    def encode_conversation(self, messages: list[dict]) -> tuple[list[int], list[int], bool]:
        """(input_ids, labels, boundary_merge) for a conversation; loss on every assistant turn."""
        ids: list[int] = []
        labels: list[int] = []
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
            before = self._encode(prompt[len(done) :])
            sup, trailing = self._supervised_span(full[len(prompt) :], msg["content"])
            if not any(t in self.special_ids for t in sup) and self.tokenizer.eos_token_id is not None:
                sup = sup + [self.tokenizer.eos_token_id]  # a template with no end marker: teach EOS
            ids += before + sup + trailing
            labels += [IGNORE_INDEX] * len(before) + sup + [IGNORE_INDEX] * len(trailing)
            done = full
        full_ids = self._encode(done)
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
    dropped_overlength: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    boundary_merges: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    max_length: int = 0

    def summary(self) -> str:
        frac = self.supervised_tokens / max(self.tokens, 1)
        s = (f"{self.kept}/{self.rows} rows, {self.tokens} tokens ({frac:.0%} supervised), longest {self.max_length}")
        if self.dropped_overlength:
            s += f"; dropped {len(self.dropped_overlength)} over max_seq_length (first: {self.dropped_overlength[0]})"
        if self.truncated:
            s += f"; truncated {len(self.truncated)} to max_seq_length"
        return s


def encode_rows(rows: list[tuple[str, dict]], tokenizer, system_prompt: str, max_seq_length: int,
                overlength: str = "drop", chat: ChatFormat | None = None) -> tuple[list[dict[str, Any]], DataReport]:
    chat = chat or ChatFormat(tokenizer)
    report = DataReport(rows=len(rows))
    examples: list[dict[str, Any]] = []
    for where, row in rows:
        ids, labels, merged = chat.encode_conversation(row_to_messages(row, where, system_prompt))
        report.boundary_merges += merged
        if len(ids) > max_seq_length:
            if overlength == "error":
                raise LorakitError(f"{where}: {len(ids)} tokens > max_seq_length {max_seq_length}; raise --max_seq_length or use --overlength drop|truncate")
            if overlength == "drop":
                report.dropped_overlength.append(where)
                continue
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            if all(label == IGNORE_INDEX for label in labels):
                report.dropped_overlength.append(where)  # truncation would cut the whole answer
                continue
            report.truncated.append(where)
        examples.append({"input_ids": ids, "labels": labels, "source": where})
        report.tokens += len(ids)
        report.supervised_tokens += sum(label != IGNORE_INDEX for label in labels)
        report.max_length = max(report.max_length, len(ids))
    report.kept = len(examples)
    if not examples:
        raise LorakitError(f"no trainable rows left: all {report.rows} exceed max_seq_length {max_seq_length} (raise --max_seq_length)")
    return examples, report


class Collator:
    """Right-pads a batch to its longest row.

    Labels are padded with -100 by position, never derived by comparing ids with the pad id:
    SmolLM2 (and many chat models) use one id for pad and EOS, and masking by id would hide
    every EOS from the loss, so the model would never learn to stop.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: list[dict]) -> dict:
        import torch

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
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
