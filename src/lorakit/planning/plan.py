"""`lorakit plan`: will this run fit, and how long will it take — answered before renting a GPU.

Parameter counts come from PEFT itself, applied to the real model class built on the meta
device (no weights are downloaded or allocated). Activation memory is not a hand formula: one
real training step (forward with the loss, backward, AdamW step) of that meta model is traced
with a TorchDispatchMode that adds up the bytes of every storage created and frees them when
they die, and its peak is taken. Meta tensors carry shapes and dtypes but no data, so a 32B
step traces in seconds on a laptop. To keep that fast, the step is traced with 1 and with 2
decoder layers and extrapolated linearly in the number of layers (the layers are identical).
"""

from __future__ import annotations

import dataclasses
import shlex

from ..core.config import PlanConfig, TrainConfig
from ..core.errors import LorakitError
from ..core.fields import as_config
from .memory import GIB, GPUS, Plan, budget, make_plan, sequence_lengths
from .trace import load_model_config

# --------------------------------------------------------------------------------------------
# --fit


def fit_to_gpu(cfg: PlanConfig) -> tuple[PlanConfig | None, Plan | None, list[tuple[str, Plan]]]:
    """The fastest configuration that fits the budget, searching in this order of preference:
    keep the rank and sequence length; then the fastest of precision/quantization, gradient
    checkpointing and micro-batch (effective batch kept); then a lower rank; only then a shorter
    max_seq_length, which changes the data (rows over it are dropped or truncated)."""
    _, memory, _ = budget(cfg)
    if memory is None:
        raise LorakitError("--fit needs a budget: --gpu NAME or --gpu_memory SIZE")
    config, source = load_model_config(cfg.base_model, cfg.trust_remote_code)
    lengths = sequence_lengths(cfg)
    ranks = [r for r in (cfg.lora_r, cfg.lora_r // 2, cfg.lora_r // 4) if r >= 8] or [cfg.lora_r]
    lengths_try = [lengths.peak] + [n for n in (lengths.peak * 3 // 4, lengths.peak // 2) if n >= 64]
    tried: list[tuple[str, Plan]] = []
    for length in lengths_try:
        for r in ranks:
            for over in _fit_options(cfg):
                candidate = dataclasses.replace(
                    cfg,
                    **over,
                    lora_r=r,
                    lora_alpha=cfg.lora_alpha * r / cfg.lora_r,
                    max_seq_length=min(cfg.max_seq_length, length),
                )
                shortened = (length, min(lengths.mean, length), lengths.rows, lengths.source)
                plan = make_plan(candidate, config, source, shortened)
                tried.append((_describe(over, r, length), plan))
                if plan.fits:
                    if lengths.every and length < lengths.peak:
                        plan.rows_over_length = sum(n > length for n in lengths.every)
                    return candidate, plan, tried
    return None, None, tried


def _fit_options(cfg: PlanConfig) -> list[dict]:
    """Precision/quantization, checkpointing and micro-batch settings with the same effective
    batch, fastest first (relative speeds: 8-bit 0.6, 4-bit 0.75, checkpointing 0.75)."""
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    half = {"bf16": True} if not cfg.fp16 else {"fp16": True}
    options = []  # (speed factor, overrides)
    for quant, q_speed in (({}, 1.0), ({"load_in_8bit": True}, 0.6), ({"load_in_4bit": True}, 0.75)):
        for gc, g_speed in ((False, 1.0), (True, 0.75)):
            b = cfg.batch_size
            while b >= 1:
                if effective % b == 0:
                    over = {
                        **half,
                        **quant,
                        "gradient_checkpointing": gc,
                        "batch_size": b,
                        "gradient_accumulation_steps": effective // b,
                    }
                    options.append((q_speed * g_speed * b / (b + 0.5), over))
                b //= 2
    options.sort(key=lambda o: -o[0])
    return [over for _, over in options]


def _describe(over: dict, r: int, length: int) -> str:
    parts = [k for k in ("load_in_4bit", "load_in_8bit", "gradient_checkpointing") if over.get(k)]
    return f"r={r} len={length} batch={over['batch_size']}x{over['gradient_accumulation_steps']} " + " ".join(
        parts
    )


def smallest_gpu(cfg: PlanConfig, config, source, lengths) -> str | None:
    for key, (label, gib, _) in sorted(GPUS.items(), key=lambda kv: kv[1][1]):
        plan = make_plan(dataclasses.replace(cfg, gpu=key, gpu_memory=""), config, source, lengths)
        if plan.fits:
            return f"{label} ({gib:g} GiB)"
    return None


def train_args(cfg: TrainConfig) -> list[str]:
    """The arguments of `lorakit train` for a config: only the settings that differ from the defaults."""
    defaults = TrainConfig()
    args: list[str] = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name):
            continue
        if isinstance(value, bool):
            args.append(f"--{f.name}" if value else f"--no-{f.name}")
        elif isinstance(value, list):
            args += [f"--{f.name}", *map(str, value)]
        else:
            args += [f"--{f.name}", f"{value:g}" if isinstance(value, float) else str(value)]
    return args


def train_command_line(cfg: TrainConfig) -> str:
    """The same as one shell line."""
    return shlex.join(["lorakit", "train", *train_args(cfg)])


# --------------------------------------------------------------------------------------------
# Command


def plan(cfg: PlanConfig) -> Plan | None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if cfg.list_gpus:
        t = Table(title="Known GPUs")
        for col in ("--gpu", "name", "memory", "bf16 TFLOP/s"):
            t.add_column(col)
        for key, (label, gib, tflops) in GPUS.items():
            t.add_row(key, label, f"{gib:g} GiB", f"{tflops:g}")
        console.print(t)
        return None
    if cfg.fit:
        chosen, result, tried = fit_to_gpu(cfg)
        if chosen is None:
            config, source = load_model_config(cfg.base_model, cfg.trust_remote_code)
            lengths = sequence_lengths(cfg)
            where = smallest_gpu(
                dataclasses.replace(
                    cfg,
                    load_in_4bit=True,
                    gradient_checkpointing=True,
                    batch_size=1,
                    gradient_accumulation_steps=cfg.batch_size * cfg.gradient_accumulation_steps,
                ),
                config,
                source,
                lengths,
            )
            raise LorakitError(
                f"nothing fits {budget(cfg)[0]} even in 4-bit with gradient checkpointing at micro-batch 1; "
                f"smallest GPU that would: {where or 'none listed (use several GPUs)'}"
            )
        _print_plan(console, result)
        if result.rows_over_length:
            fate = {"drop": "dropped", "truncate": "truncated", "error": "refused"}[cfg.overlength]
            console.print(
                f"[bold yellow]note:[/] {result.rows_over_length} training rows are longer than max_seq_length "
                f"{chosen.max_seq_length}: they will be {fate} (--overlength {cfg.overlength}); "
                "to keep them, plan for more memory"
            )
        console.print(f"[bold]fastest configuration that fits[/] ({len(tried)} tried):")
        console.print(train_command_line(as_config(chosen, TrainConfig)), soft_wrap=True)
        return result
    result = make_plan(cfg)
    _print_plan(console, result)
    if result.fits is False:
        config, source = load_model_config(cfg.base_model, cfg.trust_remote_code)
        where = smallest_gpu(
            cfg, config, source, (result.seq_len, result.seq_len, None, result.seq_len_source)
        )
        console.print(
            f"smallest GPU for these settings: {where or 'none listed'}; `lorakit plan --fit` searches "
            "settings that fit this one"
        )
    return result


def _print_plan(console, p: Plan) -> None:
    from rich.table import Table

    t = Table(title=f"Plan: {p.model} ({p.config_source})")
    t.add_column("item")
    t.add_column("GiB", justify="right")
    for label, n_bytes, part in p.memory.rows():
        t.add_row(label, f"{n_bytes / GIB:.2f}", style="dim" if part else None)
    t.add_row("[bold]total[/]", f"[bold]{p.total_bytes / GIB:.2f}[/]")
    console.print(t)
    console.print(
        f"trainable params: {p.trainable:,} || all params: {p.total:,} || trainable%: {100 * p.trainable / p.total:.4f}"
    )
    console.print(
        f"precision {p.precision}, micro-batch {p.batch_size} x {p.seq_len} tokens ({p.seq_len_source})"
    )
    if p.tokens_per_second:
        eta = f", one epoch ~{p.epoch_seconds / 60:.1f} min" if p.epoch_seconds else ""
        console.print(
            f"throughput estimate on {p.gpu}: ~{p.tokens_per_second:,.0f} tokens/s{eta} "
            "(at the assumed --utilization of peak bf16 FLOP/s)"
        )
    if p.fits is not None:
        verdict = "[bold green]fits[/]" if p.fits else "[bold red]does not fit[/]"
        console.print(f"{verdict}: {p.total_bytes / GIB:.1f} GiB of {p.budget_bytes / GIB:.1f} GiB ({p.gpu})")


# --------------------------------------------------------------------------------------------
# The fit check `train` runs on a GPU


def memory_check(cfg: TrainConfig, lengths: list[int], gpu_bytes: int) -> bool:
    """Run the planner for this exact run on this GPU; warn (and return False) when it will not fit."""
    from ..core.files import say

    try:
        plan_cfg = as_config(cfg, PlanConfig, gpu_memory=f"{gpu_bytes / GIB:.2f}GiB")
        lengths_info = (max(lengths), sum(lengths) / len(lengths), len(lengths), "the training data")
        p = make_plan(plan_cfg, lengths=lengths_info)
    except Exception as e:  # the planner must never stop a run it cannot model
        say(f"lorakit: memory plan skipped ({type(e).__name__}: {str(e)[:120]})")
        return True
    if not p.fits:
        say(
            f"lorakit: warning: this run is planned to need {p.total_bytes / GIB:.1f} GiB but the GPU has "
            f"{gpu_bytes / GIB:.1f} GiB; `lorakit plan --fit --gpu_memory {gpu_bytes / GIB:.0f}GiB` with the same flags "
            "finds settings that fit (out-of-memory backoff will try smaller micro-batches)"
        )
    return bool(p.fits)
