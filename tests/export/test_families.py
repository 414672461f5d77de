"""Every family in export/families.py, on a tiny random model of it (conftest.py):

- a random LoRA merged by lorakit gives the logits of base + adapter (and differs from the base);
- lorakit's GGUF of the merged model equals llama.cpp's converter's: tensor names, shapes, types
  and values, architecture metadata and vocabulary;
- lorakit's GGUF LoRA equals llama.cpp's convert_lora_to_gguf.py's;
- (slow) `lorakit train` then `lorakit export all` exits 0 and writes every target.

The converters come from $LORAKIT_LLAMA_CPP (skipped without it) and need `sentencepiece`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lorakit.export.families import llama3_rope_freqs
from lorakit.export.gguf import write_gguf, write_lora_gguf

from ..conftest import (
    EXPORT_ALL_FILES,
    LLAMA31_ROPE,
    assemble_rows,
    llama_cpp_tree,
    random_lora_and_merge,
    tiny_train_config,
    write_jsonl,
)
from .test_export import read_gguf, tensor_values

# tiny_qwen2 is left out of the converter comparison: transformers 5 loads the SmolLM2 tokenizer
# of that fixture as a Qwen2Tokenizer, whose pre-tokenizer hash llama.cpp does not know.
# tiny_qwen3 runs the same GGUF code path (qwen2 + q/k norms).
FAMILIES = [
    "tiny_llama",
    "tiny_llama31",
    "tiny_mistral",
    "tiny_qwen3",
    "tiny_gemma2",
    "tiny_gemma3",
    "tiny_phi3",
]
QUANT = {"tiny_mistral": "q8_0", "tiny_qwen3": "f16", "tiny_gemma3": "bf16"}  # others f32
IDS = torch.tensor([[2, 5, 17, 33, 9, 120, 7, 64]])


def run_converter(script: str, *args: str) -> None:
    tree = llama_cpp_tree()
    pytest.importorskip("sentencepiece", reason="llama.cpp's converter needs sentencepiece")
    env = dict(os.environ, PYTHONPATH=str(tree / "gguf-py"))
    done = subprocess.run(
        [sys.executable, str(tree / script), *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, base dir, random PEFT adapter dir, lorakit-merged dir) of one family."""
    base = request.getfixturevalue(request.param)
    adapter, merged = random_lora_and_merge(base, tmp_path_factory.mktemp(request.param))
    return request.param, base, adapter, merged


def test_merged_logits_equal_base_plus_adapter(family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name, base, adapter, merged = family
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base).eval()
        want = PeftModel.from_pretrained(plain, str(adapter)).eval()(IDS).logits
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(IDS).logits
        before = AutoModelForCausalLM.from_pretrained(base).eval()(IDS).logits
    assert (want - got).abs().max() < 1e-4, name
    assert (got - before).abs().max() > 1e-3, name
    if (base / "tokenizer.model").is_file():  # SentencePiece families keep it through the merge
        assert (merged / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()


def added_token_ids(model_dir) -> set[int]:
    from transformers import AutoTokenizer

    return set(AutoTokenizer.from_pretrained(model_dir).added_tokens_decoder)


@pytest.mark.slow  # runs llama.cpp's converter in another process
def test_gguf_equals_llama_cpp_converter(family, tmp_path):
    name, _, _, merged = family
    quant = QUANT.get(name, "f32")
    ours = write_gguf(merged, tmp_path / "ours.gguf", quant)
    run_converter(
        "convert_hf_to_gguf.py", str(merged), "--outfile", str(tmp_path / "ref.gguf"), "--outtype", quant
    )
    (f_ours, t_ours), (f_ref, t_ref) = read_gguf(ours), read_gguf(tmp_path / "ref.gguf")

    arch = f_ref["general.architecture"]
    assert f_ours["general.architecture"] == arch
    arch_keys = {k for k in f_ours.keys() | f_ref.keys() if k.startswith(arch + ".")}
    assert {k: f_ours.get(k) for k in arch_keys} == {k: f_ref.get(k) for k in arch_keys}
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.scores",
    ):
        if key != "tokenizer.ggml.scores" or name != "tiny_gemma2":
            assert f_ours.get(key) == f_ref.get(key), key
    # transformers 5 no longer lists added tokens in tokenizer_config.json, where the converter's
    # SentencePiece path looks for them (Gemma): lorakit takes them from the tokenizer itself.
    added = added_token_ids(merged) if name == "tiny_gemma2" else set()
    tokens_ours, tokens_ref = f_ours["tokenizer.ggml.tokens"], f_ref["tokenizer.ggml.tokens"]
    assert len(tokens_ours) == len(tokens_ref)
    assert [t for i, t in enumerate(tokens_ours) if i not in added] == [
        t for i, t in enumerate(tokens_ref) if i not in added
    ]

    assert t_ours.keys() == t_ref.keys()
    for tensor in t_ref:
        a, b = t_ours[tensor], t_ref[tensor]
        assert a.tensor_type == b.tensor_type, tensor
        assert list(a.shape) == list(b.shape), tensor
        assert np.array_equal(tensor_values(a), tensor_values(b)), tensor


@pytest.mark.slow  # runs llama.cpp's converter in another process
def test_lora_gguf_equals_llama_cpp_converter(family, tmp_path):
    name, base, adapter, _ = family
    ours = write_lora_gguf(adapter, tmp_path / "ours.gguf", base)
    run_converter(
        "convert_lora_to_gguf.py",
        str(adapter),
        "--base",
        str(base),
        "--outfile",
        str(tmp_path / "ref.gguf"),
        "--outtype",
        "f32",
    )
    (f_ours, t_ours), (f_ref, t_ref) = read_gguf(ours), read_gguf(tmp_path / "ref.gguf")
    assert f_ours["general.architecture"] == f_ref["general.architecture"]
    assert f_ours["adapter.lora.alpha"] == f_ref["adapter.lora.alpha"]
    assert t_ours.keys() == t_ref.keys()
    for tensor in t_ref:
        assert np.array_equal(tensor_values(t_ours[tensor]), tensor_values(t_ref[tensor])), tensor


def test_llama3_rope_freqs_golden():
    """Llama 3.1's published scaling (factor 8, low 1, high 4, 8192 original context), head_dim 128:
    short wavelengths keep factor 1, long ones get 8, the band between a smooth ramp."""
    h = dict(hidden_size=4096, num_attention_heads=32, rope_parameters=dict(LLAMA31_ROPE))
    freqs = llama3_rope_freqs(h)["ROPE_FREQS"]
    assert freqs.shape == (64,) and freqs.dtype == np.float32
    assert freqs[0] == 1.0 and freqs[-1] == 8.0
    assert (np.diff(freqs) >= 0).all()
    assert 1.0 < freqs[(freqs > 1) & (freqs < 8)].min() and len(freqs[(freqs > 1) & (freqs < 8)]) > 0
    assert llama3_rope_freqs({**h, "rope_parameters": {"rope_theta": 1e4}}) == {}


@pytest.mark.slow
@pytest.mark.parametrize("fixture", FAMILIES + ["tiny_qwen2"])
def test_train_then_export_all(request, tmp_path, fixture):
    from lorakit.cli import main
    from lorakit.training.train import train

    base = request.getfixturevalue(fixture)
    data = write_jsonl(tmp_path / "d.jsonl", assemble_rows(8))
    adapter = train(tiny_train_config(base, data, tmp_path / "adapter", max_steps=2, save_steps=2))
    out = tmp_path / "export"
    assert (
        main(["export", "all", "--adapter", str(adapter), "--output_dir", str(out), "--quant", "q8_0"]) == 0
    )
    for name in EXPORT_ALL_FILES:
        assert (out / name).is_file(), name
    assert "Not written" not in (out / "README.md").read_text()
    assert (out / "Modelfile").read_text().startswith("FROM ./model-q8_0.gguf\n")
    assert (
        json.loads((out / "merged" / "config.json").read_text())["model_type"]
        in fixture.replace("tiny_", "") + "_text"
    )
