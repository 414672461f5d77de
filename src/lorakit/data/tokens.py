"""The tokenizer calls of the masking: texts -> ids (and character offsets), without special
tokens added, in whole batches where the Rust tokenizer can take them; BOS added once.
"""

from __future__ import annotations

import re


def special_pattern(special_texts: list[str]) -> re.Pattern:
    """A regex of the special tokens' texts, longest first (so that `<|im_end|>` is not read as a
    shorter token it starts with); one that matches nothing where there are none."""
    return re.compile("|".join(re.escape(t) for t in special_texts if t) or "(?!)")


class Tokens:
    """Token ids of texts, the way inference tokenizes them."""

    def __init__(self, tokenizer, batched: bool = False, prefix_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        # Whether whole batches go to the Rust tokenizer behind a fast HF tokenizer in one call
        # (probe.backend_matches: where it gives the HF call's ids and offsets).
        self.batched = batched
        self.prefix_ids = (
            [] if prefix_ids is None else prefix_ids
        )  # what the tokenizer itself puts before any text (BOS)

    def tokenize(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character offsets) of each text, without special tokens added."""
        if self.batched:
            encodings = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
            return [(e.ids, e.offsets) for e in encodings]
        out = []
        for text in texts:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            out.append((enc["input_ids"], enc["offset_mapping"]))
        return out

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens added (no offsets: cheaper)."""
        if self.batched:
            backend = self.tokenizer.backend_tokenizer
            # encode_batch_fast (tokenizers >= 0.20) skips the character offsets: ~15% less work
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

    def encode(self, text: str) -> list[int]:
        return self.ids([text])[0]

    def with_prefix(self, ids: list[int]) -> list[int]:
        # Templates such as Llama 3's write BOS themselves; adding the tokenizer's BOS as well
        # would give the duplicated <bos><bos> that silently hurts quality.
        if self.prefix_ids and ids[: len(self.prefix_ids)] != self.prefix_ids:
            return self.prefix_ids + ids
        return ids
