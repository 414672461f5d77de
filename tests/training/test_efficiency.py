"""Token-budget micro-batches (--max_tokens_per_batch), the useful-FLOPs record of every run, and
the attention kernel choice."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.models.loading import EAGER_MAX_TOKENS_CPU, attention_implementation
from lorakit.training.batching import MICRO_BATCH_COST, Collator
from lorakit.training.efficiency import Counter, Shape, useful_flops
from lorakit.training.train import train

from ..conftest import inject_oom, write_jsonl
from ..conftest import tiny_train_config as base_cfg


def varied_rows(n: int) -> list[dict]:
    """Rows from ~15 to ~70 tokens, so micro-batches of a token budget differ from row counts."""
    words = ["load", "store", "the", "accumulator", "index", "register", "with", "value"]
    return [
        {
            "instruction": " ".join(words[(i + k) % len(words)] for k in range(3 + (i * 7) % 40)),
            "output": f"A9 {i:02X}",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "varied.jsonl", varied_rows(48))


def test_token_groups_cover_every_row_once_within_the_budget():
    lengths = [10, 60, 30, 30, 5, 120, 45, 45, 8]
    padded = Collator(0, max_tokens_per_batch=100).token_groups(lengths)
    assert sorted(i for g in padded for i in g) == list(range(len(lengths)))
    assert padded[0] == [5]  # longer than the budget: a micro-batch of its own
    for g in padded:
        width = max(lengths[i] for i in g)
        assert lengths[g[0]] == width  # longest first: the group's padded width
        assert len(g) == 1 or width * len(g) <= 100
    packed = Collator(0, padding_free=True, max_tokens_per_batch=100).token_groups(lengths)
    assert sorted(i for g in packed for i in g) == list(range(len(lengths)))
    assert all(len(g) == 1 or sum(lengths[i] for i in g) <= 100 for g in packed)
    assert len(packed) < len(padded)  # packing wastes no budget on padding


def _cost(groups, lengths):
    return sum(len(g) * max(lengths[i] for i in g) + MICRO_BATCH_COST for g in groups)


def test_padded_groups_are_the_cheapest_cut():
    import itertools
    import random

    rng = random.Random(0)
    for _trial in range(60):
        lengths = [int(rng.lognormvariate(4.5, 0.9)) + 1 for _ in range(rng.randint(1, 9))]
        budget = rng.choice([150, 400, 1000, 5000])
        groups = Collator(0, max_tokens_per_batch=budget).token_groups(lengths)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert all(len(g) == 1 or len(g) * max(lengths[i] for i in g) <= budget for g in groups)
        # every way to cut the rows (as sorted by length) into runs that fit: none is cheaper
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        best = None
        for cuts in itertools.product([0, 1], repeat=len(order) - 1):
            runs, start = [], 0
            for k, c in enumerate(cuts, 1):
                if c:
                    runs.append(order[start:k])
                    start = k
            runs.append(order[start:])
            if all(len(r) == 1 or len(r) * lengths[r[0]] <= budget for r in runs):
                cost = _cost(runs, lengths)
                best = cost if best is None else min(best, cost)
        assert _cost(groups, lengths) == best


def test_regrouped_rows_pad_less_and_never_exceed_the_row_cut():
    import random

    rng = random.Random(1)
    for _trial in range(40):
        lengths = [int(rng.lognormvariate(5, 0.9)) + 1 for _ in range(16)]
        rows = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
        out = Collator(0, regroup_rows=4)(rows)
        parts = out.get("micro_batches", [out])
        widths = sorted(lengths, reverse=True)
        by_rows = [4 * widths[k] for k in range(0, 16, 4)]  # 4-row micro-batches, longest first
        assert sum(p["input_ids"].shape[0] for p in parts) == 16
        assert max(p["input_ids"].numel() for p in parts) <= max(by_rows)
        assert sum(p["input_ids"].numel() for p in parts) + MICRO_BATCH_COST * len(parts) <= sum(
            by_rows
        ) + MICRO_BATCH_COST * len(by_rows)


def test_collated_micro_batches_hold_the_steps_rows():
    rows = [
        {"input_ids": list(range(n)), "labels": [-100] * (n // 2) + list(range(n // 2, n))}
        for n in (9, 3, 7, 5)
    ]
    out = Collator(0, max_tokens_per_batch=14)(rows)
    parts = out["micro_batches"]
    assert [p["input_ids"].shape for p in parts] == [
        torch.Size([1, 9]),
        torch.Size([1, 7]),
        torch.Size([2, 5]),
    ]
    supervised = sum(int((p["labels"] != -100).sum()) for p in parts)
    assert supervised == int((out["labels"] != -100).sum())
    assert "micro_batches" not in Collator(0, max_tokens_per_batch=100)(rows)  # one group: the step itself


def _calls(monkeypatch):
    """Records the shape of every training forward (the chunked loss is the training path)."""
    import lorakit.training.loss as loss

    shapes = []
    real = loss.causal_lm_loss

    def spy(model, inputs, *a, **kw):
        if model.training:
            shapes.append(tuple(inputs["input_ids"].shape))
        return real(model, inputs, *a, **kw)

    monkeypatch.setattr(loss, "causal_lm_loss", spy)
    return shapes


@pytest.mark.parametrize("padding_free", [False, True])
def test_token_budget_trains_the_same_steps_in_fewer_larger_micro_batches(
    tmp_path, tiny_llama, varied, monkeypatch, padding_free
):
    common = dict(max_steps=6, batch_size=2, gradient_accumulation_steps=4, padding_free=padding_free)
    shapes = _calls(monkeypatch)
    rows_ref = train(base_cfg(tiny_llama, varied, tmp_path / "rows", regroup_micro_batches=False, **common))
    by_rows = list(shapes)
    shapes.clear()
    tokens_ref = train(base_cfg(tiny_llama, varied, tmp_path / "tokens", max_tokens_per_batch=320, **common))
    by_tokens = list(shapes)

    assert len(by_rows) == 6 * 4
    assert len(by_tokens) < len(by_rows)  # larger micro-batches
    assert all(b * t <= 320 or (b == 1 and not padding_free) for b, t in by_tokens)
    _same_training(rows_ref, tokens_ref)
    saved = (tokens_ref / "lorakit.yaml").read_text()
    assert "max_tokens_per_batch: 320" in saved and "batch_size: 2" in saved  # the user's settings


def test_regrouped_rows_train_the_same_steps_with_less_padding(tmp_path, tiny_llama, varied, monkeypatch):
    common = dict(max_steps=6, batch_size=2, gradient_accumulation_steps=4)
    shapes = _calls(monkeypatch)
    rows_ref = train(base_cfg(tiny_llama, varied, tmp_path / "rows", regroup_micro_batches=False, **common))
    by_rows = list(shapes)
    shapes.clear()
    regrouped = train(base_cfg(tiny_llama, varied, tmp_path / "regrouped", **common))
    by_size = list(shapes)

    assert len(by_rows) == 6 * 4 and all(b == 2 for b, _ in by_rows)
    assert sum(b * t for b, t in by_size) < sum(b * t for b, t in by_rows)  # less padding
    assert max(b * t for b, t in by_size) <= max(b * t for b, t in by_rows)  # no larger peak
    assert any(b != 2 for b, _ in by_size)
    _same_training(rows_ref, regrouped)
    assert "batch_size: 2" in (regrouped / "lorakit.yaml").read_text()


def _same_training(rows_ref, other):
    def losses(out):
        return [
            r["loss"]
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        ]

    assert losses(other) == pytest.approx(losses(rows_ref), rel=1e-5)
    a = load_file(rows_ref / "adapter_model.safetensors")
    b = load_file(other / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_out_of_memory_halves_the_token_budget(tmp_path, tiny_llama, varied, monkeypatch):
    seen = inject_oom(monkeypatch, lambda state, args, seen: state.global_step == 2 and len(seen) < 4)
    out = train(
        base_cfg(
            tiny_llama,
            varied,
            tmp_path / "o",
            max_steps=4,
            batch_size=2,
            gradient_accumulation_steps=4,
            max_tokens_per_batch=512,
        )
    )
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["status"] == "finished"
    assert [b["max_tokens_per_batch"] for b in summary["oom_backoffs"]] == [256]
    assert {(bs, ga) for _, bs, ga in seen} == {(8, 1)}  # the step's rows never changed
    assert "max_tokens_per_batch: 256" in (out / "lorakit.yaml").read_text()


def test_useful_flops_by_hand():
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    shape = Shape.of(config)
    # per layer: q 32x32 + k 32x16 + v 32x16 + o 32x32 + gate/up/down 3 x 32x64 = 9216
    assert shape.linear == 2 * 9216 and shape.attention_width == 32
    # 10 tokens in rows of 3 and 7 (9 + 49 = 58), 4 labels, 100 LoRA weights
    expected = (4 * 18432 + 6 * 100) * 10 + 6 * 2 * 32 * 58 + 4 * 100 * 32 * 4
    assert useful_flops(shape, 100, 10, 58, 4) == expected


def test_counter_reads_padded_and_packed_batches_alike():
    rows = [{"input_ids": list(range(n)), "labels": [-100] * 2 + list(range(2, n))} for n in (3, 7, 5)]
    totals = []
    for packed in (False, True):
        counter = Counter()
        counter.add(Collator(0, padding_free=packed)(rows))
        counter.settle()
        totals.append((counter.tokens, counter.squared))
    assert totals[0] == totals[1] == (15, 9 + 49 + 25)


def test_every_run_reports_its_efficiency(tmp_path, tiny_llama, varied):
    out = train(base_cfg(tiny_llama, varied, tmp_path / "o", max_steps=3))
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["useful_flops"] > 0 and summary["useful_flops_per_second"] > 0
    assert summary["peak_source"].startswith("measured fp32 matmul")
    assert 0 < summary["fraction_of_peak"] < 1
    # The counter saw exactly the real tokens the Trainer counted.
    shape = Shape.of(__import__("transformers").AutoConfig.from_pretrained(tiny_llama))
    per_token_floor = 4 * shape.linear * summary["tokens_seen"]
    assert summary["useful_flops"] > per_token_floor


def test_attention_choice():
    assert attention_implementation("auto", EAGER_MAX_TOKENS_CPU) == "eager"
    assert attention_implementation("auto", EAGER_MAX_TOKENS_CPU + 1) == "sdpa"
    assert attention_implementation("sdpa", 10) == "sdpa"


def test_a_run_without_quantization_does_not_import_bitsandbytes(tmp_path, tiny_llama, varied):
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from lorakit.cli import main\n"
        f"code = main(['train', '--base_model', {str(tiny_llama)!r}, '--dataset', {str(varied)!r}, "
        f"'--output_dir', {str(tmp_path / 'o')!r}, '--max_steps', '2', '--lora_r', '4', '--report_to', 'none'])\n"
        "print('RESULT', code, sys.modules.get('bitsandbytes') is not None)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert "RESULT 0 False" in proc.stdout, proc.stderr[-2000:]
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()


def test_bitsandbytes_is_kept_for_what_needs_it():
    from lorakit.core.config import TrainConfig
    from lorakit.training.launch import needs_bitsandbytes

    assert not needs_bitsandbytes(TrainConfig())
    assert needs_bitsandbytes(TrainConfig(load_in_4bit=True))
    assert needs_bitsandbytes(TrainConfig(optim="paged_adamw_8bit"))
    assert needs_bitsandbytes(TrainConfig(optim="adamw_bnb_8bit"))


def test_bf16_runs_the_chunked_loss_under_autocast(tmp_path, tiny_llama, varied, monkeypatch):
    from lorakit.models.loading import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("this CPU has no bf16")
    import lorakit.training.loss as loss

    seen = []
    real = loss.causal_lm_loss

    def spy(model, inputs, *a, **kw):
        if model.training:
            seen.append(
                torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            )
        return real(model, inputs, *a, **kw)

    monkeypatch.setattr(loss, "causal_lm_loss", spy)
    train(base_cfg(tiny_llama, varied, tmp_path / "o", max_steps=2, bf16=True))
    assert seen and all(seen)


def test_bf16_speed_paths_train_bit_for_bit_as_plain_autocast(tmp_path, tiny_llama, varied, monkeypatch):
    """Frozen linear weights held in bf16, LoRA inputs left in bf16, the LM head cast once: the
    matmuls see the same bf16 values as when autocast casts everything at every use."""
    import lorakit.models.loading as models
    import lorakit.training.loss as loss
    import lorakit.training.train as lktrain

    if not models.cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16")
    common = dict(max_steps=4, bf16=True, batch_size=2, gradient_accumulation_steps=2, lora_dropout=0.1)
    real, cast = models.half_linear_weights, []

    def spy(*a, **kw):
        cast.append(real(*a, **kw))
        return cast[-1]

    monkeypatch.setattr(lktrain, "half_linear_weights", spy)
    fast = train(base_cfg(tiny_llama, varied, tmp_path / "fast", **common))
    assert cast and cast[0] > 0
    monkeypatch.setattr(lktrain, "half_linear_weights", lambda *a, **kw: 0)
    monkeypatch.setattr(lktrain, "keep_lora_input_dtype", lambda *a, **kw: 0)
    monkeypatch.setattr(loss, "_lm_head", lambda head: head)
    plain = train(base_cfg(tiny_llama, varied, tmp_path / "plain", **common))

    def losses(out):
        rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        return [r["loss"] for r in rows if "loss" in r]

    assert losses(fast) == losses(plain)
    a, b = load_file(fast / "adapter_model.safetensors"), load_file(plain / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float32 for v in a.values())


def test_the_lm_head_is_cast_once_under_autocast():
    from lorakit.training.loss import _lm_head

    head = torch.nn.Linear(8, 11, bias=False).requires_grad_(False)
    h = torch.randn(3, 8)
    assert _lm_head(head) is head  # no autocast: the module itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f, g = _lm_head(head), _lm_head(head)
        assert f.keywords["weight"] is g.keywords["weight"]  # cast once, kept
        assert torch.equal(f(h), head(h))
        with torch.no_grad():
            head.weight.add_(1.0)  # a changed weight is cast again
        assert torch.equal(_lm_head(head)(h), head(h))
    head.weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _lm_head(head) is head  # a trained head: autocast caches it itself


def test_half_linear_weights_leave_the_tied_embedding_and_trained_layers_fp32(tiny_llama):
    from transformers import AutoModelForCausalLM

    from lorakit.core.config import TrainConfig
    from lorakit.models.loading import add_lora, half_linear_weights

    cfg = TrainConfig(lora_r=4, bf16=True, modules_to_save=["lm_head"])
    model = add_lora(cfg, AutoModelForCausalLM.from_pretrained(tiny_llama))
    cast = half_linear_weights(model, cfg, "bf16")
    if cast == 0:  # a CUDA machine loads the base in bf16 already
        pytest.skip("the base is not fp32 here")
    assert model.get_input_embeddings().weight.dtype == torch.float32
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.dtype == torch.bfloat16
    assert q.lora_A["default"].weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
