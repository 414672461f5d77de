"""Merge and export: merged == adapter logits, GGUF read back (metadata, tensors, vocabulary),
vLLM pre-checks, `export all`. Per-family GGUF: test_families.py; Ollama TEMPLATE: test_ollama_template.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.core.config import ExportConfig, MergeConfig, TrainConfig
from lorakit.core.errors import LorakitError
from lorakit.export.gguf import _permute_rotary, write_gguf, write_lora_gguf
from lorakit.export.merge import merge
from lorakit.export.targets import vllm_command
from lorakit.training.train import train

from ..conftest import EXPORT_ALL_FILES, assemble_rows, write_jsonl

ROWS = assemble_rows(32)


def train_tiny(base, tmp, **kw):
    data = write_jsonl(tmp / "d.jsonl", ROWS)
    settings = dict(
        base_model=str(base),
        dataset=str(data),
        output_dir=str(tmp / "adapter"),
        lora_r=8,
        lora_alpha=16,
        max_steps=4,
        batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        warmup_steps=0,
        lora_dropout=0.0,
    )
    settings.update(kw)
    return train(TrainConfig(**settings))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama):
    return train_tiny(tiny_llama, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def merged(adapter, tmp_path_factory):
    return merge(MergeConfig(adapter=str(adapter), output_dir=str(tmp_path_factory.mktemp("m") / "merged")))


def test_merged_logits_equal_adapter_logits(adapter, merged, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 50, 7000, 33, 2, 9, 120]])
    with torch.no_grad():
        with_adapter = (
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapter))
            .eval()(ids)
            .logits
        )
        plain = AutoModelForCausalLM.from_pretrained(merged).eval()
        assert (with_adapter - plain(ids).logits).abs().max() < 1e-5
    assert not any("lora" in n for n, _ in plain.named_modules())
    info = json.loads((merged / "lorakit-merge.json").read_text())
    assert (
        info["dtype"] == "fp32" and info["max_abs_logit_difference"] < 1e-4 and info["top1_agreement"] == 1.0
    )
    gen = json.loads((merged / "generation_config.json").read_text())
    im_end = 2  # SmolLM2's <|im_end|>
    assert gen["eos_token_id"] == im_end or im_end in gen["eos_token_id"]
    assert (merged / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (merged / "tokenizer_config.json").read_text()
    )


def test_merge_of_a_4bit_trained_adapter_is_unquantized(tmp_path, tiny_llama):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    adapter = train_tiny(tiny_llama, tmp_path, load_in_4bit=True, max_steps=2)
    out = merge(MergeConfig(adapter=str(adapter), output_dir=str(tmp_path / "merged"), dtype="fp32"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_merge_refuses_a_non_empty_output(adapter, merged):
    with pytest.raises(LorakitError, match="is not empty"):
        merge(MergeConfig(adapter=str(adapter), output_dir=str(merged)))


# ---------------------------------------------------------------- GGUF


def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def tensor_values(t):
    import gguf

    data = (
        gguf.quants.dequantize(t.data, t.tensor_type)
        if t.tensor_type not in (0, 1)
        else np.asarray(t.data, np.float32)
    )
    return np.asarray(data, np.float32).reshape([int(x) for x in reversed(t.shape)])


@pytest.mark.parametrize("quant,tol", [("f32", 0), ("f16", 1e-3), ("q8_0", 2e-2)])
def test_gguf_metadata_and_tensors(merged, tmp_path, quant, tol):
    from safetensors.torch import load_file

    path = write_gguf(merged, tmp_path / "m.gguf", quant)
    fields, tensors = read_gguf(path)
    config = json.loads((merged / "config.json").read_text())
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2 and fields["llama.embedding_length"] == 32
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.vocab_size"] == config["vocab_size"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.ggml.eot_token_id"] == 2 and fields["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"]
    assert "output.weight" not in tensors  # tied to the embeddings
    hf = load_file(merged / "model.safetensors")
    q = _permute_rotary(hf["model.layers.0.self_attn.q_proj.weight"], 4).numpy()
    k = _permute_rotary(hf["model.layers.0.self_attn.k_proj.weight"], 2).numpy()
    for name, expected in (
        ("blk.0.attn_q.weight", q),
        ("blk.0.attn_k.weight", k),
        ("blk.1.ffn_down.weight", hf["model.layers.1.mlp.down_proj.weight"].numpy()),
        ("output_norm.weight", hf["model.norm.weight"].numpy()),
    ):
        got = tensor_values(tensors[name])
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= tol * max(1.0, np.abs(expected).max()), name


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2"])
def test_gguf_loads_in_transformers_with_the_same_logits(request, tmp_path, family):
    """transformers' own GGUF reader un-permutes q/k: equal logits prove names, layout and values."""
    from transformers import AutoModelForCausalLM

    base = request.getfixturevalue(family)
    write_gguf(base, tmp_path / "m.gguf", "f32")
    ids = torch.tensor([[1, 50, 7000, 33, 2, 9, 120, 5]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()(ids).logits
    assert (want - got).abs().max() < 1e-4


TRICKY = [
    "Hello, world!",
    "LDA #$12 ; 65816",
    "ünïcödé — 漢字 🙂",
    "def f(x):\n\treturn x**2  # 3.14159",
    "2024-11-25 12345678",
    "<|im_start|>user\nhi<|im_end|>",
    "   leading and trailing   ",
    "A9 12 FF 00",
]


def gguf_tokenizer(fields):
    """A tokenizer built only from the GGUF's vocabulary, merges, token types and pre-tokenizer name."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    from lorakit.models.pretokenizer import rule_for_name

    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False)
    )
    tok.pre_tokenizer = rule_for_name(fields["tokenizer.ggml.pre"])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    )
    return tok


def test_gguf_vocabulary_tokenizes_like_hf(merged, tmp_path, smol_tokenizer):
    from transformers import AutoTokenizer

    fields, _ = read_gguf(write_gguf(merged, tmp_path / "m.gguf", "f32"))
    tok = gguf_tokenizer(fields)
    hf = AutoTokenizer.from_pretrained(merged)
    for text in TRICKY:
        assert tok.encode(text).ids == hf(text, add_special_tokens=False)["input_ids"], text
    # The embedded model's tokenizer splits digits one by one, as llama.cpp's "smollm" rule does.
    assert len(hf("12345678", add_special_tokens=False)["input_ids"]) == 8


def test_lora_gguf(adapter, tmp_path, tiny_llama):
    from safetensors.torch import load_file

    path = write_lora_gguf(adapter, tmp_path / "a.gguf", tiny_llama)
    fields, tensors = read_gguf(path)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 16.0
    peft = load_file(adapter / "adapter_model.safetensors")
    a = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].numpy()
    b = _permute_rotary(peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], 4).numpy()
    assert np.array_equal(tensor_values(tensors["blk.0.attn_q.weight.lora_a"]), a)
    assert np.array_equal(tensor_values(tensors["blk.0.attn_q.weight.lora_b"]), b)
    assert len(tensors) == 2 * 7 * 2  # A and B for 7 projections in 2 layers


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100)).save_pretrained(
        tmp_path / "g"
    )
    with pytest.raises(LorakitError, match="GGUF for the llama, mistral, .* families, not 'gpt2'"):
        write_gguf(tmp_path / "g", tmp_path / "g.gguf")


# ---------------------------------------------------------------- Ollama


def test_modelfile_quoting_and_parameters(smol_tokenizer):
    from lorakit.export.ollama import modelfile

    text = modelfile("./m.gguf", smol_tokenizer, "Line one.\nLine two.", ExportConfig(temperature=0.5))
    assert 'SYSTEM """Line one.\nLine two."""' in text
    assert (
        'PARAMETER stop "<|im_end|>"' in text
        and "PARAMETER temperature 0.5" in text
        and "PARAMETER top_k 40" in text
    )
    assert text.startswith('FROM ./m.gguf\nTEMPLATE """')
    with pytest.raises(LorakitError, match='cannot contain """'):
        modelfile("./m.gguf", smol_tokenizer, 'say """hi"""', ExportConfig())


# ---------------------------------------------------------------- vLLM


def test_vllm_rank_rounding_and_prechecks(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    for r, expected in ((4, 8), (16, 16), (48, 64), (300, 320)):
        (a / "adapter_config.json").write_text(
            json.dumps({"r": r, "base_model_name_or_path": "Qwen/Qwen2.5-7B"})
        )
        assert f"--max-lora-rank {expected} " in vllm_command(ExportConfig(adapter=str(a)), None)
    (a / "adapter_config.json").write_text(json.dumps({"r": 8, "modules_to_save": ["lm_head"]}))
    with pytest.raises(LorakitError, match="modules_to_save"):
        vllm_command(ExportConfig(adapter=str(a)), None)
    (a / "adapter_config.json").write_text(json.dumps({"r": 8, "use_dora": True}))
    with pytest.raises(LorakitError, match="DoRA"):
        vllm_command(ExportConfig(adapter=str(a)), None)


def test_vllm_serves_a_gguf_base_from_its_converted_checkpoint(tmp_path, smol_dir):
    from lorakit.models.loading import embedded_gguf

    a = tmp_path / "a"
    a.mkdir()
    for base in (str(embedded_gguf()), ""):  # a .gguf file, and the embedded default (a GGUF too)
        (a / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": base}))
        command = vllm_command(ExportConfig(adapter=str(a)), None)
        served = command.split()[2]
        assert not served.endswith(".gguf") and Path(served) == Path(smol_dir), command
        assert (Path(served) / "config.json").is_file()


def test_export_all(adapter, tmp_path, capsys):
    from lorakit.cli import main

    out = tmp_path / "export"
    assert (
        main(["export", "all", "--adapter", str(adapter), "--output_dir", str(out), "--quant", "q8_0"]) == 0
    )
    for name in EXPORT_ALL_FILES:
        assert (out / name).is_file(), name
    assert "ollama create" in capsys.readouterr().out


@pytest.mark.llama_cpp
def test_llama_cpp_matches_transformers(merged, tmp_path):
    llama_cpp = pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python is not installed (pip install llama-cpp-python; "
        "it compiles for ~15 minutes on 2 cores)",
    )
    from transformers import AutoModelForCausalLM

    path = write_gguf(merged, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0)
    ids = [1, 50, 7000, 33, 9, 120]
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(merged).eval()(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.llama_cpp
def test_llama_cpp_base_plus_lora_matches_peft(adapter, tiny_llama, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    write_gguf(tiny_llama, tmp_path / "base.gguf", "f32")
    write_lora_gguf(adapter, tmp_path / "lora.gguf", tiny_llama)
    llm = llama_cpp.Llama(
        str(tmp_path / "base.gguf"),
        lora_path=str(tmp_path / "lora.gguf"),
        n_ctx=64,
        logits_all=True,
        verbose=False,
        type_k=0,
        type_v=0,
    )
    ids = [1, 50, 7000, 33, 9, 120]
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapter)).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() < 1e-4


@pytest.fixture
def tiny_gpt2(tmp_path, smol_tokenizer):
    """A merged-model directory of an architecture lorakit has no GGUF writer for."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(smol_tokenizer))
    GPT2LMHeadModel(config).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def test_export_all_writes_what_it_can_and_lists_the_rest(tiny_gpt2, tmp_path, capsys, monkeypatch):
    from lorakit.cli import main

    monkeypatch.delenv("LORAKIT_LLAMA_CPP", raising=False)
    out = tmp_path / "export"
    assert main(["export", "all", "--model", str(tiny_gpt2), "--output_dir", str(out)]) == 0
    assert not list(out.glob("*.gguf"))
    # Ollama imports the safetensors directory itself and quantizes on create.
    assert (out / "Modelfile").read_text().startswith(f"FROM {tiny_gpt2.resolve()}\n")
    assert "vllm serve" in (out / "vllm.sh").read_text()
    printed = capsys.readouterr().out
    assert "ollama create lorakit-model -q q4_K_M" in printed
    assert "except:\n  GGUF: lorakit writes GGUF for the llama" in printed
    assert "Not written:\n\n- GGUF: " in (out / "README.md").read_text()


def test_export_all_converts_with_llama_cpp_when_given(tiny_gpt2, tmp_path, monkeypatch):
    """Architectures without a lorakit writer go through the given llama.cpp tree's converter."""
    from lorakit.cli import main

    tree = tmp_path / "llama.cpp"
    (tree / "gguf-py").mkdir(parents=True)
    (tree / "convert_hf_to_gguf.py").write_text(
        "import sys, pathlib\nargs = sys.argv[1:]\n"
        "pathlib.Path(args[args.index('--outfile') + 1]).write_text(' '.join(args))\n"
    )
    monkeypatch.setenv("LORAKIT_LLAMA_CPP", str(tree))
    out = tmp_path / "export"
    assert (
        main(["export", "all", "--model", str(tiny_gpt2), "--output_dir", str(out), "--quant", "q8_0"]) == 0
    )
    assert (
        out / "model-q8_0.gguf"
    ).read_text() == f"{tiny_gpt2} --outfile {out / 'model-q8_0.gguf'} --outtype q8_0"
    assert (out / "Modelfile").read_text().startswith("FROM ./model-q8_0.gguf\n")
    assert "Not written" not in (out / "README.md").read_text()


def test_export_all_fails_without_a_merged_model(tmp_path, capsys):
    """An adapter whose base is gone: nothing to merge into, but vLLM's base + adapter line is written."""
    from safetensors.torch import save_file

    from lorakit.cli import main

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({a: torch.zeros(8, 32)}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(
        json.dumps({"r": 8, "base_model_name_or_path": str(tmp_path / "gone")})
    )
    assert main(["export", "all", "--adapter", str(adapter), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "could not write the merged model; not written:\n  merged model: " in err
    assert (tmp_path / "out" / "vllm.sh").is_file()  # base + adapter still served by vLLM
