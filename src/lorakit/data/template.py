"""Data: JSONL rows -> chat messages -> token ids with a loss mask taken from the chat template.

The mask comes from the tokenizer's own chat template, the way inference uses it: for each
assistant turn, the prompt is the template's render of the conversation before it with the
generation prompt (what generate, chat and serve feed the model), and what the model must produce
after it (read off the render that includes the turn) is supervised, up to and including the
template's end-of-turn token (e.g. `<|im_end|>`), so the model learns to stop. Every other token
(system, user, template scaffolding, ChatML's "\\n" after `<|im_end|>`) gets label -100. Templates
that open a thinking block in the generation prompt, move the system prompt, lack a system role
or rewrite earlier turns are handled by the parts ChatFormat holds (see the notes in mask.py).

The prompt is tokenized as one text, exactly as inference tokenizes it; the answer on its own, as
generation produces it token by token. Rows whose tokens differ from tokenizing their whole text
at once (a merge across the boundary) are counted.
"""

from __future__ import annotations

from ..core.errors import LorakitError
from .mask import Masker, TurnReader
from .probe import TemplateFacts, probe_template
from .render import Renderer
from .tokens import Tokens


class ChatFormat:
    """The tokenizer's chat template, with what the masking and inference need to know about it:
    its facts, probed once (probe.TemplateFacts), and the parts built from them: the rendering
    (render.Renderer), the tokenizer calls (tokens.Tokens) and the masking (mask.Masker)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.facts: TemplateFacts = probe_template(tokenizer)
        facts = self.facts
        self.renderer = Renderer(tokenizer, facts.variables, facts.system_folded, facts.direct)
        self.tokens = Tokens(tokenizer, facts.batched, facts.prefix_ids)
        reader = TurnReader(self.renderer.render, facts.special_texts, facts.openers, facts.turn_suffix)
        self.masker = Masker(reader, self.tokens)

    # What other modules read: export, the data cache, `data check`.
    @property
    def fallback(self) -> bool:
        return self.facts.fallback

    @property
    def prefix_ids(self) -> list[int]:
        return self.facts.prefix_ids

    @property
    def special_ids(self) -> set[int]:
        return self.facts.special_ids

    @property
    def special_texts(self) -> list[str]:
        return self.facts.special_texts

    @property
    def variables(self) -> dict:
        return self.facts.variables

    @property
    def system_folded(self) -> bool:
        return self.facts.system_folded

    @property
    def end_of_turn_id(self) -> int | None:
        return self.facts.end_of_turn_id

    @property
    def template_writes_bos(self) -> bool:
        return self.facts.template_writes_bos

    @property
    def batched(self) -> bool:
        """Whether texts go to the Rust tokenizer in whole batches; set False for one HF call
        per text."""
        return self.tokens.batched

    @batched.setter
    def batched(self, value: bool) -> None:
        self.tokens.batched = value

    @property
    def _direct(self):
        return self.renderer.direct

    def _apply(self, messages: list[dict], add_generation_prompt: bool, variables: dict) -> str:
        return self.renderer.apply(messages, add_generation_prompt, variables)

    _fold_system = staticmethod(Renderer.fold_system)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The template's text of a conversation: the one rendering of training and inference."""
        return self.renderer.render(messages, add_generation_prompt)

    def stop_ids(self) -> list[int]:
        ids = [self.end_of_turn_id, self.tokenizer.eos_token_id]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a prompt at inference: the same rendering and BOS rule as training."""
        return self.tokens.with_prefix(self.tokens.encode(self.render(messages, add_generation_prompt=True)))

    def check_content(self, messages: list[dict]) -> None:
        """Special-token text inside a message would be parsed as the token itself (an early
        end of turn, a fake header): refuse it instead of training on a broken conversation."""
        self.masker.check_content(messages)

    def encode_text(self, text: str) -> tuple[list[int], list[int]]:
        """Raw text (continued pre-training): loss on every token, EOS appended."""
        return self.masker.encode_text(text)

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
        return self.masker.encode_conversations(conversations, last_only)
