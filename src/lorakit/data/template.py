"""Data: JSONL rows -> chat messages -> token ids with a loss mask taken from the chat template.

The mask comes from the tokenizer's own chat template, the way inference uses it: for each
assistant turn, the prompt is the template's render of the conversation before it with the
generation prompt (what generate, chat and serve feed the model), and what the model must produce
after it (read off the render that includes the turn) is supervised, up to and including the
template's end-of-turn token (e.g. `<|im_end|>`), so the model learns to stop. Every other token
(system, user, template scaffolding, ChatML's "\\n" after `<|im_end|>`) gets label -100. Templates
that open a thinking block in the generation prompt, move the system prompt, lack a system role
or rewrite earlier turns are handled in ChatFormat (see the notes above it).

The prompt is tokenized as one text, exactly as inference tokenizes it; the answer on its own, as
generation produces it token by token. Rows whose tokens differ from tokenizing their whole text
at once (a merge across the boundary) are counted.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from ..core.errors import LorakitError
from ..core.files import say
from ..core.labels import IGNORE_INDEX

# Used only when a tokenizer has no chat template; lorakit says so when it happens.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------
# Template rendering and masking
#
# A training row is built the way inference meets it. For each assistant turn i, the prompt is
# render(messages[:i], add_generation_prompt=True), exactly what generate/chat/serve feed the
# model, and the supervised text is what the model must produce after it, through the template's
# end-of-turn token, read off render(messages[:i + 1]) (_turn). Where the finished render does
# not simply extend the prompt (_answer):
#   - thinking templates whose generation prompt opens a block (`<think>\n`) that a finished
#     turn does not show: the answer is what the finished turn writes after the text both
#     renders share, appended to the prompt as it is (DeepSeek-R1, QwQ, GLM, Gemma 4, Cohere);
#   - templates that render the history differently once the assistant has answered (Mistral
#     writes the system prompt into the last user turn only; Command R moves tool instructions
#     after the last turn): the answer is located with placeholder answers and the prompt is
#     still the inference one.
# Templates with no system role (Gemma 2) get the system prompt at the start of the first user
# turn, as those models' authors advise, in training and inference alike (render). Variables a
# template expects from its caller (`tools`, firefunction's `functions`) are found by probing
# once (_template_variables).
#
# The end of the model's output (_end_of_turn) is the run of special tokens that first follows
# the answer (<|im_end|>; Cohere's <|END_TEXT|><|END_OF_TURN_TOKEN|>), not a header the template
# writes after a finished turn. A template that writes its end-of-turn token only when another
# turn follows (Apertus, GLM, Hunyuan) shows it in a render with one more user turn
# (_handed_back). Only where a template has no end token at all is EOS taught, once, at the end
# of a row: inside a conversation it would be text inference never sees.
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

# Variables some templates read from their caller rather than from the messages: a template
# that fails without one gets it (firefunction reads `functions`, a JSON list, and `datetime`).
CALLER_VARIABLES: dict[str, Callable[[datetime.datetime], str]] = {
    "functions": lambda now: "[]",
    "datetime": lambda now: now.strftime("%Y-%m-%d"),
}
# Placeholder answers that locate an answer's start when the template rewrites the history.
PLACEHOLDERS = ("Aplaceholder7", "Zplaceholder7")
_TAG_START = re.compile(r"<[\w/|.-]*\Z")  # an unclosed `<think`-like tag at the end of a text
_TAG_END = re.compile(r"[\w/|.-]*>")
BOUNDARY_WINDOW = 32  # characters each side of a prompt/answer boundary checked for merges


class _Turn(NamedTuple):
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


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


class ChatFormat:
    """The tokenizer's chat template, with what the masking and inference need to know about it."""

    def __init__(self, tokenizer):
        import jinja2

        self.tokenizer = tokenizer
        # What a template raises on input it cannot render (raise_exception, an undefined
        # variable, iterating None): turned into one-line LorakitErrors by _apply.
        self._template_errors = (
            jinja2.TemplateError,
            TypeError,
            ValueError,
            KeyError,
            AttributeError,
            IndexError,
        )
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
        self._special_re = re.compile("|".join(re.escape(t) for t in self.special_texts if t) or "(?!)")
        self._direct = None
        self.variables = self._template_variables()
        self._direct = self._direct_renderer()
        self.system_folded = not self._has_system_role()
        if self.system_folded:
            say(
                "lorakit: the chat template has no system role; a system prompt goes at the start of "
                "the first user turn (as the model's authors advise)"
            )
        self.batched = self._backend_matches()
        self._openers = self._generation_prompt_specials()
        self._turn_suffix = self._probe_turn_suffix()
        self.end_of_turn_id = self._probe_end_of_turn()
        probe = self._encode(self.render([{"role": "user", "content": "x"}], add_generation_prompt=True))
        self.template_writes_bos = bool(self.prefix_ids) and probe[: len(self.prefix_ids)] == self.prefix_ids
        if self.template_writes_bos:
            # Tokenizing such a render with add_special_tokens=True (what many scripts do) gives
            # <bos><bos>; lorakit adds none of its own here.
            say("lorakit: the chat template writes BOS itself; not adding a second one")

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The template's text of a conversation: the one rendering of training and inference."""
        if self.system_folded:
            messages = self._fold_system(messages)
        return self._apply(messages, add_generation_prompt, self.variables)

    def _apply(self, messages: list[dict], add_generation_prompt: bool, variables: dict) -> str:
        try:
            if self._direct is not None and variables is self.variables:
                return self._direct(messages, add_generation_prompt)
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **variables
            )
        except self._template_errors as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LorakitError(f"the chat template cannot render this conversation: {reason}") from None

    def _direct_renderer(self) -> Callable[[list[dict], bool], str] | None:
        """The compiled template called directly, with what apply_chat_template passes it for
        plain {role, content} messages: its per-call conversion of the messages, tools and
        special tokens is over half the cost of a render, and a conversation is rendered at
        least twice. Used only where it renders probe conversations exactly as
        apply_chat_template does (else None: every render goes through apply_chat_template)."""
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.tokenizer.chat_template)
        except Exception:  # a private helper of transformers: gone or changed means not used
            return None
        context = {**self.tokenizer.special_tokens_map, **self.variables}
        tools = context.pop("tools", None)

        def render(messages: list[dict], add_generation_prompt: bool) -> str:
            copies = [dict(m) for m in messages]  # a template may change what it is given
            return compiled.render(
                messages=copies,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **context,
            )

        def outcome(fn, msgs, gen):
            try:
                return fn(msgs, gen)
            except Exception as e:  # both ways must fail alike
                return type(e)

        def apply(msgs, gen):
            return self.tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=gen, **self.variables
            )

        turns = [{"role": "user", "content": "Hi 1"}, {"role": "assistant", "content": " yo\n"}]
        probes = [turns[:1], [{"role": "system", "content": "S"}, *turns], turns + turns, turns]
        same = all(outcome(render, m, g) == outcome(apply, m, g) for m in probes for g in (False, True))
        return render if same else None

    def _template_variables(self) -> dict[str, Any]:
        """Variables passed to every rendering. A template that reads today's date both from
        `date_string` and from the clock (Llama 3.2) gets it once, so that two renders of one
        conversation agree even across midnight. (A template that only calls the clock cannot be
        pinned: apply_chat_template turns passed functions into strings.) A template that fails
        on a one-message conversation gets the caller variables it names, or an empty tool list
        (templates that loop over `tools` without checking it)."""
        now = datetime.datetime.now()
        template = self.tokenizer.chat_template
        variables: dict[str, Any] = {}
        clock = re.findall(r"strftime_now\(\s*[\"']([^\"']+)[\"']\s*\)", template)
        if "date_string" in template and len(set(clock)) == 1:
            variables["date_string"] = now.strftime(clock[0])
        probe = [{"role": "user", "content": "x"}]
        while True:
            try:
                self._apply(probe, True, variables)
                return variables
            except LorakitError as e:
                missing = re.search(r"'(\w+)' is undefined", str(e))
                if missing and missing[1] in CALLER_VARIABLES and missing[1] not in variables:
                    variables[missing[1]] = CALLER_VARIABLES[missing[1]](now)
                elif "tools" not in variables:
                    variables["tools"] = []
                else:
                    raise LorakitError(f"{e} (a one-message conversation)") from None

    def _has_system_role(self) -> bool:
        """Whether the template renders a system message (Gemma 2 raises; some drop it)."""
        marker = "lorakit system probe"
        msgs = [{"role": "system", "content": marker}, {"role": "user", "content": "x"}]
        try:
            return marker in self._apply(msgs, True, self.variables)
        except LorakitError:
            return False

    @staticmethod
    def _fold_system(messages: list[dict]) -> list[dict]:
        """The system prompt at the start of the first user turn, for a template without a
        system role."""
        if not messages or messages[0]["role"] != "system":
            return messages
        system, rest = messages[0]["content"], messages[1:]
        if rest and rest[0]["role"] == "user":
            return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
        return [{"role": "user", "content": system}, *rest]

    def _generation_prompt_specials(self) -> set[str]:
        """The special tokens of the generation prompt (an assistant header such as
        <|start_header_id|>): they open a turn, so they never end one."""
        user = [{"role": "user", "content": "x"}]
        prompt, history = self.render(user, add_generation_prompt=True), self.render(user)
        return set(self._special_re.findall(prompt, _common_prefix(prompt, history)))

    def _probe_turn_suffix(self) -> str:
        """What the template writes after the content of a conversation's last answer."""
        answered = [{"role": "user", "content": "x"}, {"role": "assistant", "content": PLACEHOLDERS[0]}]
        text = self.render(answered)
        k = text.rfind(PLACEHOLDERS[0])
        return text[k + len(PLACEHOLDERS[0]) :] if k >= 0 else ""

    def _probe_end_of_turn(self) -> int | None:
        """The special token that ends an assistant's output (e.g. <|im_end|>)."""
        msgs = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
        turn = self._turn(msgs, 1)
        ids = self._encode(turn.answer[: turn.produced]) if turn.marked else []
        return ids[-1] if ids and ids[-1] in self.special_ids else self.tokenizer.eos_token_id

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
            backend = self.tokenizer.backend_tokenizer
            # encode_batch_fast (tokenizers >= 0.20) skips the character offsets: ~15% less work
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

    def _encode(self, text: str) -> list[int]:
        return self._ids([text])[0]

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
        """(input_ids, labels, boundary_merge) of a conversation that trains as one row (every
        conversation does with templates that render prefix by prefix); loss on every assistant
        turn (or only the last one)."""
        rows = self.encode_conversation_rows(messages, last_only)
        if len(rows) != 1:
            raise LorakitError(
                f"the chat template rewrites earlier turns, so this conversation trains as {len(rows)} "
                "rows; use encode_conversation_rows"
            )
        return rows[0]

    def encode_conversation_rows(
        self, messages: list[dict], last_only: bool = False
    ) -> list[tuple[list[int], list[int], bool]]:
        """The training rows of a conversation: (input_ids, labels, boundary_merge) each."""
        [result] = self.encode_conversations([messages], last_only)
        if isinstance(result, LorakitError):
            raise result
        return result

    def encode_conversations(
        self, conversations: list[list[dict]], last_only: bool = False
    ) -> list[list[tuple[list[int], list[int], bool]] | LorakitError]:
        """encode_conversation_rows for many conversations, with their texts tokenized in one
        batch; a conversation that cannot be encoded gets its LorakitError in its place."""
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
        tokens, ids = iter(self._tokenize(with_offsets)), iter(self._ids(plain))
        encoded = iter([self._assemble(row, tokens, ids) for row in rows])
        return [plan if isinstance(plan, LorakitError) else [next(encoded) for _ in plan] for plan in plans]

    @staticmethod
    def _boundary(turn: _Turn) -> list[str]:
        """The texts that tell whether the tokenizer merges across a row's prompt/answer boundary:
        the end of the prompt, the start of the answer, and both together. Pre-tokenization and
        merges act within a few characters, so 32 on each side stand for the whole row."""
        before, after = turn.prompt[-BOUNDARY_WINDOW:], turn.answer[:BOUNDARY_WINDOW]
        return [before, after, before + after]

    def _rows(self, messages: list[dict], last_only: bool) -> list[list[_Turn]]:
        """The assistant turns to supervise, grouped into training rows: a turn joins the row of
        the turn before it when its prompt continues that turn's text exactly as the model
        produced it; otherwise the template rewrote the history and a new row starts."""
        self.check_content(messages)
        indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        rows: list[list[_Turn]] = []
        for i in indices[-1:] if last_only else indices:
            turn = self._turn(messages, i)
            if rows and turn.prompt.startswith(rows[-1][-1].said()):
                rows[-1].append(turn)
            else:
                rows.append([turn])
        return rows

    def _turn(self, messages: list[dict], i: int) -> _Turn:
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
        return _Turn(i, prompt, answer, len(answer) if end is None else end, end is not None)

    def _answer(self, messages: list[dict], i: int, prompt: str, full: str) -> str:
        """The answer of turn i when the finished render does not extend the prompt."""
        history = self.render(messages[:i])  # the conversation before turn i, no generation prompt
        shared = _common_prefix(prompt, full)
        opening = prompt[len(history) :] if prompt.startswith(history) else None
        if opening and shared >= len(history):
            return self._reopened(messages[i]["content"], full, shared, len(history))
        # The history renders differently once the assistant has answered (Mistral writes the
        # system prompt into the last user turn only; Command R moves its tool instructions
        # after the last turn): placeholder answers show where the answer starts, and the text
        # before it must end as the prompt ends, so that the answer follows the prompt directly.
        a, b = (self.render([*messages[:i], {"role": "assistant", "content": p}]) for p in PLACEHOLDERS)
        start = _common_prefix(a, b)
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
        last = self._special_re.search(
            prompt, max(0, len(prompt) - len(self.special_texts[0] if self.special_texts else ""))
        )
        tail = prompt[last.start() :] if last and last.end() == len(prompt) else prompt[-4:]
        return before.endswith(tail)

    def _token_boundary(self, text: str, k: int) -> int:
        """k, moved back so as not to cut a special token or a tag such as `<think>` in two
        (`<think>` and `</think>` share their first character)."""
        lo = max(0, k - len(self.special_texts[0])) if self.special_texts else k
        for m in self._special_re.finditer(text, lo, min(len(text), k + (k - lo))):
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
        for m in self._special_re.finditer(answer, content_end):
            rest = answer[m.start() :]
            if end is not None and (m.start() != end or m.group() in self._openers or prompt.endswith(rest)):
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
        token = span and self._special_re.search(text, span[1], cut)
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
        body = text[: len(text) - len(self._turn_suffix)].rstrip() if last else ""
        if body.endswith(content) and len(body) - len(content) >= lo and text.endswith(self._turn_suffix):
            return len(body) - len(content), len(body)
        specials = [m.span() for m in self._special_re.finditer(text, lo)]
        for needle in dict.fromkeys((content, content.splitlines()[-1].strip() if content else "")):
            hi = len(text)
            while needle and (k := text.rfind(needle, lo, hi)) >= 0:
                if not any(s < k + len(needle) and k < e for s, e in specials):
                    return k, k + len(needle)
                hi = k + len(needle) - 1
        return None

    def _assemble(self, row: list[_Turn], tokens: Iterator, ids_of: Iterator):
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
        if not last.marked and self.tokenizer.eos_token_id is not None:
            output = output + [self.tokenizer.eos_token_id]  # no end marker: teach EOS, where inference stops
        ids = prompt_ids + output + answer_ids[n:]
        labels += output + [IGNORE_INDEX] * (len(answer_ids) - n)
        merged |= both != before + after
        with_prefix = self._with_prefix(ids)
        return with_prefix, [IGNORE_INDEX] * (len(with_prefix) - len(ids)) + labels, merged
