"""Two processes on this CPU (gloo), launched through accelerate by `lorakit train --num_processes 2`."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lorakit.core.config import PlanConfig
from lorakit.training.checkpoints import CHECKPOINT_MARKER
from lorakit.training.launch import accelerate_config

from ..conftest import assemble_rows, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "d.jsonl", assemble_rows(48))


def args(base, data, out, batch, procs, steps=8, *extra):
    return [
        "train",
        "--base_model",
        str(base),
        "--dataset",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        str(steps),
        "--batch_size",
        str(batch),
        "--gradient_accumulation_steps",
        "1",
        "--lora_dropout",
        "0",
        "--warmup_steps",
        "0",
        "--lora_r",
        "4",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        "--save_steps",
        "2",
        "--no-group_by_length",
        "--num_processes",
        str(procs),
        *extra,
    ]


def run(argv, **kw):
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *argv], capture_output=True, text=True, timeout=600, **kw
    )


def adapter(out):
    return load_file(out / "adapter_model.safetensors")


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, tiny_llama, data):
    one = run(args(tiny_llama, data, tmp_path / "one", 4, 1))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run(args(tiny_llama, data, tmp_path / "two", 2, 2))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "launching 2 processes" in two.stdout
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    # Same rows per step, gradients averaged over the same tokens: equal up to the order of the
    # floating-point reduction across processes.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    # Logged once: one line per step in metrics.jsonl, one progress line per step in the output.
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in x and '"summary"' not in x
    ]
    assert steps == list(range(1, 9))
    assert two.stdout.count("step 3/8 ") == 1 and two.stdout.count("adapter written to") == 1
    # Every rank's RNG state is in the checkpoint; the rest was written once by rank 0.
    ckpt = tmp_path / "two" / "checkpoint-8"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    assert not list((tmp_path / "two").glob(".staging-*"))


@pytest.mark.slow
def test_two_process_kill_and_resume(tmp_path, tiny_llama, data):
    full = run(args(tiny_llama, data, tmp_path / "full", 2, 2, 24))
    assert full.returncode == 0, full.stderr[-2000:]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", *args(tiny_llama, data, tmp_path / "k", 2, 2, 24)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = tmp_path / "k" / "checkpoint-6" / CHECKPOINT_MARKER
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert marker.exists()
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
    proc.wait()
    assert not (tmp_path / "k" / "adapter_model.safetensors").exists()
    resumed = run(args(tiny_llama, data, tmp_path / "k", 2, 2, 24, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = adapter(tmp_path / "full"), adapter(tmp_path / "k")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "name,kind",
    [
        ("ddp", "MULTI_GPU"),
        ("fsdp", "FSDP"),
        ("deepspeed_zero2", "DEEPSPEED"),
        ("deepspeed_zero3", "DEEPSPEED"),
    ],
)
def test_shipped_accelerate_configs_validate(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(accelerate_config(name)))
    assert cfg.distributed_type.value == kind
    if name == "fsdp":
        assert (
            cfg.fsdp_config["fsdp_use_orig_params"]
            and cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        )
    if name.startswith("deepspeed"):
        assert cfg.deepspeed_config["zero_stage"] == int(name[-1])


def test_launch_command_uses_accelerate():
    from lorakit.core.config import TrainConfig
    from lorakit.training.launch import launch_command

    cmd = launch_command(
        TrainConfig(num_processes=4, distributed="deepspeed_zero3", bf16=True), ["train", "--bf16"]
    )
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--config_file" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[cmd.index("--mixed_precision") + 1] == "bf16"
    assert cmd[-3:] == ["lorakit", "train", "--bf16"]


def test_planner_shards_by_engine():
    from lorakit.planning.memory import make_plan

    base = dict(base_model="Qwen2.5-7B", bf16=True, lora_r=16, batch_size=1, max_seq_length=512)
    single = make_plan(PlanConfig(**base))
    zero2 = make_plan(PlanConfig(**base, num_gpus=4, distributed="deepspeed_zero2"))
    fsdp = make_plan(PlanConfig(**base, num_gpus=4, distributed="fsdp"))
    assert (
        zero2.memory.optimizer_state == single.memory.optimizer_state // 4
        and zero2.memory.base_weights == single.memory.base_weights
    )
    assert fsdp.memory.base_weights == single.memory.base_weights // 4
    assert fsdp.total_bytes < zero2.total_bytes < single.total_bytes
