"""llama.cpp runs lorakit's GGUF files as transformers and PEFT run the checkpoints they came from,
for every family in export/families.py (tiny random models of each, conftest.py):

- the merged model (base + a random LoRA) as an f32 GGUF: llama.cpp's logits equal transformers'
  (f32 weights, eager attention) on the same tokens;
- the base as an f32 GGUF plus lorakit's GGUF LoRA (llama.cpp's `--lora`): llama.cpp's logits
  equal PEFT's.

test_families.py checks that the files equal what llama.cpp's converters write; this checks that
llama.cpp computes with them what transformers computes, which also covers what no converter
comparison can (a key both sides get wrong, metadata llama.cpp reads differently than we think).
The merged model differs from the base by far more than the tolerance, so an adapter that
llama.cpp ignored, or a merge it missed, fails.

Needs llama-cpp-python, compiled (`make test-export` builds and runs it); skipped without it.
Each test records its max |logit difference| (`max_abs_logit_diff`), listed after the run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.export.gguf import write_gguf, write_lora_gguf

from ..conftest import FAMILIES, random_lora_and_merge

llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not installed (`make test-export` compiles it: ~15 minutes on 2 cores)",
)

pytestmark = pytest.mark.llama_cpp

# Fewer than 400 ids (the SentencePiece fixtures' vocabulary) and far within every fixture's
# windows: Gemma's 64-token sliding window and Phi-3's 256-token original context, past which
# LongRoPE switches from its short to its long factors.
TOKENS = [2, 5, 17, 33, 9, 120, 7, 64, 250, 3, 101, 42]
N_CTX = 64
TOLERANCE = 1e-3

# The shared fixtures are initialised at transformers' scale (std 0.02): their attention is so
# close to uniform that q/k, RoPE and soft-caps hardly move the logits (dropping llama3 RoPE
# scaling moves them by ~2e-5, Phi-3's short factors by ~1e-4), so a comparison at TOLERANCE could
# not see those parts. These copies draw the weights at 10x that scale (where the same two changes
# move the logits by ~0.1); Gemma's soft-caps and windows are set where they bite on TOKENS.
INITIALIZER_RANGE = 0.2
CHANGES = {
    "tiny_gemma2": dict(sliding_window=4, attn_logit_softcapping=4.0, final_logit_softcapping=4.0),
    "tiny_gemma3": dict(sliding_window=4),
}


def sharpened(fixture: Path, out: Path, **changes) -> Path:
    """`fixture` (config, tokenizer files) with new random weights at INITIALIZER_RANGE."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(fixture, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    config = AutoConfig.from_pretrained(fixture, initializer_range=INITIALIZER_RANGE, **changes)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, base dir, random PEFT adapter dir, lorakit-merged dir) of one family."""
    tmp = tmp_path_factory.mktemp(request.param)
    fixture = request.getfixturevalue(request.param)
    base = sharpened(fixture, tmp / "base", **CHANGES.get(request.param, {}))
    adapter, merged = random_lora_and_merge(base, tmp)
    return request.param, base, adapter, merged


class GeluLikeGgml(torch.nn.Module):
    """GELU (tanh form) as ggml computes it on CPU: a table of float16 results indexed by the
    float16-rounded input, for -10 < x < 10 (ggml-cpu/vec.h defines GGML_GELU_FP16). Against the
    exact GELU, llama.cpp's Gemma logits differ by 1e-3 to 3e-3 at this weight scale; against this
    one, by ~1e-5 (Gemma 2) and up to ~5e-4 (Gemma 3: where float32 noise puts an input on the
    other side of a float16 rounding midpoint, one activation moves by a float16 step). The SiLU
    families are computed in float32 and agree to ~1e-5."""

    def forward(self, x):
        table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, 0.0, torch.where(x >= 10, x, table))


def transformers_logits(model_dir, adapter=None) -> np.ndarray:
    """[tokens, vocab] logits in f32 with eager attention (Gemma-2's soft-capping lives there)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    activation = getattr(model.config, "hidden_activation", None) or model.config.hidden_act
    if activation == "gelu_pytorch_tanh":
        for module in model.modules():
            if hasattr(module, "act_fn"):
                module.act_fn = GeluLikeGgml()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model.eval()(torch.tensor([TOKENS])).logits[0].numpy()


def llama_cpp_logits(gguf, lora=None) -> np.ndarray:
    """[tokens, vocab] logits of llama.cpp with an f32 KV cache (its default f16 cache rounds k, v)."""
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        lora_path=str(lora) if lora else None,
        n_ctx=N_CTX,
        n_batch=N_CTX,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        n_threads=2,
        n_threads_batch=2,
        seed=0,
        verbose=False,
    )
    try:
        llm.eval(TOKENS)
        return np.array(llm.scores[: len(TOKENS)], dtype=np.float32)
    finally:
        llm.close()


def check(name, got, want, base, record_property) -> None:
    diff = float(np.abs(got - want).max())
    record_property("max_abs_logit_diff", diff)
    print(f"{name}: max |logit difference| {diff:.3g} (logits up to {np.abs(want).max():.3g})")
    assert got.shape == want.shape
    # the adapter moves the logits by far more than the tolerance: llama.cpp must have applied it
    assert np.abs(want - base).max() > 20 * TOLERANCE, name
    assert diff <= TOLERANCE, name


def test_merged_gguf_logits_equal_transformers(family, tmp_path, record_property):
    name, base, _, merged = family
    gguf = write_gguf(merged, tmp_path / "merged.gguf", "f32")
    got, want = llama_cpp_logits(gguf), transformers_logits(merged)
    check(name, got, want, transformers_logits(base), record_property)


def test_base_gguf_plus_lora_gguf_logits_equal_peft(family, tmp_path, record_property):
    name, base, adapter, _ = family
    base_gguf = write_gguf(base, tmp_path / "base.gguf", "f32")
    lora_gguf = write_lora_gguf(adapter, tmp_path / "lora.gguf", base)
    got, want = llama_cpp_logits(base_gguf, lora_gguf), transformers_logits(base, adapter)
    check(name, got, want, transformers_logits(base), record_property)
