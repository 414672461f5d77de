"""The loss mask: each assistant turn read off the template's renders (TurnReader), conversations
grouped into training rows and tokenized with their labels (Masker).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import NamedTuple

from ..core.errors import LorakitError
from ..core.labels import IGNORE_INDEX
from ..core.sequences import common_prefix
from .tokens import Tokens, special_pattern

# --------------------------------------------------------------------------------------------
# Template rendering and masking
#
# A training row is built the way inference meets it. For each assistant turn i, the prompt is
# render(messages[:i], add_generation_prompt=True), exactly what generate/chat/serve feed the
# model, and the supervised text is what the model must produce after it, through the template's
# end-of-turn token, read off render(messages[:i + 1]) (TurnReader.turn). Where the finished
# render does not simply extend the prompt (TurnReader._answer):
#   - thinking templates whose generation prompt opens a block (`<think>\n`) that a finished
#     turn does not show: the answer is what the finished turn writes after the text both
#     renders share, appended to the prompt as it is (DeepSeek-R1, QwQ, GLM, Gemma 4, Cohere);
#   - templates that render the history differently once the assistant has answered (Mistral
#     writes the system prompt into the last user turn only; Command R moves tool instructions
#     after the last turn): the answer is located with placeholder answers and the prompt is
#     still the inference one.
# Templates with no system role (Gemma 2) get the system prompt at the start of the first user
# turn, as those models' authors advise, in training and inference alike (Renderer.render).
# Variables a template expects from its caller (`tools`, firefunction's `functions`) are found
# by probing once (probe.template_variables).
#
# The end of the model's output (TurnReader._end_of_turn) is the run of special tokens that
# first follows the answer (<|im_end|>; Cohere's <|END_TEXT|><|END_OF_TURN_TOKEN|>), not a header
# the template writes after a finished turn. A template that writes its end-of-turn token only
# when another turn follows (Apertus, GLM, Hunyuan) shows it in a render with one more user turn
# (TurnReader._handed_back). Only where a template has no end token at all is EOS taught, once,
# at the end of a row: inside a conversation it would be text inference never sees.
#
# Templates that rewrite earlier turns (Qwen3 drops reasoning blocks from the history, gpt-oss
# ends past turns with <|end|> instead of <|return|>) cannot show every turn in one row as
# inference saw it. Such a conversation becomes one row per run of turns that do render prefix
# by prefix (one row per assistant turn at worst): every supervised token is what the model
# produced at that turn, at the cost of repeating the history (for n turns up to n times the
# tokens of one row). The alternative, one row from the final render, would either teach
# answers the model never gives (an earlier turn without its `<think></think>`) or leave
# those turns unsupervised. Templates that render prefix by prefix (ChatML, Llama 3, Gemma 2,
# most) keep one row per conversation and pay nothing.
#
# Tokens: a row's prompt is tokenized as one text, so the tokens before its last answer are
# exactly encode_prompt(messages[:last]); the answer is tokenized on its own, as generation
# produces it token by token. Earlier answers inside the prompt are supervised where their
# characters fall. A row whose tokens differ from tokenizing its whole text at once is counted
# as a boundary merge.

# Placeholder answers that locate an answer's start when the template rewrites the history.
PLACEHOLDERS = ("Aplaceholder7", "Zplaceholder7")
_TAG_START = re.compile(r"<[\w/|.-]*\Z")  # an unclosed `<think`-like tag at the end of a text
_TAG_END = re.compile(r"[\w/|.-]*>")
BOUNDARY_WINDOW = 32  # characters each side of a prompt/answer boundary checked for merges


class Turn(NamedTuple):
    """One assistant turn as inference meets it."""

    index: int  # the message's index in the conversation
    prompt: str  # render(messages[:index], add_generation_prompt=True): what inference feeds
    answer: str  # what training puts after the prompt: the model's output, then what the
    # template writes after its end-of-turn token (ChatML's "\n"), which is not supervised
    produced: int  # characters of `answer` the model produces (through the end-of-turn token)
    marked: bool  # whether a special token ends the output (else EOS is taught after it)

    def said(self) -> str:
        """The conversation's text once the model has produced this turn."""
        return self.prompt + self.answer[: self.produced]


class TurnReader:
    """Reads an assistant turn off the template's renders: the prompt inference feeds, the answer
    after it, and where the model's output ends."""

    def __init__(
        self,
        render: Callable[..., str],
        special_texts: list[str],
        openers: frozenset[str],
        turn_suffix: str,
    ):
        self.render = render  # Renderer.render
        self.special_texts = special_texts  # longest first
        self.special_re = special_pattern(special_texts)
        self.openers = openers  # the generation prompt's special tokens: they open a turn, never end one
        self.turn_suffix = turn_suffix  # what the template writes after a conversation's last answer

    def turn(self, messages: list[dict], i: int) -> Turn:
        prompt = self.render(messages[:i], add_generation_prompt=True)
        full = self.render(messages[: i + 1])
        content = messages[i]["content"].strip()  # templates such as Llama 3's trim it
        # The common case, rendered prefix by prefix: the answer is what the finished turn adds.
        answer = full[len(prompt) :] if full.startswith(prompt) else self._answer(messages, i, prompt, full)
        span = self._content_span(answer, content)
        if (
            span is not None
            and content not in answer
            and any(x.strip() not in answer for x in content.splitlines())
        ):
            raise LorakitError(
                f"message {i}: the chat template drops part of this assistant answer (reasoning "
                "before </think>?), so the answer as written cannot be trained; remove that part"
            )
        if span is None:
            raise LorakitError(
                f"message {i}: the chat template does not render this assistant answer as written "
                "(it drops or rewrites its text), so its tokens cannot be located"
            )
        end = self._end_of_turn(answer, span[1], prompt)
        if end is None:
            answer, end = self._handed_back(messages, i, answer, span[1])
        return Turn(i, prompt, answer, len(answer) if end is None else end, end is not None)

    def _answer(self, messages: list[dict], i: int, prompt: str, full: str) -> str:
        """The answer of turn i when the finished render does not extend the prompt."""
        history = self.render(messages[:i])  # the conversation before turn i, no generation prompt
        shared = common_prefix(prompt, full)
        opening = prompt[len(history) :] if prompt.startswith(history) else None
        if opening and shared >= len(history):
            return self._reopened(messages[i]["content"], full, shared, len(history))
        # The history renders differently once the assistant has answered (Mistral writes the
        # system prompt into the last user turn only; Command R moves its tool instructions
        # after the last turn): placeholder answers show where the answer starts, and the text
        # before it must end as the prompt ends, so that the answer follows the prompt directly.
        a, b = (self.render([*messages[:i], {"role": "assistant", "content": p}]) for p in PLACEHOLDERS)
        start = common_prefix(a, b)
        before = full[:start] if full[:start] == a[:start] else None
        if before is not None and opening and before.endswith(opening):
            return full[start:]
        if before is not None and opening == "" and self._ends_alike(prompt, before):
            return full[start:]
        if opening == "":
            # The template writes its generation prompt whatever add_generation_prompt says
            # (Command R7B): the finished turn replaces its end.
            return self._reopened(messages[i]["content"], full, shared, 0)
        raise LorakitError(
            f"message {i}: the chat template renders the earlier turns differently once the "
            "assistant has answered and opens the answer differently too; the answer cannot be located"
        )

    def _reopened(self, content: str, full: str, shared: int, lo: int) -> str:
        """The answer when the generation prompt opens something the finished turn does not
        show (`<think>\\n` where the finished turn writes `</think>answer`, or nothing): what the
        finished turn writes after the text both share, appended to the prompt unchanged. The
        shared text can run into the answer ("Here are my reasoning steps" and "Hello")."""
        span = self._content_span(full, content.strip(), lo)
        return full[self._token_boundary(full, min(shared, span[0] if span else shared)) :]

    def _ends_alike(self, prompt: str, before: str) -> bool:
        """Whether the text before an answer ends with the prompt's last special token (or, if
        the prompt ends in plain text, its last 4 characters)."""
        last = self.special_re.search(
            prompt, max(0, len(prompt) - len(self.special_texts[0] if self.special_texts else ""))
        )
        tail = prompt[last.start() :] if last and last.end() == len(prompt) else prompt[-4:]
        return before.endswith(tail)

    def _token_boundary(self, text: str, k: int) -> int:
        """k, moved back so as not to cut a special token or a tag such as `<think>` in two
        (`<think>` and `</think>` share their first character)."""
        lo = max(0, k - len(self.special_texts[0])) if self.special_texts else k
        for m in self.special_re.finditer(text, lo, min(len(text), k + (k - lo))):
            if m.start() < k < m.end():
                return m.start()
        tag = _TAG_START.search(text, max(0, k - 32), k)
        return tag.start() if tag and _TAG_END.match(text, k) else k

    def _end_of_turn(self, answer: str, content_end: int, prompt: str) -> int | None:
        """Where the model's output ends: after the run of adjacent special tokens that first
        follows the content (<|im_end|>; Cohere's <|END_TEXT|><|END_OF_TURN_TOKEN|>), stopping
        before a token of the generation prompt, or before text the prompt ends with: templates
        that write a header after the finished turn (firefunction, Command R) open no turn
        the model produces. None: no special token follows."""
        end = None
        for m in self.special_re.finditer(answer, content_end):
            rest = answer[m.start() :]
            if end is not None and (m.start() != end or m.group() in self.openers or prompt.endswith(rest)):
                break
            end = m.end()
        return end

    def _handed_back(
        self, messages: list[dict], i: int, answer: str, content_end: int
    ) -> tuple[str, int | None]:
        """(answer, end of the output) for a turn whose finished render shows no end-of-turn
        token: Apertus, GLM and Hunyuan write it only once another turn follows, and that token
        (<|assistant_end|>, GLM's <|user|>) is how the model hands the turn back. It is taken
        from a render where a user turn follows, when only whitespace separates it from the
        answer; otherwise there is none (EOS is taught at the end of the row)."""
        follow = [*messages[: i + 1], {"role": "user", "content": PLACEHOLDERS[0]}]
        try:
            text = self.render(follow, add_generation_prompt=True)
        except LorakitError:
            return answer, None
        cut = text.rfind(PLACEHOLDERS[0])
        span = self._content_span(text[:cut], messages[i]["content"].strip(), last=False)
        token = span and self.special_re.search(text, span[1], cut)
        if not token or text[span[1] : token.start()].strip():
            return answer, None
        answer = answer[:content_end] + text[span[1] : token.end()]
        return answer, len(answer)

    def _content_span(
        self, text: str, content: str, lo: int = 0, last: bool = True
    ) -> tuple[int, int] | None:
        """Where the content of a conversation's last message is in text[lo:]. Where the text
        ends as every finished conversation does (what the template writes after the last
        answer: `<|im_end|>\\n`, or Command R's tool instructions), just before that; else
        (or with last=False) its last occurrence that is not inside a special token (an answer
        "end" is not the `end` of <|im_end|>), or its last line where the template moved the
        rest (reasoning before </think>) elsewhere. None: not there."""
        body = text[: len(text) - len(self.turn_suffix)].rstrip() if last else ""
        if body.endswith(content) and len(body) - len(content) >= lo and text.endswith(self.turn_suffix):
            return len(body) - len(content), len(body)
        specials = [m.span() for m in self.special_re.finditer(text, lo)]
        for needle in dict.fromkeys((content, content.splitlines()[-1].strip() if content else "")):
            hi = len(text)
            while needle and (k := text.rfind(needle, lo, hi)) >= 0:
                if not any(s < k + len(needle) and k < e for s, e in specials):
                    return k, k + len(needle)
                hi = k + len(needle) - 1
        return None


class Masker:
    """Conversations -> training rows (input_ids, labels, boundary_merge): the prompt as inference
    tokenizes it, the answers supervised through their end-of-turn token, everything else -100."""

    def __init__(self, reader: TurnReader, tokens: Tokens):
        self.reader = reader
        self.tokens = tokens

    def check_content(self, messages: list[dict]) -> None:
        """Special-token text inside a message would be parsed as the token itself (an early
        end of turn, a fake header): refuse it instead of training on a broken conversation."""
        for i, m in enumerate(messages):
            hit = next((t for t in self.reader.special_texts if t and t in m["content"]), None)
            if hit:
                raise LorakitError(
                    f"message {i} ({m['role']}) contains the special token text {hit!r}; remove or escape it"
                )

    def encode_text(self, text: str) -> tuple[list[int], list[int]]:
        """Raw text (continued pre-training): loss on every token, EOS appended."""
        ids = self.tokens.encode(text)
        eos_id = self.tokens.tokenizer.eos_token_id
        eos = [eos_id] if eos_id is not None else []
        full = self.tokens.with_prefix(ids + eos)
        n_prefix = len(full) - len(ids) - len(eos)
        return full, [IGNORE_INDEX] * n_prefix + full[n_prefix:]

    def encode_conversations(
        self, conversations: list[list[dict]], last_only: bool = False
    ) -> list[list[tuple[list[int], list[int], bool]] | LorakitError]:
        """The training rows of each conversation, with their texts tokenized in one batch; a
        conversation that cannot be encoded gets its LorakitError in its place."""
        plans: list = []
        for messages in conversations:
            try:
                plans.append(self._rows(messages, last_only))
            except LorakitError as e:
                plans.append(e)
        rows = [row for plan in plans if not isinstance(plan, LorakitError) for row in plan]
        # Offsets only where characters must be mapped to tokens (an answer; a prompt holding
        # earlier answers): turning them into Python lists costs as much as the ids.
        with_offsets, plain = [], []
        for row in rows:
            (with_offsets if len(row) > 1 else plain).append(row[-1].prompt)
            with_offsets.append(row[-1].answer)
            plain += self._boundary(row[-1])
        tokens, ids = iter(self.tokens.tokenize(with_offsets)), iter(self.tokens.ids(plain))
        encoded = iter([self._assemble(row, tokens, ids) for row in rows])
        return [plan if isinstance(plan, LorakitError) else [next(encoded) for _ in plan] for plan in plans]

    @staticmethod
    def _boundary(turn: Turn) -> list[str]:
        """The texts that tell whether the tokenizer merges across a row's prompt/answer boundary:
        the end of the prompt, the start of the answer, and both together. Pre-tokenization and
        merges act within a few characters, so 32 on each side stand for the whole row."""
        before, after = turn.prompt[-BOUNDARY_WINDOW:], turn.answer[:BOUNDARY_WINDOW]
        return [before, after, before + after]

    def _rows(self, messages: list[dict], last_only: bool) -> list[list[Turn]]:
        """The assistant turns to supervise, grouped into training rows: a turn joins the row of
        the turn before it when its prompt continues that turn's text exactly as the model
        produced it; otherwise the template rewrote the history and a new row starts."""
        self.check_content(messages)
        indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        rows: list[list[Turn]] = []
        for i in indices[-1:] if last_only else indices:
            turn = self.reader.turn(messages, i)
            if rows and turn.prompt.startswith(rows[-1][-1].said()):
                rows[-1].append(turn)
            else:
                rows.append([turn])
        return rows

    def _assemble(self, row: list[Turn], tokens: Iterator, ids_of: Iterator):
        """(ids, labels, boundary_merge) of one row: its prompt tokenized as one text (the tokens
        inference feeds), then its last answer tokenized alone (as generation produces it).
        `tokens` and `ids_of` give the row's tokenized texts in encode_conversations' order."""
        last = row[-1]
        prompt_ids, offsets = next(tokens) if len(row) > 1 else (next(ids_of), [])
        answer_ids, answer_offsets = next(tokens)
        before, after, both = next(ids_of), next(ids_of), next(ids_of)
        labels = [IGNORE_INDEX] * len(prompt_ids)
        merged = False
        for turn in row[:-1]:  # earlier answers, supervised where their characters fall
            start, end = len(turn.prompt), len(turn.prompt) + turn.produced
            for k, (s, e) in enumerate(offsets):
                if start <= s < end:
                    labels[k] = prompt_ids[k]
                merged |= s < start < e or s < end < e
        n = sum(1 for s, _ in answer_offsets if s < last.produced)
        output = answer_ids[:n]
        eos_id = self.tokens.tokenizer.eos_token_id
        if not last.marked and eos_id is not None:
            output = output + [eos_id]  # no end marker: teach EOS, where inference stops
        ids = prompt_ids + output + answer_ids[n:]
        labels += output + [IGNORE_INDEX] * (len(answer_ids) - n)
        merged |= both != before + after
        with_prefix = self.tokens.with_prefix(ids)
        return with_prefix, [IGNORE_INDEX] * (len(with_prefix) - len(ids)) + labels, merged
