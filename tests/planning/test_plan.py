"""The planner: exact parameter counts and a traced peak that matches a real step."""

import dataclasses
import json

import pytest
import torch

from lorakit.core.config import PlanConfig, TrainConfig
from lorakit.planning.memory import GIB, make_plan, weight_bytes
from lorakit.planning.plan import fit_to_gpu
from lorakit.planning.trace import (
    bundled_configs,
    find_bundled,
    load_model_config,
    meta_peft_model,
    step_peak_bytes,
    traced_peak,
)

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
SEVEN = QKVO + ["gate_proj", "up_proj", "down_proj"]

# Published parameter counts of the base models (model cards / safetensors metadata).
BASE_PARAMS = {
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-7B": 7_615_616_512,
    "Qwen2.5-14B": 14_770_033_664,
    "Llama-3.1-8B": 8_030_261_248,
    "Mistral-7B-v0.3": 7_248_023_552,
    "SmolLM2-135M": 134_515_008,
}


def lora_formula(config, targets, r, dora=False) -> int:
    """Independent count: r x (d_in + d_out) per adapted projection (+ d_out for DoRA's magnitude)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    dh = getattr(config, "head_dim", None) or h // heads
    shapes = {
        "q_proj": (h, heads * dh),
        "k_proj": (h, kv * dh),
        "v_proj": (h, kv * dh),
        "o_proj": (heads * dh, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
        "qkv_proj": (h, (heads + 2 * kv) * dh),
        "gate_up_proj": (h, 2 * inter),
    }
    return layers * sum(r * (shapes[t][0] + shapes[t][1]) + (shapes[t][1] if dora else 0) for t in targets)


def count(name, **kw):
    config, _ = load_model_config(name)
    model = meta_peft_model(config, TrainConfig(**kw), torch.bfloat16)
    return config, *model.get_nb_trainable_parameters()


def test_guide_numbers_for_14b():
    _, trainable, total = count("Qwen/Qwen2.5-14B-Instruct", lora_r=64, target_modules=QKVO)
    assert trainable == 100_663_296  # the guide says 4,194,304
    assert total - trainable == 14_770_033_664
    _, trainable7, _ = count("Qwen2.5-14B", lora_r=64, target_modules=SEVEN)
    assert trainable7 == 275_251_200


@pytest.mark.parametrize("name", list(BASE_PARAMS))
def test_base_parameter_counts_match_published(name):
    _, trainable, total = count(name, lora_r=8, target_modules=["q_proj"])
    assert total - trainable == BASE_PARAMS[name]


@pytest.mark.parametrize("name", sorted(bundled_configs()))
@pytest.mark.parametrize("r,targets,dora", [(8, "attention", False), (64, "all", False), (16, "all", True)])
def test_trainable_counts_equal_independent_formula(name, r, targets, dora):
    config, _ = load_model_config(name)
    fused = config.model_type == "phi3"
    if targets == "attention":
        tlist = ["qkv_proj", "o_proj"] if fused else QKVO
    else:
        tlist = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if fused else SEVEN
    model = meta_peft_model(
        config, TrainConfig(lora_r=r, target_modules=tlist, use_dora=dora), torch.bfloat16
    )
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == lora_formula(config, tlist, r, dora)


def test_all_linear_and_modules_to_save():
    config, trainable, _ = count("SmolLM2-135M", lora_r=8, target_modules=["all-linear"])
    assert trainable == lora_formula(config, SEVEN, 8)
    _, with_head, _ = count("Qwen2.5-0.5B", lora_r=8, target_modules=QKVO, modules_to_save=["lm_head"])
    cfg05, base_only, _ = count("Qwen2.5-0.5B", lora_r=8, target_modules=QKVO)
    assert with_head - base_only == cfg05.vocab_size * cfg05.hidden_size


def test_bundled_names_resolve():
    for hub_id, stem in [
        ("Qwen/Qwen2.5-Coder-14B-Instruct", "Qwen2.5-Coder-14B"),
        ("meta-llama/Llama-3.2-1B-Instruct", "Llama-3.2-1B"),
        ("mistralai/Mistral-7B-Instruct-v0.3", "Mistral-7B-v0.3"),
        ("google/gemma-2-9b-it", "Gemma-2-9B"),
        ("microsoft/Phi-3-mini-4k-instruct", "Phi-3-mini-4k"),
        ("HuggingFaceTB/SmolLM2-360M-Instruct", "SmolLM2-360M"),
    ]:
        assert find_bundled(hub_id).stem == stem, hub_id


def real_model(config, cfg, layers):
    """The same architecture with real (random) CPU weights."""
    from transformers import AutoModelForCausalLM

    from lorakit.models.loading import add_lora
    from lorakit.planning.trace import _truncate_layers

    torch.manual_seed(0)
    c = _truncate_layers(config, layers)
    c.use_cache = False
    return add_lora(cfg, AutoModelForCausalLM.from_config(c))


@pytest.mark.parametrize(
    "name,layers,batch,seq,gc,targets",
    [
        ("SmolLM2-135M", 3, 2, 96, False, SEVEN),
        ("SmolLM2-135M", 3, 2, 96, True, QKVO),
        ("Qwen2.5-0.5B", 2, 1, 64, False, SEVEN),
    ],
)
def test_traced_peak_matches_a_real_cpu_step(name, layers, batch, seq, gc, targets):
    config, _ = load_model_config(name)
    from lorakit.planning.trace import _truncate_layers

    small = _truncate_layers(config, layers)
    cfg = TrainConfig(lora_r=16, target_modules=targets, lora_dropout=0.0, gradient_checkpointing=gc)
    predicted = traced_peak(
        small, cfg, torch.float32, batch, seq
    )  # meta, 1+2 layers extrapolated to `layers`
    measured = step_peak_bytes(real_model(config, cfg, layers), batch, seq)  # real tensors, same counter
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)


def test_layer_extrapolation_equals_full_depth_trace():
    config, _ = load_model_config("SmolLM2-135M")
    cfg = TrainConfig(lora_r=8, target_modules=SEVEN, gradient_checkpointing=True)
    full = step_peak_bytes(meta_peft_model(config, cfg, torch.bfloat16), 2, 128)
    assert traced_peak(config, cfg, torch.bfloat16, 2, 128) == full


def test_quantized_weight_bytes():
    config, _ = load_model_config("Llama-3.1-8B")
    model = meta_peft_model(config, TrainConfig(lora_r=8, target_modules=QKVO), torch.bfloat16)
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in n and not n.endswith("lm_head")
    )
    other = 8_030_261_248 - linear
    embeddings = 2 * 128_256 * 4096  # input embedding and (untied) LM head
    # bf16 run: embedding and head in bf16, norms in fp32 (PEFT's prepare_model_for_kbit_training)
    nf4, _ = weight_bytes(model, TrainConfig(load_in_4bit=True, bf16=True), 2)
    nf4_linear = linear * (0.5 + 1 / 64 + 4 / (64 * 256))
    assert nf4 == pytest.approx(nf4_linear + embeddings * 2 + (other - embeddings) * 4, rel=1e-6)
    plain_nf4, _ = weight_bytes(
        model, TrainConfig(load_in_4bit=True, bf16=True, bnb_4bit_use_double_quant=False), 2
    )
    assert plain_nf4 == pytest.approx(
        linear * (0.5 + 4 / 64) + embeddings * 2 + (other - embeddings) * 4, rel=1e-6
    )
    fp32_run, _ = weight_bytes(model, TrainConfig(load_in_4bit=True), 2)  # everything unquantized in fp32
    assert fp32_run == pytest.approx(nf4_linear + other * 4, rel=1e-6)
    bf16, _ = weight_bytes(model, TrainConfig(), 2)
    assert bf16 == 8_030_261_248 * 2


def test_14b_fp16_does_not_fit_16gb_but_4bit_does():
    cfg = PlanConfig(
        base_model="Qwen2.5-14B",
        lora_r=64,
        target_modules=QKVO,
        fp16=True,
        gradient_checkpointing=True,
        batch_size=2,
        gpu="rtx4070tisuper",
    )
    fp16 = make_plan(cfg)
    assert fp16.memory.base_weights == 14_770_033_664 * 2 and fp16.fits is False
    four = make_plan(dataclasses.replace(cfg, load_in_4bit=True, batch_size=1))
    assert four.fits is True


@pytest.mark.slow
def test_fit_and_cli(tmp_path, capsys):
    from lorakit.cli import main

    assert (
        main(
            [
                "plan",
                "--base_model",
                "Qwen2.5-7B",
                "--bf16",
                "--gpu",
                "rtx3090",
                "--fit",
                "--max_seq_length",
                "512",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "fastest configuration that fits" in out
        and "--base_model Qwen2.5-7B" in out
        and out.count("lorakit train") == 1
    )
    assert main(["plan", "--base_model", "Qwen2.5-32B", "--gpu_memory", "8GB", "--fit"]) == 2
    assert "smallest GPU that would" in capsys.readouterr().err
    assert main(["plan", "--gpu", "rtx4070"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_plan_uses_dataset_lengths(tmp_path, smol_dir):
    from ..conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x " * n, "output": "y"} for n in (5, 10, 40)])
    p = make_plan(PlanConfig(base_model=str(smol_dir), dataset=str(data), system_prompt="", lora_r=8))
    assert p.seq_len < 80 and "longest row" in p.seq_len_source
    json.dumps(p.to_json())


def test_train_warns_before_a_run_that_will_not_fit(capsys):
    from lorakit.planning.plan import memory_check

    cfg = TrainConfig(base_model="Qwen2.5-14B", lora_r=64, fp16=True)
    assert memory_check(cfg, [900, 1000, 300], 16 * 1024**3) is False
    assert "planned to need" in capsys.readouterr().out
    small = TrainConfig(base_model="SmolLM2-135M", lora_r=8, bf16=True)
    assert memory_check(small, [100, 200], 80 * 1024**3) is True


def test_fit_lowers_the_rank_before_it_shortens_the_sequence():
    """Shortening max_seq_length changes the data (long rows dropped); a lower rank does not."""
    base = dict(
        base_model="SmolLM2-135M",
        lora_r=64,
        lora_alpha=128,
        max_seq_length=1024,
        batch_size=4,
        gradient_accumulation_steps=4,
    )
    smallest = dict(
        load_in_4bit=True,
        bf16=True,
        gradient_checkpointing=True,
        batch_size=1,
        gradient_accumulation_steps=16,
    )
    r64_1024 = make_plan(PlanConfig(**{**base, **smallest})).total_bytes
    r32_1024 = make_plan(PlanConfig(**{**base, **smallest, "lora_r": 32, "lora_alpha": 64})).total_bytes
    r64_768 = make_plan(PlanConfig(**{**base, **smallest, "max_seq_length": 768})).total_bytes
    budget = (r64_1024 + r32_1024) / 2
    assert r32_1024 < budget < r64_1024 and r64_768 < budget  # both alternatives fit, the original does not
    chosen, plan, _ = fit_to_gpu(PlanConfig(**base, gpu_memory=f"{budget / GIB:.4f}GiB", fit=True))
    assert (chosen.lora_r, chosen.max_seq_length) == (32, 1024) and plan.fits


def test_fit_says_how_many_rows_a_shorter_sequence_drops(tmp_path, smol_dir, capsys):
    from lorakit.planning.plan import plan

    from ..conftest import write_jsonl

    rows = [{"instruction": "x " * n, "output": "y"} for n in (20, 40, 60, 300, 310)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    base = dict(
        base_model=str(smol_dir), dataset=str(data), lora_r=8, batch_size=1, gradient_accumulation_steps=1
    )
    smallest = dict(load_in_4bit=True, bf16=True, gradient_checkpointing=True)
    full = make_plan(PlanConfig(**base, **smallest))
    peak = full.seq_len
    shorter = make_plan(PlanConfig(**base, **smallest), lengths=(peak * 3 // 4, 50.0, 5, "test"))
    budget = (full.total_bytes + shorter.total_bytes) / 2
    assert shorter.total_bytes < budget < full.total_bytes
    result = plan(PlanConfig(**base, fit=True, gpu_memory=f"{budget / GIB:.5f}GiB"))
    assert result.rows_over_length == 2  # the two rows of 300+ words
    out = " ".join(capsys.readouterr().out.split())
    assert "2 training rows are longer than max_seq_length" in out and "(--overlength drop)" in out
