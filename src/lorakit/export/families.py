"""What each model family needs in a GGUF file, in one record per architecture.

A record says which llama.cpp architecture a transformers `model_type` becomes, which vocabulary
kind it carries, its architecture metadata (from the model's config.json), the tensors that are
changed on the way (q/k rotary layout, Gemma's norm offset) and the tensors llama.cpp
needs that the checkpoint does not hold (RoPE frequency factors). The tensor *names* come from the
`gguf` package's own map for the architecture. export/gguf.py writes files from these records and
branches on no family name.

Read off llama.cpp's converter (conversion/*.py in llama.cpp): what it writes for each family is
what llama.cpp's loader expects, so every key and transform here has a test that compares
lorakit's file with the converter's on the same model (tests/export/test_families.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# (GGUFWriter method, value): the writer's typed setters keep each key's GGUF type right.
Metadata = list[tuple[str, Any]]


def rope_parameters(hparams: dict) -> dict:
    """The full-attention RoPE settings, whichever way the config spells them: transformers 5
    writes `rope_parameters` (per layer type for Gemma 3), older configs `rope_scaling` plus
    `rope_theta` (and Gemma 3's `rope_local_base_freq`)."""
    rope = dict(hparams.get("rope_parameters") or hparams.get("rope_scaling") or {})
    rope = dict(rope.get("full_attention", rope))
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = rope["type"]
    if "rope_theta" not in rope and hparams.get("rope_theta") is not None:
        rope["rope_theta"] = hparams["rope_theta"]
    if "original_max_position_embeddings" not in rope and hparams.get("original_max_position_embeddings"):
        rope["original_max_position_embeddings"] = hparams["original_max_position_embeddings"]
    return rope


def local_rope_theta(hparams: dict) -> float | None:
    """RoPE base of the sliding-window layers (Gemma 3), if they have their own."""
    per_type = hparams.get("rope_parameters") or {}
    if "sliding_attention" in per_type:
        return per_type["sliding_attention"].get("rope_theta")
    return hparams.get("rope_local_base_freq")


def head_dim(hparams: dict) -> int:
    return hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]


def _shape(h: dict) -> Metadata:
    """The keys every family has: sizes, heads, context, norm epsilon."""
    return [
        ("add_block_count", h["num_hidden_layers"]),
        ("add_context_length", h["max_position_embeddings"]),
        ("add_embedding_length", h["hidden_size"]),
        ("add_feed_forward_length", h["intermediate_size"]),
        ("add_head_count", h["num_attention_heads"]),
        ("add_head_count_kv", h.get("num_key_value_heads", h["num_attention_heads"])),
        ("add_layer_norm_rms_eps", h["rms_norm_eps"]),
    ]


def _head_lengths(h: dict) -> Metadata:
    return (
        [("add_key_length", h["head_dim"]), ("add_value_length", h["head_dim"])] if h.get("head_dim") else []
    )


def _rope(h: dict) -> Metadata:
    """RoPE base and scaling type, as llama.cpp reads them (llama3 scaling is a tensor instead)."""
    rope = rope_parameters(h)
    out: Metadata = []
    kind, factor = rope.get("rope_type"), rope.get("factor")
    if kind == "linear" and factor is not None:
        out += [("add_rope_scaling_type", "LINEAR"), ("add_rope_scaling_factor", factor)]
    elif kind == "yarn" and factor is not None:
        out += [
            ("add_rope_scaling_type", "YARN"),
            ("add_rope_scaling_factor", factor),
            ("add_rope_scaling_orig_ctx_len", rope["original_max_position_embeddings"]),
        ]
    elif kind in ("su", "longrope"):
        out.append(("add_rope_scaling_type", "LONGROPE"))
    if rope.get("rope_theta") is not None:
        out.append(("add_rope_freq_base", rope["rope_theta"]))
    if (local := local_rope_theta(h)) is not None:
        out.append(("add_rope_freq_base_swa", local))
    return out


def llama_metadata(h: dict) -> Metadata:
    return (
        _shape(h)
        + _rope(h)
        + _head_lengths(h)
        + [("add_vocab_size", h["vocab_size"]), ("add_rope_dimension_count", head_dim(h))]
    )


def qwen_metadata(h: dict) -> Metadata:
    return _shape(h) + _rope(h) + _head_lengths(h)


def gemma2_metadata(h: dict) -> Metadata:
    # llama.cpp's gemma2 uses its built-in RoPE base: the converter writes none.
    return (
        _shape(h)
        + _head_lengths(h)
        + [
            ("add_attn_logit_softcapping", h["attn_logit_softcapping"]),
            ("add_final_logit_softcapping", h["final_logit_softcapping"]),
            ("add_sliding_window", h["sliding_window"]),
        ]
    )


def gemma3_metadata(h: dict) -> Metadata:
    # The 5-local-to-1-global layer pattern is built into llama.cpp's gemma3; the file gives the
    # window and the two RoPE bases (global layers 1e6, local ones 1e4 by default).
    rope = rope_parameters(h)
    out = [(m, v) for m, v in _shape(h) + _rope(h) if m != "add_rope_freq_base"]
    out += [
        ("add_rope_freq_base", rope.get("rope_theta", 1_000_000.0)),
        ("add_key_length", h.get("head_dim", 256)),
        ("add_value_length", h.get("head_dim", 256)),
    ]
    if h.get("final_logit_softcapping"):
        out.append(("add_final_logit_softcapping", h["final_logit_softcapping"]))
    if h.get("sliding_window_pattern") != 1:
        out.append(("add_sliding_window", h["sliding_window"]))
    return out


def phi3_rope_dims(h: dict) -> int:
    return (
        int(rope_parameters(h).get("partial_rotary_factor", 1.0) * h["hidden_size"])
        // h["num_attention_heads"]
    )


def _phi3_scale(h: dict) -> float:
    return h["max_position_embeddings"] / rope_parameters(h)["original_max_position_embeddings"]


def phi3_metadata(h: dict) -> Metadata:
    rope = rope_parameters(h)
    out = _shape(h) + [
        ("add_rope_scaling_orig_ctx_len", rope["original_max_position_embeddings"]),
        ("add_rope_dimension_count", phi3_rope_dims(h)),
        ("add_rope_freq_base", rope["rope_theta"]),
        # 0 tells Phi-3 (no window in its config: Phi-4) from Phi-3.5-mini's 262k window
        ("add_sliding_window", h.get("sliding_window") or 0),
    ]
    if rope.get("long_factor"):
        # LongRoPE's attention temperature, as the converter computes it from the context ratio.
        scale, original = _phi3_scale(h), rope["original_max_position_embeddings"]
        kind = rope.get("rope_type", "")
        if kind in ("su", "longrope"):
            factor = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
        elif kind == "yarn":
            factor = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        else:
            raise ValueError(f"Phi-3 RoPE scaling {kind!r} has no llama.cpp equivalent")
        out.append(("add_rope_scaling_attn_factors", factor))
    return out


def llama3_rope_freqs(h: dict) -> dict[str, Any]:
    """Llama 3.1+ `rope_type: llama3`: llama.cpp divides each RoPE frequency by a factor it reads
    from a `rope_freqs` tensor (1 for short wavelengths, `factor` for long ones, a smooth ramp
    between); without it the model runs with unscaled RoPE."""
    import numpy as np

    rope = rope_parameters(h)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return {}
    dim, base = head_dim(h), rope.get("rope_theta", 10000.0)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    # float32 frequencies, as llama.cpp's converter computes them (torch float32 arange and power)
    freqs = 1.0 / np.power(np.float32(base), np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    out = []
    for freq in freqs.astype(np.float32):
        wavelength = 2 * math.pi / float(freq)
        if wavelength < old_context / high:
            out.append(1.0)
        elif wavelength > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return {"ROPE_FREQS": np.array(out, dtype=np.float32)}


def phi3_rope_factors(h: dict) -> dict[str, Any]:
    """LongRoPE (Phi-3/3.5 128k): per-dimension long and short frequency factors."""
    import numpy as np

    rope = rope_parameters(h)
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long:
        return {}
    if short is None or len(long) != len(short) or len(long) != phi3_rope_dims(h) / 2:
        raise ValueError(f"LongRoPE factors must be {phi3_rope_dims(h) // 2} long and short values")
    return {
        "ROPE_FACTORS_LONG": np.array(long, dtype=np.float32),
        "ROPE_FACTORS_SHORT": np.array(short, dtype=np.float32),
    }


def no_extra_tensors(h: dict) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Family:
    """How one transformers architecture becomes a llama.cpp GGUF file."""

    arch: str  # llama.cpp's architecture name (a gguf.MODEL_ARCH member, lower case)
    metadata: Callable[[dict], Metadata]  # config.json -> architecture keys
    vocab: str = (
        "bpe"  # "bpe": byte-level BPE; "spm": SentencePiece (tokenizer.model); "auto": spm if present
    )
    permute_qk: bool = False  # HF keeps each rotary head as two halves; llama's GGUF layout interleaves them
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w): llama.cpp stores w + 1
    drop_lm_head: bool = False  # the output head is always the embedding (Gemma)
    add_space_prefix: bool | None = None  # SentencePiece's dummy prefix, when the family pins it
    extra_tensors: Callable[[dict], dict[str, Any]] = field(default=no_extra_tensors)  # MODEL_TENSOR -> data


LLAMA = Family("llama", llama_metadata, vocab="auto", permute_qk=True, extra_tensors=llama3_rope_freqs)
QWEN2 = Family("qwen2", qwen_metadata)
GEMMA2 = Family("gemma2", gemma2_metadata, "spm", norm_offset=1.0, drop_lm_head=True, add_space_prefix=False)

# transformers `model_type` -> family. Mistral runs as llama in llama.cpp.
FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": QWEN2,
    "qwen3": Family("qwen3", qwen_metadata),
    "gemma2": GEMMA2,
    "gemma3_text": Family("gemma3", gemma3_metadata, "auto", norm_offset=1.0, add_space_prefix=False),
    "phi3": Family("phi3", phi3_metadata, "auto", extra_tensors=phi3_rope_factors),
}


def family_of(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)
