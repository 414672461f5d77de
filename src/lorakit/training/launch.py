"""Multi-process training through accelerate (DDP, FSDP, DeepSpeed): `--num_processes N`
re-runs the same `lorakit train` command under `accelerate launch` with the shipped config."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

from ..core.config import TrainConfig
from ..core.files import say


def accelerate_config(name: str) -> Path:
    return Path(str(resources.files("lorakit") / "assets" / "accelerate" / f"{name}.yaml"))


def under_launcher() -> bool:
    """torchrun and accelerate launch set these in every process they start."""
    return "RANK" in os.environ or "LOCAL_RANK" in os.environ


def launch_command(cfg: TrainConfig, argv: list[str]) -> list[str]:
    import torch

    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(cfg.num_processes),
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "--mixed_precision",
        {"fp32": "no"}.get(cfg.precision, cfg.precision),
    ]
    if cfg.distributed == "ddp":
        # accelerate's multi-GPU launcher is torch.distributed.run; without GPUs the processes
        # use the gloo backend on CPU (accelerate's own multi-CPU mode needs mpirun).
        cmd.append("--multi_gpu")
    else:
        if not torch.cuda.is_available():
            say(
                f"lorakit: note: {cfg.distributed} is meant for GPUs; on CPU use --distributed ddp",
                flush=True,
            )
        cmd += ["--config_file", str(accelerate_config(cfg.distributed))]
    return [*cmd, "-m", "lorakit", *argv]


def launch(cfg: TrainConfig, argv: list[str]) -> int:
    cmd = launch_command(cfg, argv)
    say(f"lorakit: launching {cfg.num_processes} processes: {' '.join(cmd[2:])}", flush=True)
    return subprocess.call(cmd)


BITSANDBYTES_OPTIMIZERS = ("bnb", "8bit", "32bit", "paged", "lion", "ademamix")


def needs_bitsandbytes(cfg: TrainConfig) -> bool:
    """4/8-bit loading and transformers' bitsandbytes optimizers (adamw_bnb_8bit, paged_adamw_8bit,
    lion_32bit, ademamix, ...) need bitsandbytes; nothing else in a training run does."""
    return cfg.load_in_4bit or cfg.load_in_8bit or any(k in cfg.optim for k in BITSANDBYTES_OPTIMIZERS)


def train_command(cfg: TrainConfig, argv: list[str]) -> int:
    """`lorakit train`: in this process, or again under `accelerate launch` with --num_processes N."""
    if cfg.num_processes > 1 and not under_launcher():
        return launch(cfg, argv)
    if not needs_bitsandbytes(cfg):
        # peft and transformers import bitsandbytes whenever it is installed (and it pulls in
        # torch._inductor): seconds of every run. A None entry in sys.modules is Python's own way
        # to make a module unimportable; both libraries then see it as absent. Only here, in a
        # `lorakit train` process that will never quantize, never in library use.
        sys.modules.setdefault("bitsandbytes", None)
    from .train import train

    train(cfg)
    return 0
