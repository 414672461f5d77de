"""llama.cpp's pre-tokenizer names and the split rules they stand for, in both directions.

A GGUF file names its pre-tokenizer (`tokenizer.ggml.pre`) instead of storing the split regex;
llama.cpp picks the regex by that name. Reading a GGUF (models/loading.py) needs name -> rule, so the HF
tokenizer splits text the way the model will run; writing one (export/gguf.py) needs rule -> name, so
the exported model splits text the way it was trained. Written by hand because neither `gguf`
nor `tokenizers` carries this table (llama.cpp keeps it in C++ and in its converter's hashes).
"""

from __future__ import annotations

import json

from ..core.errors import LorakitError

_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_TAIL = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Names whose rule is one Split regex followed by byte-level mapping.
PRE_TOKENIZER_REGEX = {
    "llama-bpe": _LETTERS + r"\p{N}{1,3}|" + _TAIL,
    "qwen2": _LETTERS + r"\p{N}|" + _TAIL,
}


def rule_for_name(name: str):
    """The `tokenizers` pre-tokenizer for a llama.cpp pre-tokenizer name (None if not known)."""
    from tokenizers import Regex, pre_tokenizers

    if name == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if name == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in PRE_TOKENIZER_REGEX:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEX[name]), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return None


def gguf_pre_name(gguf_path: str) -> str | None:
    """The `tokenizer.ggml.pre` value a GGUF file records (None if it records none)."""
    import gguf

    field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else None


def name_for_tokenizer(tokenizer, base_gguf: str = "") -> str:
    """The `tokenizer.ggml.pre` value for an HF tokenizer: an unknown or wrong one silently
    changes tokenization at inference. A base that came from a GGUF keeps the name it had."""
    if base_gguf:
        name = gguf_pre_name(base_gguf)
        if name is not None:
            return name
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds and kinds[0] == "Split":
        regex = parts[0].get("pattern", {}).get("Regex", "")
        for name, known in PRE_TOKENIZER_REGEX.items():
            if regex == known:
                return name
    raise LorakitError(
        f"the tokenizer's pre-tokenizer ({kinds}) matches none llama.cpp knows "
        f"(smollm, gpt-2, {', '.join(PRE_TOKENIZER_REGEX)}); export the GGUF with llama.cpp's converter"
    )
