"""Bad input anywhere gets one clear line: every command's flags and the files commands read.

Each case runs the real CLI entry point and asserts: exit code 2, exactly one line on stderr
starting with `lorakit: error:` that names the flag (or the file), no traceback, and no output
directory created.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.cli import COMMANDS, main
from lorakit.core.config import TrainConfig
from lorakit.core.fields import _type_of

CONFIG_COMMANDS = [c for c in COMMANDS if c.config is not None]


def argv_of(command) -> list[str]:
    return command.name.split() + (["prompt"] if command.name == "generate" else [])


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own exit
            rc = e.code
    return rc, err.getvalue()


def assert_one_line_error(rc: int, err: str, *names: str) -> None:
    lines = err.strip("\n").split("\n")
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("lorakit: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, err)


def checked_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("check") is not None]


def out_of_range(kind, check) -> object:
    """One value the check refuses, found by walking out from its bounds."""
    candidates = [-1, 0, -(10**9), 10**9, 70000] if kind is int else [-1.0, 0.0, 1.0, 2.5, -1e30, 1e30]
    for v in candidates:
        if not check(v):
            return v
    raise AssertionError(f"no out-of-range value for {check.text}")


def test_every_checked_flag_of_every_command_refuses_an_out_of_range_value(tmp_path):
    seen = 0
    for command in CONFIG_COMMANDS:
        out = tmp_path / command.name.replace(" ", "-")
        extra = (
            ["--output_dir", str(out)]
            if "output_dir" in {f.name for f in dataclasses.fields(command.config)}
            else []
        )
        for f in checked_fields(command.config):
            kind = _type_of(command.config, f.name)
            if typing.get_origin(kind) is list:
                value = ","  # splits to no value at all
            elif kind is str:
                value = "lots"
            else:
                value = str(out_of_range(kind, f.metadata["check"]))
            rc, err = run_cli([*argv_of(command), *extra, f"--{f.name}", value])
            assert_one_line_error(rc, err, f"--{f.name}", f.metadata["check"].text)
            assert not out.exists()
            seen += 1
    assert seen > 60


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=lambda c: c.name)
def test_flag_errors_come_before_torch_is_imported(command):
    checked = checked_fields(command.config)
    if checked:
        field = checked[0]
        kind = _type_of(command.config, field.name)
        value = (
            "lots"
            if kind is str
            else ","
            if typing.get_origin(kind) is list
            else str(out_of_range(kind, field.metadata["check"]))
        )
        bad = [f"--{field.name}", value]
    else:  # a command with switches only: a switch given a value
        field = dataclasses.fields(command.config)[0]
        bad = [f"--{field.name}=oops"]
    code = (
        "import sys; from lorakit.cli import main\n"
        f"try:\n    rc = main({[*argv_of(command), *bad]!r})\n"
        "except SystemExit as e:\n    rc = e.code\n"
        "print(rc, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
    assert_one_line_error(2, proc.stderr, f"--{field.name}")


def _junk_for(cls, f: dataclasses.Field):
    """A strategy of command-line strings that are never a valid value of field `f`."""
    kind = _type_of(cls, f.name)
    check = f.metadata.get("check")
    not_number = st.text(min_size=1, max_size=12).filter(lambda t: not _parses(t) and not t.startswith("-"))
    if kind is int:
        bad_numbers = st.integers(-(10**15), 10**15).filter(lambda v: check is not None and not check(v))
        return st.one_of(not_number, bad_numbers.map(str), st.floats(allow_nan=False).map(lambda v: f"{v}x"))
    if kind is float:
        bad = st.floats(allow_nan=True, allow_infinity=True).filter(
            lambda v: not math.isfinite(v) or (check is not None and not check(v))
        )
        return st.one_of(not_number, bad.map(repr))
    if f.metadata.get("choices"):
        return st.text(max_size=12).filter(lambda t: t not in f.metadata["choices"] and not t.startswith("-"))
    return None


def _parses(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _fuzzable(command) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(command.config) if _junk_for(command.config, f) is not None]


@pytest.mark.parametrize("command", [c for c in CONFIG_COMMANDS if _fuzzable(c)], ids=lambda c: c.name)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_flags_get_one_line(command, data, tmp_path):
    fields = _fuzzable(command)
    f = data.draw(st.sampled_from(fields))
    value = data.draw(_junk_for(command.config, f))
    out = tmp_path / "never"
    extra = (
        ["--output_dir", str(out)]
        if "output_dir" in {x.name for x in dataclasses.fields(command.config)}
        else []
    )
    rc, err = run_cli([*argv_of(command), *extra, f"--{f.name}", value])
    assert_one_line_error(rc, err, f"--{f.name}")
    assert not out.exists()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
@settings(max_examples=15, deadline=None)
@given(name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_é", min_size=1, max_size=20))
def test_unknown_flags_get_one_line(command, name):
    if command.config is not None and name in {f.name for f in dataclasses.fields(command.config)}:
        return
    rc, err = run_cli([*argv_of(command), f"--{name}x", "1"])
    assert_one_line_error(rc, err, f"--{name}x")


def test_list_flags_take_spaces_and_commas(tmp_path):
    from lorakit.core.fields import resolve

    for value in (["q_proj,v_proj"], ["q_proj", "v_proj"], ["q_proj, v_proj"], ["q_proj,", "v_proj"]):
        assert resolve(TrainConfig, {"target_modules": value}).target_modules == ["q_proj", "v_proj"]
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("target_modules: q_proj,v_proj\nmodules_to_save: [lm_head, embed_tokens]\n")
    cfg = resolve(TrainConfig, config_file=str(yaml_file))
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.modules_to_save == ["lm_head", "embed_tokens"]
    # Values that hold commas themselves are kept whole.
    from lorakit.core.config import SweepConfig

    assert resolve(SweepConfig, {"param": ["learning_rate=1e-4,2e-4"]}).param == ["learning_rate=1e-4,2e-4"]


def test_yaml_values_are_checked_with_file_and_line(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lora_r: 8\nlearning_rate: -2e-4\n")
    rc, err = run_cli(["train", "--config", str(yaml_file)])
    assert_one_line_error(rc, err, f"{yaml_file}:2", "learning_rate", "> 0")
    yaml_file.write_text("lora_r: [8\n")
    rc, err = run_cli(["plan", "--config", str(yaml_file)])
    assert_one_line_error(rc, err, f"{yaml_file}:", "not valid YAML")


# ------------------------------------------------------------------------------------------------
# Files


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama):
    from lorakit.training.train import train

    from .conftest import write_jsonl

    data = write_jsonl(
        tmp_path_factory.mktemp("d") / "d.jsonl",
        [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(8)],
    )
    out = tmp_path_factory.mktemp("a") / "adapter"
    cfg = TrainConfig(
        base_model=str(tiny_llama),
        dataset=str(data),
        output_dir=str(out),
        max_steps=1,
        lora_r=4,
        batch_size=4,
    )
    return train(cfg)


def damaged_copy(adapter: Path, dest: Path, name: str, content: bytes) -> Path:
    import shutil

    copy = shutil.copytree(adapter, dest)
    (copy / name).write_bytes(content)
    return copy


ADAPTER_COMMANDS = [
    ["merge", "--adapter", "{adapter}", "--output_dir", "{out}"],
    ["export", "gguf", "--adapter", "{adapter}", "--output_dir", "{out}"],
    ["eval", "--adapter", "{adapter}", "--output_dir", "{out}"],
    ["generate", "--adapter", "{adapter}", "hello"],
]


@pytest.mark.parametrize("argv", ADAPTER_COMMANDS, ids=lambda a: a[0])
@pytest.mark.parametrize("damage", ["truncated weights", "malformed config", "wrong rank", "no weights"])
def test_damaged_adapters_get_one_line_naming_the_file(tmp_path, adapter, argv, damage):
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    config = json.loads((adapter / "adapter_config.json").read_text())
    broken, name = tmp_path / "a", "adapter_model.safetensors"
    if damage == "truncated weights":
        damaged_copy(adapter, broken, name, weights[: len(weights) // 2])
    elif damage == "malformed config":
        damaged_copy(adapter, broken, "adapter_config.json", b'{"r": 4,')
        name = "adapter_config.json"
    elif damage == "wrong rank":
        damaged_copy(adapter, broken, "adapter_config.json", json.dumps({**config, "r": 8}).encode())
    else:
        damaged_copy(adapter, broken, name, b"").joinpath(name).unlink()
    out = tmp_path / "out"
    rc, err = run_cli([a.format(adapter=broken, out=out) for a in argv])
    assert_one_line_error(rc, err, name)
    assert not out.exists()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.0, 0.999))
def test_any_truncation_of_the_weights_is_one_line(tmp_path_factory, adapter, cut):
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    broken = damaged_copy(
        adapter,
        tmp_path_factory.mktemp("t") / "a",
        "adapter_model.safetensors",
        weights[: int(len(weights) * cut)],
    )
    rc, err = run_cli(["generate", "--adapter", str(broken), "hello"])
    assert_one_line_error(rc, err, "adapter_model.safetensors")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.0, 0.999))
def test_any_truncation_of_the_adapter_config_is_one_line(tmp_path_factory, adapter, cut):
    text = (adapter / "adapter_config.json").read_bytes()
    broken = damaged_copy(
        adapter, tmp_path_factory.mktemp("t") / "a", "adapter_config.json", text[: int(len(text) * cut)]
    )
    rc, err = run_cli(["merge", "--adapter", str(broken), "--output_dir", str(broken.parent / "m")])
    assert_one_line_error(rc, err, "adapter_config.json")
    assert not (broken.parent / "m").exists()


def test_damaged_tokenizer_gguf_checkpoint_and_metrics(tmp_path, adapter, tiny_llama):
    import shutil

    # A damaged tokenizer beside the adapter.
    broken = damaged_copy(adapter, tmp_path / "tok", "tokenizer.json", b'{"version": "1.0", "model": ')
    rc, err = run_cli(["generate", "--adapter", str(broken), "hello"])
    assert_one_line_error(rc, err, str(broken), "tokenizer")
    # A file named .gguf that is not one.
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"NOTGGUF" + b"\0" * 64)
    rc, err = run_cli(["generate", "--base_model", str(fake), "hello"])
    assert_one_line_error(rc, err, str(fake))
    # A checkpoint whose marker is damaged, on --resume.
    run = tmp_path / "run"
    shutil.copytree(adapter, run)
    (run / "adapter_config.json").unlink()
    [ckpt] = sorted(run.glob("checkpoint-*")) or [None]
    if ckpt is None:
        ckpt = run / "checkpoint-1"
        ckpt.mkdir()
    (ckpt / "lorakit-checkpoint.json").write_text("{not json")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(8)))
    rc, err = run_cli(
        [
            "train",
            "--base_model",
            str(tiny_llama),
            "--dataset",
            str(data),
            "--output_dir",
            str(run),
            "--resume",
        ]
        + ["--max_steps", "1", "--lora_r", "4", "--batch_size", "4"]
    )
    assert_one_line_error(rc, err, "lorakit-checkpoint.json")
    # A damaged metrics.jsonl (not its last line, which a kill may cut short).
    from lorakit.core.errors import LorakitError
    from lorakit.training.monitor import metrics_rows

    (run / "metrics.jsonl").write_text('{"step": 1}\n{broken\n{"step": 2}\n')
    with pytest.raises(LorakitError, match=r"metrics.jsonl:2: not valid JSON"):
        metrics_rows(run)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    assert metrics_rows(run) == [{"step": 1}]


def test_zero_steps_and_zero_rows_are_refused(tmp_path, adapter, tiny_llama):
    # An eval on a file with no conversation rows.
    text_rows = tmp_path / "t.jsonl"
    text_rows.write_text(json.dumps({"text": "plain text"}) + "\n")
    rc, err = run_cli(
        ["eval", "--adapter", str(adapter), "--dataset", str(text_rows), "--output_dir", str(tmp_path / "e")]
    )
    assert_one_line_error(rc, err, "no conversation rows")
    assert not (tmp_path / "e").exists()
    # --num_epochs 0 is refused before anything runs.
    rc, err = run_cli(["train", "--num_epochs", "0", "--output_dir", str(tmp_path / "o")])
    assert_one_line_error(rc, err, "--num_epochs", "> 0")
