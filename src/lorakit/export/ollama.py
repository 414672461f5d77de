"""Ollama: the chat template rewritten as a Go text/template (TEMPLATE), and the Modelfile."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..core.config import ExportConfig
from ..core.errors import LorakitError

# Probe contents: characters no template writes itself, so each can be found in a render.
_U, _U2, _A, _S = "\x01U1\x01", "\x01U2\x01", "\x01A1\x01", "\x01S1\x01"


def _split(text: str, *markers: str) -> list[str]:
    """The literal pieces between the markers (each once, in order), or an error."""
    pieces = []
    for m in markers:
        if text.count(m) != 1:
            raise LorakitError(
                "the chat template rewrites message content; write the Modelfile TEMPLATE by hand"
            )
        before, text = text.split(m)
        pieces.append(before)
    return pieces + [text]


def _turn_end(ended: str, continued: str, special: list[str]) -> str:
    """The end of a user turn: what a render without the generation prompt writes after the user's
    content, as far as a render with it agrees (Phi-3 writes EOS instead of the prompt), cut back
    to a newline or the end of a special token."""
    common = os.path.commonprefix([ended, continued])
    if common == ended:
        return common
    cut = common.rfind("\n") + 1
    for token in special:
        at = common.rfind(token)
        if at >= 0:
            cut = max(cut, at + len(token))
    return common[:cut]


def _cuts_token(text: str, at: int, special: list[str]) -> bool:
    """Whether position `at` falls inside a special token's text."""
    for token in special:
        start = text.find(token)
        while start >= 0:
            if start < at < start + len(token):
                return True
            start = text.find(token, start + 1)
    return False


@dataclass
class ChatBlocks:
    """The literal text a chat template writes around each message, found by rendering probe
    conversations (Jinja cannot be translated to Go; its output for probes can be)."""

    head: str  # before the first user turn when there is no system message (a default system block)
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str  # the generation prompt after the last user turn
    system_head: str | None = None  # a system block: head with the system message ...
    system_tail: str = ""  # ... and after it (None: the template has no system role)
    system_in_user: str = ""  # "first" / "last": the system text opens that user message instead


def chat_blocks(tokenizer) -> ChatBlocks:
    from ..data.template import ChatFormat

    # Rendered as training and inference render: with the same template variables, and a system
    # prompt folded into the first user turn where the template has no system role (Gemma 2).
    chat = ChatFormat(tokenizer)

    def render(msgs):
        return chat.render(msgs, add_generation_prompt=True)

    def render_ended(msgs):
        return chat.render(msgs, add_generation_prompt=False)

    user, asst, user2 = (
        {"role": r, "content": c} for r, c in (("user", _U), ("assistant", _A), ("user", _U2))
    )
    h0, h1 = _split(render([user]), _U)
    t0, t1, t2, t3 = _split(render([user, asst, user2]), _U, _A, _U2)
    if (t0, t3) != (h0, h1):
        raise LorakitError(
            "the chat template writes a turn differently by position; write the TEMPLATE by hand"
        )
    user_end = _turn_end(_split(render_ended([user]), _U)[1], h1, chat.special_texts)
    if not t1.startswith(user_end):
        raise LorakitError("the chat template's turns do not follow one another; write the TEMPLATE by hand")
    asst_pre = t1[len(user_end) :]
    # The assistant's end + the next user's opening: split where the opening matches the first one.
    if t2.startswith(user_end) and h0.endswith(t2[len(user_end) :]):
        cut = len(user_end)
    else:
        cut = next(
            k
            for k in range(len(t2) + 1)
            if h0.endswith(t2[k:])
            and not _cuts_token(t2, k, chat.special_texts)
            and not _cuts_token(h0, len(h0) - len(t2) + k, chat.special_texts)
        )
    asst_end, user_pre = t2[:cut], t2[cut:]
    head = h0[: len(h0) - len(user_pre)]
    if chat.template_writes_bos and chat.prefix_ids:
        # The GGUF says add_bos_token: llama.cpp and Ollama put BOS before the prompt themselves.
        head = head.removeprefix(tokenizer.bos_token)
    blocks = ChatBlocks(head, (user_pre, user_end), (asst_pre, asst_end), h1[len(user_end) :])
    system = {"role": "system", "content": _S}
    try:
        s0, s1, s2 = _split(render([system, user]), _S, _U)
    except LorakitError:
        raise
    except Exception:  # the template refuses a system message (Gemma 2): the TEMPLATE drops it
        return blocks
    if chat.template_writes_bos and chat.prefix_ids:
        s0 = s0.removeprefix(tokenizer.bos_token)
    if s2 != h1:
        raise LorakitError("a system message changes the chat template's turns; write the TEMPLATE by hand")
    if s1.endswith(user_pre) and not s0.endswith(user_pre):
        blocks.system_head, blocks.system_tail = s0, s1[: len(s1) - len(user_pre)]
    elif s0 == head + user_pre:  # the system text opens a user message: the first one or the last one
        d = render([system, user, asst, user2])
        blocks.system_head, blocks.system_tail = "", s1
        blocks.system_in_user = "first" if d.index(_S) < d.index(_U) else "last"
    else:
        raise LorakitError(
            "the chat template places the system message in a way lorakit cannot express in Go"
        )
    return blocks


def _go_literal(text: str) -> str:
    """Literal text inside a Go template: only '{{' needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(tokenizer) -> str:
    """The training chat template as an Ollama (Go text/template) TEMPLATE over .System and .Messages.

    Ollama passes every system message joined as .System and all messages as .Messages. No
    whitespace-trimming actions ({{- ... }}): they would eat the newlines the template writes.
    Jinja-side content edits (`| trim`) have no Go equivalent: content is written as it is.
    """
    b = chat_blocks(tokenizer)
    lit = _go_literal
    if b.system_head is not None and not b.system_in_user:
        opening = (
            "{{ if .System }}"
            + lit(b.system_head)
            + "{{ .System }}"
            + lit(b.system_tail)
            + "{{ else }}"
            + lit(b.head)
            + "{{ end }}"
        )
    else:
        opening = lit(b.head)
    user_open = lit(b.user[0])
    if b.system_in_user == "first":
        opening += "{{ $first := true }}"
        user_open += (
            "{{ if and $first $.System }}{{ $.System }}"
            + lit(b.system_tail)
            + "{{ end }}{{ $first = false }}"
        )
    elif b.system_in_user == "last":
        user_open += (
            "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}"
            + lit(b.system_tail)
            + "{{ end }}"
        )
    return (
        opening
        + "{{ range $i, $m := .Messages }}"
        + '{{ if eq .Role "user" }}'
        + user_open
        + "{{ .Content }}"
        + lit(b.user[1])
        + '{{ else if eq .Role "assistant" }}'
        + lit(b.assistant[0])
        + "{{ .Content }}"
        + lit(b.assistant[1])
        + "{{ end }}{{ end }}"
        + lit(b.generation)
    )


def _quoted(value: str) -> str:
    if '"""' in value:
        raise LorakitError('a Modelfile value cannot contain """')
    return f'"""{value}"""'


def modelfile(from_line: str, tokenizer, system: str, cfg: ExportConfig, adapter_line: str = "") -> str:
    from ..data.template import ChatFormat

    chat = ChatFormat(tokenizer)
    stops = dict.fromkeys(tokenizer.convert_ids_to_tokens(i) for i in chat.stop_ids())
    lines = [f"FROM {from_line}"]
    if adapter_line:
        lines.append(f"ADAPTER {adapter_line}")
    lines.append(f"TEMPLATE {_quoted(ollama_template(tokenizer))}")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines += [
        f"PARAMETER temperature {cfg.temperature:g}",
        f"PARAMETER top_p {cfg.top_p:g}",
        f"PARAMETER top_k {cfg.top_k}",
    ]
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    return "\n".join(lines) + "\n"
