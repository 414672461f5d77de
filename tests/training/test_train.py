import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.core.config import TrainConfig
from lorakit.core.errors import LorakitError
from lorakit.core.fields import read_yaml
from lorakit.training.train import train


def tiny_cfg(base, data, out, **kw) -> TrainConfig:
    settings = dict(
        base_model=str(base),
        dataset=str(data),
        output_dir=str(out),
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        max_steps=4,
        warmup_steps=0,
        max_seq_length=128,
        logging_steps=1,
        seed=3,
    )
    settings.update(kw)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    from ..conftest import write_jsonl

    tmp = tmp_path_factory.mktemp("run")
    rows = [
        {"instruction": "Assemble.", "input": f"LDA #${v:02X}", "output": f"A9 {v:02X}"}
        for v in range(0, 256, 16)
    ]
    data = write_jsonl(tmp / "train.jsonl", rows)
    out = train(tiny_cfg(tiny_llama, data, tmp / "out"))
    return out, data


def test_outputs_written(trained):
    out, _ = trained
    names = {p.name for p in out.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "lorakit.yaml",
        "metrics.jsonl",
        "tokenizer.json",
    } <= names
    assert not any(n.endswith(".bin") for n in names)
    assert not any(n.startswith(".staging") for n in names)
    assert list((out / "runs").rglob("events.out.tfevents.*")), "TensorBoard event file under OUTPUT/runs"
    cfg = read_yaml(out / "lorakit.yaml", TrainConfig)
    assert cfg["lora_r"] == 8 and cfg["max_steps"] == 4
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in x for x in lines) and lines[-1]["summary"] and lines[-1]["steps"] == 4


def test_adapter_holds_trained_lora_tensors_only(trained):
    out, _ = trained
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    b_weights = [v for k, v in adapter.items() if "lora_B" in k]
    assert b_weights and all(v.abs().sum() > 0 for v in b_weights)  # B starts at zero: it was trained


def test_lora_changes_and_base_weights_frozen(tmp_path, monkeypatch, tiny_llama, small_dataset):
    """Train in-process and compare every non-LoRA parameter before and after."""
    import peft
    from transformers import AutoModelForCausalLM

    before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict().items()}
    captured = {}
    real = peft.get_peft_model

    def spy(model, config, *a, **kw):
        captured["model"] = real(model, config, *a, **kw)
        captured["lora_init"] = {
            n: p.detach().clone() for n, p in captured["model"].named_parameters() if "lora_" in n
        }
        return captured["model"]

    monkeypatch.setattr(peft, "get_peft_model", spy)
    train(tiny_cfg(tiny_llama, small_dataset, tmp_path / "out", max_steps=3))
    model = captured["model"]
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and not torch.equal(p.detach(), captured["lora_init"][name]), name
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p.detach(), before[key]), name
        assert not p.requires_grad, name


def test_adapter_reloads_with_plain_peft_same_logits(trained, tiny_llama):
    out, _ = trained
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.inference.generate import load_for_inference

    ids = torch.tensor([[1, 57, 1003, 42, 2, 7]])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(out)).eval()
    ours, _, _ = load_for_inference(str(tiny_llama), str(out))
    with torch.no_grad():
        a, b = plain(ids).logits, ours(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(ids).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, base)  # the adapter does something


def test_qwen2_family_trains(tmp_path, tiny_qwen2, small_dataset):
    out = train(
        tiny_cfg(tiny_qwen2, small_dataset, tmp_path / "out", max_steps=2, target_modules=["all-linear"])
    )
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert {m.rsplit(".", 1)[-1] for m in cfg["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_existing_adapter_is_not_overwritten(trained, tiny_llama):
    out, data = trained
    with pytest.raises(LorakitError, match="already holds an adapter"):
        train(tiny_cfg(tiny_llama, data, out))


def test_unknown_target_module_is_one_line(tmp_path, tiny_llama, small_dataset):
    with pytest.raises(LorakitError, match="--target_modules wq"):
        train(tiny_cfg(tiny_llama, small_dataset, tmp_path / "out", target_modules=["wq"]))


def test_fp16_on_cpu_is_refused(tmp_path, tiny_llama, small_dataset):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(LorakitError, match="--fp16 needs a CUDA GPU"):
        train(tiny_cfg(tiny_llama, small_dataset, tmp_path / "out", fp16=True))
    assert not (tmp_path / "out").exists()
