"""Defaults that are right for anyone's data, and the adapter's own settings at inference."""

from __future__ import annotations

import json
import shutil

import pytest

from lorakit.cli import main
from lorakit.core.config import EvalConfig, GenerateConfig, PlanConfig, TrainConfig
from lorakit.core.errors import LorakitError
from lorakit.core.fields import resolve
from lorakit.training.train import train

from .conftest import assemble_rows, tiny_train_config, write_jsonl

OLD_DEFAULT = "You are an expert SNES developer."


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "d.jsonl", assemble_rows(24))


def tiny_cfg(base, data, out, **kw):
    return tiny_train_config(base, data, out, **{"max_steps": 4, "save_steps": 2, **kw})


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama, data):
    return train(
        tiny_cfg(tiny_llama, data, tmp_path_factory.mktemp("a") / "run", system_prompt="Adapter prompt.")
    )


def test_no_system_prompt_unless_given(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(src), "--output", str(out)]) == 0
    [row] = [json.loads(x) for x in out.read_text().splitlines()]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert main(["data", "convert", str(src), "--output", str(out), "--system_prompt", "Be brief."]) == 0
    [row] = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["messages"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize(
    ("given", "used"),
    [(None, "Adapter prompt."), ("", ""), (OLD_DEFAULT, OLD_DEFAULT), ("Other.", "Other.")],
)
def test_explicit_system_prompt_overrides_the_adapters(tmp_path, adapter, given, used):
    """Unset inherits the adapter's training prompt; any given value wins, the old default included."""
    from lorakit.workflows.evaluate import evaluate

    test_rows = write_jsonl(
        tmp_path / "t.jsonl", [{"instruction": "Assemble.", "input": "NOP", "output": "EA"}]
    )
    report = evaluate(
        EvalConfig(
            adapter=str(adapter),
            dataset=str(test_rows),
            output_dir=str(tmp_path / "e"),
            max_new_tokens=2,
            system_prompt=given,
        )
    )
    assert report["system_prompt"] == used


def test_flag_and_yaml_system_prompt_given_as_empty_is_not_unset(tmp_path):
    assert resolve(GenerateConfig, {}).system_prompt is None
    assert resolve(GenerateConfig, {"system_prompt": ""}).system_prompt == ""
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("system_prompt: ''\n")
    assert resolve(GenerateConfig, config_file=str(yaml_file)).system_prompt == ""


def test_generate_is_greedy_by_default(tiny_llama, adapter):
    import torch

    from lorakit.inference.generate import generate

    cfg = GenerateConfig(base_model=str(tiny_llama), adapter=str(adapter), max_new_tokens=12)
    torch.manual_seed(1)
    first = generate(cfg, "Assemble this.")
    torch.manual_seed(2)
    assert generate(cfg, "Assemble this.") == first and len(first) > 0


def test_exclusive_flags_refused_by_every_config():
    for cls in (TrainConfig, PlanConfig):
        with pytest.raises(LorakitError, match="--fp16 and --bf16 are exclusive"):
            cls(fp16=True, bf16=True)
        with pytest.raises(LorakitError, match="--load_in_4bit and --load_in_8bit are exclusive"):
            cls(load_in_4bit=True, load_in_8bit=True)
    assert main(["plan", "--fp16", "--bf16"]) == 2


def test_resume_refuses_another_base_model_but_not_another_path(
    tmp_path, tiny_llama, tiny_qwen2, data, capsys
):
    out = tmp_path / "run"
    train(tiny_cfg(tiny_llama, data, out))
    (out / "adapter_config.json").unlink()  # as if stopped before the end
    flags = [
        "train",
        "--dataset",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        "4",
        "--save_steps",
        "2",
    ]
    flags += [
        "--batch_size",
        "4",
        "--gradient_accumulation_steps",
        "1",
        "--lora_r",
        "4",
        "--lora_dropout",
        "0",
    ]
    flags += ["--warmup_steps", "0", "--logging_steps", "1", "--learning_rate", "1e-3", "--resume"]
    capsys.readouterr()
    assert main([*flags, "--base_model", str(tiny_qwen2)]) == 2
    err = capsys.readouterr().err
    assert f"the base model changed (--base_model {tiny_qwen2}" in err and err.count("\n") == 1
    moved = shutil.copytree(tiny_llama, tmp_path / "same-weights-elsewhere")
    assert main([*flags, "--base_model", str(moved)]) == 0
    assert (out / "adapter_config.json").is_file()


def test_skipped_rows_are_listed_in_the_summary_and_manifest(tmp_path, tiny_llama, data, capsys):
    rows = data.read_text().splitlines() + ['{"instruction": "no output"}', "not json"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    out = train(tiny_cfg(tiny_llama, bad, tmp_path / "o", skip_bad_rows=True))
    printed = capsys.readouterr().out
    assert (
        f"skipped {bad}:25: missing key 'output'" in printed and f"skipped {bad}:26: invalid JSON" in printed
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r.split(":")[1] for r in manifest["data"]["skipped_rows"]] == ["25", "26"]


def test_demo_held_out_rows_share_no_operand_with_training():
    import re

    from lorakit.data.sources import demo_path

    def operands(split):
        rows = [json.loads(x) for x in demo_path(split).read_text().splitlines()]
        return [m.group(1) for r in rows if (m := re.search(r"\$([0-9A-F]{2})$", r["input"]))], len(rows)

    test_ops, n_test = operands("test")
    train_ops, _ = operands("train")
    assert len(test_ops) == n_test == 40 and len(train_ops) > 150
    assert not set(test_ops) & set(train_ops)


def test_sweep_best_yaml_is_the_full_run(tmp_path, tiny_llama, data):
    """best.yaml keeps the best trial's settings but the sweep's own schedule, not the budget."""
    import dataclasses

    from lorakit.core.config import SweepConfig
    from lorakit.core.fields import to_yaml
    from lorakit.workflows.sweep import Sweep, Trial

    cfg = SweepConfig(
        base_model=str(tiny_llama),
        dataset=str(data),
        output_dir=str(tmp_path / "s"),
        batch_size=4,
        gradient_accumulation_steps=1,
        num_epochs=2,
        val_size=4,
        budget_steps=3,
        param=["learning_rate=1e-3,1e-4"],
    )
    s = Sweep(cfg)
    overrides = {"learning_rate": 1e-3}
    trial_cfg = s.trial_config(overrides, s.steps_budget(), 1)
    assert trial_cfg.max_steps == 3
    full = s.full_run_config(Trial(overrides, config=dataclasses.asdict(trial_cfg)))
    (tmp_path / "best.yaml").write_text(to_yaml(full))
    again = resolve(TrainConfig, config_file=str(tmp_path / "best.yaml"))
    assert again.learning_rate == 1e-3 and again.max_steps == 0 and again.num_epochs == 2
    assert again.total_steps(s.n_rows) == 10  # 20 training rows / 4 per step x 2 epochs, not 3


def test_eval_with_skipped_rows_keeps_each_score_on_its_row(tmp_path, adapter):
    from lorakit.workflows.evaluate import evaluate

    rows = [
        {"instruction": "Assemble.", "input": "NOP", "output": "EA"},
        {"instruction": "Assemble.", "input": "bad", "output": "x<|im_end|>y"},  # skipped at encoding
        {"instruction": "Assemble.", "input": "INX", "output": "E8"},
    ]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    report = evaluate(
        EvalConfig(
            adapter=str(adapter),
            dataset=str(data),
            output_dir=str(tmp_path / "e"),
            max_new_tokens=2,
            skip_bad_rows=True,
        )
    )
    assert [(r["source"].rsplit(":", 1)[1], r["reference"]) for r in report["rows"]] == [
        ("1", "EA"),
        ("3", "E8"),
    ]
