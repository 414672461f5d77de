"""What the masking and inference need to know about a tokenizer's chat template, found once by
rendering and tokenizing small probe conversations (TemplateFacts, from probe_template).

The probes depend on each other: the variables a template needs come before any render, the
direct renderer is checked with them, the system role with the renderer, and the end-of-turn
token is read off a turn located with what the earlier probes found. probe_template runs them in
that order, once per ChatFormat.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.errors import LorakitError
from ..core.files import say
from ..core.sequences import common_prefix
from .mask import PLACEHOLDERS, TurnReader
from .render import Renderer
from .tokens import Tokens, special_pattern

# Used only when a tokenizer has no chat template; lorakit says so when it happens.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Variables some templates read from their caller rather than from the messages: a template
# that fails without one gets it (firefunction reads `functions`, a JSON list, and `datetime`).
CALLER_VARIABLES: dict[str, Callable[[datetime.datetime], str]] = {
    "functions": lambda now: "[]",
    "datetime": lambda now: now.strftime("%Y-%m-%d"),
}


@dataclass(frozen=True)
class TemplateFacts:
    """What the probes found about a tokenizer and its chat template."""

    fallback: bool  # the tokenizer had no chat template: ChatML is used
    prefix_ids: list[int]  # tokens the tokenizer itself puts before any text (BOS, Llama-style)
    special_ids: set[int]
    special_texts: list[str]  # the special tokens' texts, longest first
    variables: dict[str, Any]  # passed to every rendering (template_variables)
    direct: bool  # the compiled template, called directly, renders as apply_chat_template does
    system_folded: bool  # no system role: the system prompt goes into the first user turn
    batched: bool  # the Rust tokenizer, called directly, gives the HF call's ids and offsets
    openers: frozenset[str]  # the generation prompt's special tokens (an assistant header)
    turn_suffix: str  # what the template writes after the content of a conversation's last answer
    end_of_turn_id: int | None  # the special token that ends an assistant's output (else EOS)
    template_writes_bos: bool  # the template writes the tokenizer's prefix (BOS) itself


def probe_template(tokenizer) -> TemplateFacts:
    """The facts of a tokenizer's chat template (ChatML where it has none), each probe using
    what the ones before it found."""
    fallback = not getattr(tokenizer, "chat_template", None)
    if fallback:
        say("lorakit: the tokenizer has no chat template; using ChatML (<|im_start|>role ... <|im_end|>)")
        tokenizer.chat_template = CHATML_TEMPLATE
    prefix_ids = _prefix_ids(tokenizer)
    special_ids = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    special_texts = sorted({tokenizer.convert_ids_to_tokens(i) for i in special_ids}, key=len, reverse=True)
    variables = template_variables(tokenizer)
    direct = renders_directly(Renderer(tokenizer, variables))
    system_folded = not _has_system_role(Renderer(tokenizer, variables, direct=direct))
    if system_folded:
        say(
            "lorakit: the chat template has no system role; a system prompt goes at the start of "
            "the first user turn (as the model's authors advise)"
        )
    renderer = Renderer(tokenizer, variables, system_folded, direct)
    batched = backend_matches(tokenizer, renderer, special_texts)
    openers = _generation_prompt_specials(renderer, special_pattern(special_texts))
    turn_suffix = _turn_suffix(renderer)
    tokens = Tokens(tokenizer, batched, prefix_ids)
    reader = TurnReader(renderer.render, special_texts, openers, turn_suffix)
    end_of_turn_id = _end_of_turn_id(reader, tokens, special_ids)
    probe = tokens.encode(renderer.render([{"role": "user", "content": "x"}], add_generation_prompt=True))
    writes_bos = bool(prefix_ids) and probe[: len(prefix_ids)] == prefix_ids
    if writes_bos:
        # Tokenizing such a render with add_special_tokens=True (what many scripts do) gives
        # <bos><bos>; lorakit adds none of its own here.
        say("lorakit: the chat template writes BOS itself; not adding a second one")
    return TemplateFacts(
        fallback=fallback,
        prefix_ids=prefix_ids,
        special_ids=special_ids,
        special_texts=special_texts,
        variables=variables,
        direct=direct,
        system_folded=system_folded,
        batched=batched,
        openers=openers,
        turn_suffix=turn_suffix,
        end_of_turn_id=end_of_turn_id,
        template_writes_bos=writes_bos,
    )


def _prefix_ids(tokenizer) -> list[int]:
    """Tokens the tokenizer itself puts before any text (BOS for Llama-style tokenizers)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[: len(with_special) - len(plain)] if with_special[-len(plain) :] == plain else []


def template_variables(tokenizer) -> dict[str, Any]:
    """Variables passed to every rendering. A template that reads today's date both from
    `date_string` and from the clock (Llama 3.2) gets it once, so that two renders of one
    conversation agree even across midnight. (A template that only calls the clock cannot be
    pinned: apply_chat_template turns passed functions into strings.) A template that fails
    on a one-message conversation gets the caller variables it names, or an empty tool list
    (templates that loop over `tools` without checking it)."""
    now = datetime.datetime.now()
    template = tokenizer.chat_template
    variables: dict[str, Any] = {}
    clock = re.findall(r"strftime_now\(\s*[\"']([^\"']+)[\"']\s*\)", template)
    if "date_string" in template and len(set(clock)) == 1:
        variables["date_string"] = now.strftime(clock[0])
    probe = [{"role": "user", "content": "x"}]
    renderer = Renderer(tokenizer, {}, direct=False)  # through apply_chat_template, as errors go
    while True:
        try:
            renderer.apply(probe, True, variables)
            return variables
        except LorakitError as e:
            missing = re.search(r"'(\w+)' is undefined", str(e))
            if missing and missing[1] in CALLER_VARIABLES and missing[1] not in variables:
                variables[missing[1]] = CALLER_VARIABLES[missing[1]](now)
            elif "tools" not in variables:
                variables["tools"] = []
            else:
                raise LorakitError(f"{e} (a one-message conversation)") from None


def renders_directly(renderer: Renderer) -> bool:
    """Whether the renderer's direct call of the compiled template renders probe conversations
    exactly as apply_chat_template does, failing alike where it fails (else every render goes
    through apply_chat_template)."""
    if renderer.direct is None:
        return False

    def outcome(fn, msgs, gen):
        try:
            return fn(msgs, gen)
        except Exception as e:  # both ways must fail alike
            return type(e)

    def apply(msgs, gen):
        return renderer.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen, **renderer.variables
        )

    turns = [{"role": "user", "content": "Hi 1"}, {"role": "assistant", "content": " yo\n"}]
    probes = [turns[:1], [{"role": "system", "content": "S"}, *turns], turns + turns, turns]
    return all(outcome(renderer.direct, m, g) == outcome(apply, m, g) for m in probes for g in (False, True))


def _has_system_role(renderer: Renderer) -> bool:
    """Whether the template renders a system message (Gemma 2 raises; some drop it)."""
    marker = "lorakit system probe"
    msgs = [{"role": "system", "content": marker}, {"role": "user", "content": "x"}]
    try:
        return marker in renderer.apply(msgs, True, renderer.variables)
    except LorakitError:
        return False


def backend_matches(tokenizer, renderer: Renderer, special_texts: list[str]) -> bool:
    """Whether the Rust tokenizer behind a fast HF tokenizer, called directly, gives the ids
    and offsets the HF call gives (it does unless a tokenizer adds Python-side processing):
    then whole batches go to it in one call, which splits them over the machine's cores."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    probes = ["a", " Hello  world\n\n", "\tx\r\n12345 é日本 🙂", *special_texts[:8]]
    probes.append(
        renderer.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    )
    for text in probes:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        fast = backend.encode(text, add_special_tokens=False)
        if fast.ids != enc["input_ids"] or [tuple(o) for o in fast.offsets] != [
            tuple(o) for o in enc["offset_mapping"]
        ]:
            return False
    return True


def _generation_prompt_specials(renderer: Renderer, special_re: re.Pattern) -> frozenset[str]:
    """The special tokens of the generation prompt (an assistant header such as
    <|start_header_id|>): they open a turn, so they never end one."""
    user = [{"role": "user", "content": "x"}]
    prompt, history = renderer.render(user, add_generation_prompt=True), renderer.render(user)
    return frozenset(special_re.findall(prompt, common_prefix(prompt, history)))


def _turn_suffix(renderer: Renderer) -> str:
    """What the template writes after the content of a conversation's last answer."""
    answered = [{"role": "user", "content": "x"}, {"role": "assistant", "content": PLACEHOLDERS[0]}]
    text = renderer.render(answered)
    k = text.rfind(PLACEHOLDERS[0])
    return text[k + len(PLACEHOLDERS[0]) :] if k >= 0 else ""


def _end_of_turn_id(reader: TurnReader, tokens: Tokens, special_ids: set[int]) -> int | None:
    """The special token that ends an assistant's output (e.g. <|im_end|>); else EOS."""
    msgs = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    turn = reader.turn(msgs, 1)
    ids = tokens.encode(turn.answer[: turn.produced]) if turn.marked else []
    return ids[-1] if ids and ids[-1] in special_ids else tokens.tokenizer.eos_token_id
