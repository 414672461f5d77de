"""The chat template's text of a conversation: the one rendering of training and inference.

Renderer holds what the probes found about rendering (the variables a template reads from its
caller, whether it has a system role, whether the compiled template may be called directly) and
turns what a template raises into one-line LorakitErrors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.errors import LorakitError


def direct_renderer(tokenizer, variables: dict[str, Any]) -> Callable[[list[dict], bool], str] | None:
    """The compiled template called directly, with what apply_chat_template passes it for plain
    {role, content} messages: its per-call conversion of the messages, tools and special tokens is
    over half the cost of a render, and a conversation is rendered at least twice. None where the
    private helper of transformers is gone or changed. Whether it renders as apply_chat_template
    does is for the caller to check (probe.renders_directly)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(tokenizer.chat_template)  # cached by transformers
    except Exception:  # a private helper of transformers: gone or changed means not used
        return None
    context = {**tokenizer.special_tokens_map, **variables}
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

    return render


class Renderer:
    """The tokenizer's chat template as lorakit renders it, training and inference alike."""

    def __init__(
        self, tokenizer, variables: dict[str, Any], system_folded: bool = False, direct: bool = True
    ):
        import jinja2

        self.tokenizer = tokenizer
        self.variables = variables  # passed to every rendering (probe.template_variables)
        self.system_folded = system_folded  # no system role: the system prompt goes into the first user turn
        # What a template raises on input it cannot render (raise_exception, an undefined
        # variable, iterating None): turned into one-line LorakitErrors by apply.
        self.errors = (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError)
        self.direct = direct_renderer(tokenizer, variables) if direct else None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The template's text of a conversation: the one rendering of training and inference."""
        if self.system_folded:
            messages = self.fold_system(messages)
        return self.apply(messages, add_generation_prompt, self.variables)

    def apply(self, messages: list[dict], add_generation_prompt: bool, variables: dict) -> str:
        """The template's text of the messages as given, with these variables (the direct
        renderer only with the renderer's own)."""
        try:
            if self.direct is not None and variables is self.variables:
                return self.direct(messages, add_generation_prompt)
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **variables
            )
        except self.errors as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LorakitError(f"the chat template cannot render this conversation: {reason}") from None

    @staticmethod
    def fold_system(messages: list[dict]) -> list[dict]:
        """The system prompt at the start of the first user turn, for a template without a
        system role."""
        if not messages or messages[0]["role"] != "system":
            return messages
        system, rest = messages[0]["content"], messages[1:]
        if rest and rest[0]["role"] == "user":
            return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
        return [{"role": "user", "content": system}, *rest]
