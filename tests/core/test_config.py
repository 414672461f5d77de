import subprocess
import sys

import pytest

from lorakit.cli import main
from lorakit.core.config import TrainConfig
from lorakit.core.errors import LorakitError
from lorakit.core.fields import read_yaml, resolve, to_yaml

GUIDE_FLAGS = [
    "--base_model",
    "--dataset",
    "--output_dir",
    "--lora_r",
    "--lora_alpha",
    "--lora_dropout",
    "--target_modules",
    "--batch_size",
    "--gradient_accumulation_steps",
    "--learning_rate",
    "--num_epochs",
    "--warmup_steps",
    "--weight_decay",
    "--fp16",
    "--bf16",
    "--gradient_checkpointing",
    "--max_seq_length",
    "--max_steps",
    "--system_prompt",
    "--seed",
]


def test_train_help_lists_every_guide_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in GUIDE_FLAGS:
        assert flag in text, flag


def test_help_does_not_import_torch():
    code = (
        "import sys; from lorakit.cli import _parser; _parser().format_help(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_precedence_defaults_yaml_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lora_r: 8\nlearning_rate: 2e-4\nbatch_size: 2\ntarget_modules: q_proj,v_proj\n")
    cfg = resolve(TrainConfig, {"batch_size": 16}, str(yaml_file))
    assert cfg.lora_r == 8  # YAML over default
    assert cfg.batch_size == 16  # flag over YAML
    assert cfg.learning_rate == pytest.approx(2e-4) and isinstance(
        cfg.learning_rate, float
    )  # YAML reads 2e-4 as a string
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.lora_alpha == TrainConfig().lora_alpha  # untouched default


def test_unknown_key_names_closest_and_line(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lora_r: 8\nlora_rank: 16\n")
    with pytest.raises(LorakitError, match=r"run.yaml:2: unknown key 'lora_rank'; did you mean 'lora_r'"):
        read_yaml(yaml_file, TrainConfig)


@pytest.mark.parametrize(
    "text,match",
    [
        ("lora_r: 1.5\n", "key 'lora_r' must be int"),
        ("fp16: yes please\n", "key 'fp16' must be bool"),
        ("overlength: chop\n", "must be one of drop, truncate, error"),
        ("- a\n- b\n", "must be a mapping"),
        ("lora_r: [1\n", "not valid YAML"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, text, match):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(text)
    with pytest.raises(LorakitError, match=match):
        read_yaml(yaml_file, TrainConfig)


def test_resolved_config_round_trips(tmp_path):
    cfg = TrainConfig(lora_r=8, learning_rate=3e-4, target_modules=["q_proj"], system_prompt="Be brief.")
    (tmp_path / "lorakit.yaml").write_text(to_yaml(cfg))
    assert resolve(TrainConfig, config_file=str(tmp_path / "lorakit.yaml")) == cfg


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow  # two real commands in processes of their own
def test_train_and_merge_print_lorakit_lines_not_library_noise(tmp_path, tiny_llama):
    """No per-stage bars of transformers ("Loading weights", "Writing model shards") and no
    third-party FutureWarning in a normal `lorakit train` and `lorakit merge`."""
    import os

    from ..conftest import assemble_rows, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", assemble_rows(8))
    env = {k: v for k, v in os.environ.items() if "PROGRESS_BARS" not in k}  # as a user's shell has it
    run = dict(capture_output=True, text=True, env=env, timeout=600)
    common = ["--max_steps", "2", "--batch_size", "4", "--lora_r", "4", "--gradient_checkpointing"]
    adapter = tmp_path / "adapter"
    train_args = [
        "train",
        "--base_model",
        str(tiny_llama),
        "--dataset",
        str(data),
        "--output_dir",
        str(adapter),
    ]
    trained = subprocess.run([sys.executable, "-m", "lorakit", *train_args, *common], **run)
    assert trained.returncode == 0, trained.stderr[-3000:]
    merge_args = ["merge", "--adapter", str(adapter), "--output_dir", str(tmp_path / "merged")]
    merged = subprocess.run([sys.executable, "-m", "lorakit", *merge_args], **run)
    assert merged.returncode == 0, merged.stderr[-3000:]
    for r in (trained, merged):
        noise = r.stdout + r.stderr
        for text in ("Loading weights", "Writing model shards", "FutureWarning", "it/s]"):
            assert text not in noise, noise
    assert "step 1/2" in trained.stdout and "adapter written" in trained.stdout


def test_cli_unknown_key_exit_2_one_line(tmp_path):
    (tmp_path / "run.yaml").write_text("lora_alfa: 16\n")
    r = _cli("train", "--config", str(tmp_path / "run.yaml"), "--output_dir", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "did you mean 'lora_alpha'" in r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_missing_dataset_exit_2_one_line(tmp_path):
    r = _cli("train", "--dataset", str(tmp_path / "nope.jsonl"), "--output_dir", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "dataset file not found" in r.stderr and "nope.jsonl" in r.stderr
    assert not (tmp_path / "out").exists()


def test_guide_example_reproduces_the_guide():
    from pathlib import Path

    cfg = resolve(
        TrainConfig, config_file=str(Path(__file__).parent.parent.parent / "examples" / "guide.yaml")
    )
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (64, 128, 0.05)
    assert (cfg.batch_size, cfg.gradient_accumulation_steps, cfg.learning_rate, cfg.num_epochs) == (
        4,
        4,
        2e-4,
        3,
    )
    assert (cfg.warmup_steps, cfg.weight_decay, cfg.fp16, cfg.gradient_checkpointing) == (
        100,
        0.01,
        True,
        True,
    )
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    "argv",
    [
        ["train"],
        ["generate"],
        ["plan"],
        ["sweep"],
        ["eval"],
        ["chat"],
        ["serve"],
        ["merge"],
        ["export", "gguf"],
        ["export", "all"],
        ["data", "check"],
        ["data", "convert"],
        ["models"],
        ["demo"],
    ],
)
def test_every_command_has_help(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0 and "usage: lorakit" in capsys.readouterr().out
