"""Training: base model + LoRA (PEFT) trained on the encoded rows with transformers' Trainer.

Why Trainer and not TRL's SFTTrainer: lorakit tokenizes and masks rows itself (the mask comes
from the chat template, see data/template.py), so what is left is a plain causal-LM loop. SFTTrainer would
re-process the text (it appends EOS to text that already ends in the end-of-turn token, and builds
its own mask), which is the layer where silent data bugs come from.

`train()` reads as its three steps: prepare (output guard, data, precision, resume check, model),
fit (the Trainer, with out-of-memory backoff that keeps the effective batch), finish (summary,
outcome, the adapter written atomically). What lorakit adds to the Trainer is in trainer.py;
checkpoint markers and fingerprints in checkpoints.py.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import TrainConfig
from ..core.errors import LorakitError
from ..core.fields import write_yaml
from ..core.files import atomic_write_json, is_main_process, say, staged_files
from ..core.runfiles import ADAPTER_CONFIG, MANIFEST
from ..data.encode import Encoded, encode_data, row_lengths
from ..data.formats import DataReport
from ..data.template import ChatFormat
from ..models.loading import (
    FLASH_ATTENTION,
    BaseModel,
    add_lora,
    attention_implementation,
    base_identity,
    half_linear_weights,
    keep_lora_input_dtype,
    load_tokenizer,
    load_training_model,
    merge_dtype_of,
    resolve_base_model,
    resolve_precision,
)
from .batching import Collator
from .checkpoints import (
    check_resume,
    complete_checkpoints,
    find_resume_checkpoint,
    fingerprint,
    guard_output_dir,
)


class TrainingDiverged(LorakitError):
    exit_code = 3


@dataclass
class Run:
    """Everything `fit` and `finish` need, built by `prepare`."""

    cfg: TrainConfig
    out: Path
    base: BaseModel
    tokenizer: Any
    data: Encoded
    precision: str
    fingerprint: dict
    checkpoint: Path | None
    model: Any
    attention: str = "sdpa"
    started: float = field(default_factory=time.time)


@dataclass
class Fit:
    """What a finished (or stopped) `trainer.train()` left behind."""

    trainer: Any
    result: Any
    batch: Batching  # the cut the run finished with (smaller after out-of-memory backoffs)
    backoffs: list[dict]
    callbacks: dict[str, Any]


def train(cfg: TrainConfig, callbacks: list | None = None, stop_at_step: int | None = None) -> Path:
    """Train a LoRA adapter; returns the output directory holding it.

    `callbacks` are extra transformers TrainerCallbacks; with `stop_at_step` the run pauses at that
    step with a checkpoint (no final adapter) and continues later with `resume=True`.
    """
    run = prepare(cfg)
    fitted = fit(run, callbacks or [], stop_at_step)
    return finish(run, fitted)


# --------------------------------------------------------------------------------------------
# prepare


def prepare(cfg: TrainConfig) -> Run:
    started = time.time()
    out = Path(cfg.output_dir).expanduser()
    guard_output_dir(cfg, out)
    precision = resolve_precision(cfg)
    base = resolve_base_model(cfg.base_model)
    tokenizer = load_tokenizer(base, cfg.trust_remote_code)
    data = encode_data(None, ChatFormat(tokenizer), cfg)  # the data is checked before the model loads
    say(f"lorakit: data {cfg.dataset or 'demo'}: {data.report.summary()}")
    for message in data.report.skipped:
        say(f"  skipped {message}")
    if cfg.early_stopping_patience and not data.val:
        raise LorakitError(
            "--early_stopping_patience needs validation data: add --val_size 0.1 or --val_dataset FILE"
        )
    _plan_check(cfg, data)
    fp = fingerprint(cfg, data.digest, tokenizer.chat_template, base_identity(base))
    checkpoint = find_resume_checkpoint(cfg, out)
    if checkpoint is not None:
        check_resume(checkpoint, fp, cfg)
        say(f"lorakit: resuming from {checkpoint}")
    elif cfg.overwrite:
        for old in out.glob("checkpoint-*"):
            shutil.rmtree(old, ignore_errors=True)
    from transformers import set_seed

    set_seed(cfg.seed)
    attention = attention_implementation(
        cfg.attn_implementation, min(data.report.max_length, cfg.max_seq_length)
    )
    model = add_lora(cfg, load_training_model(cfg, base, precision, attention))
    half_linear_weights(model, cfg, precision)
    keep_lora_input_dtype(model, precision)
    trainable, total = model.get_nb_trainable_parameters()
    if trainable == 0:
        raise LorakitError(
            f"--target_modules {','.join(cfg.target_modules)}: the adapter would have no trainable parameter"
        )
    say(
        f"lorakit: trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_yaml(cfg, out)
    return Run(cfg, out, base, tokenizer, data, precision, fp, checkpoint, model, attention, started)


def _plan_check(cfg: TrainConfig, data: Encoded) -> None:
    """On a GPU, warn before loading the model when the planner says this run will not fit."""
    import torch

    if torch.cuda.is_available():
        from ..planning.plan import memory_check

        memory_check(cfg, row_lengths(data.train), torch.cuda.mem_get_info()[1])


# --------------------------------------------------------------------------------------------
# fit


def fit(run: Run, extra_callbacks: list, stop_at_step: int | None) -> Fit:
    """Run the Trainer; on out-of-memory halve the micro-batch, double the accumulation (same
    effective batch) and continue from the last completed step."""
    from .efficiency import Counter
    from .monitor import HealthWatch, MetricsLog, StopOnSignal

    cfg = run.cfg
    shared = {
        "metrics": MetricsLog(run.out),
        "health": HealthWatch(cfg.no_progress_steps),
        "signals": StopOnSignal(),
        "counter": Counter(),
    }
    batch = Batching(
        cfg.batch_size,
        cfg.gradient_accumulation_steps,
        cfg.max_tokens_per_batch,
        regroups(cfg, run.attention),
    )
    checkpoint, backoffs = run.checkpoint, []
    shared["signals"].install()
    try:
        while True:
            trainer, callbacks = _build_trainer(run, batch, shared, extra_callbacks, stop_at_step)
            try:
                result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
                return Fit(trainer, result, batch, backoffs, callbacks)
            except Exception as e:
                from .trainer import is_out_of_memory

                shared["counter"].stop()
                if not is_out_of_memory(e):
                    raise
                checkpoint, batch = _back_off(run, trainer, batch, backoffs, shared["metrics"])
    finally:
        shared["signals"].uninstall()


def regroups(cfg: TrainConfig, attention: str) -> bool:
    """Whether the step's rows are regrouped by padded size (--regroup_micro_batches): the
    micro-batches' losses must be divided by the step's label count, which the chunked loss of
    a single process does. Packed rows are regrouped only for flash-attention's variable-length
    kernel: other kernels attend over a packed row through a block-diagonal mask, at a cost that
    grows with the square of the packed length, which regrouping would raise (on a CPU with
    --padding_free: 911 instead of 1195 tokens/s)."""
    packed = cfg.padding_free or attention in FLASH_ATTENTION
    return (
        cfg.regroup_micro_batches
        and (not packed or attention in FLASH_ATTENTION)
        and not cfg.max_tokens_per_batch
        and cfg.chunked_loss
        and not cfg.use_liger_kernel
        and cfg.num_processes == 1
        and int(os.environ.get("WORLD_SIZE", "1")) == 1
    )


@dataclass(frozen=True)
class Batching:
    """How an optimizer step's rows are cut: `accumulation` micro-batches of `batch_size` rows
    (regrouped: into micro-batches of at most batch_size x the step's longest row in padded
    tokens, see Collator), or (tokens > 0) micro-batches of at most `tokens` padded tokens."""

    batch_size: int
    accumulation: int
    tokens: int
    regroup: bool = False

    def halved(self) -> Batching:
        """The next smaller cut after an out-of-memory error, same rows per optimizer step."""
        if self.tokens:
            return dataclasses.replace(self, tokens=self.tokens // 2)
        return Batching(self.batch_size // 2, self.accumulation * 2, 0, self.regroup)

    def can_halve(self) -> bool:
        return self.tokens >= 2 * MIN_TOKENS_PER_BATCH if self.tokens else self.batch_size > 1

    def describe(self) -> str:
        if self.tokens:
            return f"max_tokens_per_batch {self.tokens}"
        return f"batch_size {self.batch_size}, gradient_accumulation_steps {self.accumulation}"


MIN_TOKENS_PER_BATCH = 64  # below this an out-of-memory backoff stops halving the token budget


def _build_trainer(run: Run, batch: Batching, shared: dict, extra: list, stop_at_step):
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback

    from .monitor import LossCurve, ProgressCallback
    from .trainer import LorakitTrainer, NonFiniteGuard, StopAtStep, Timed, training_arguments

    cfg = dataclasses.replace(
        run.cfg,
        batch_size=batch.batch_size,
        gradient_accumulation_steps=batch.accumulation,
        max_tokens_per_batch=batch.tokens,
    )
    callbacks = {**shared, "guard": NonFiniteGuard(cfg.max_nonfinite_steps)}
    callbacks["pause"] = StopAtStep(stop_at_step) if stop_at_step else None
    listed = [shared["metrics"], ProgressCallback(), shared["health"], shared["signals"], callbacks["guard"]]
    listed += [Timed(shared["counter"]), LossCurve(run.out), *extra]
    listed += [callbacks["pause"]] if callbacks["pause"] else []
    if cfg.early_stopping_patience:
        listed.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    total_steps = cfg.total_steps(len(run.data.train))
    trainer = LorakitTrainer(
        model=run.model,
        args=training_arguments(
            step_cut(cfg, batch), run.out, run.precision, total_steps, bool(run.data.val), cfg.batch_size
        ),
        train_dataset=run.data.train,
        eval_dataset=run.data.val or None,
        data_collator=Collator(
            run.tokenizer.pad_token_id,
            # flash-attention's variable-length kernel is what packed rows are for
            padding_free=cfg.padding_free or run.attention in FLASH_ATTENTION,
            max_tokens_per_batch=cfg.max_tokens_per_batch,
            regroup_rows=batch.batch_size if batch.regroup else 0,
        ),
        processing_class=run.tokenizer,
        callbacks=listed,
        guard=callbacks["guard"],
        marker={"fingerprint": run.fingerprint},
        chunked_loss=cfg.chunked_loss and not cfg.use_liger_kernel,
        counter=shared["counter"],
    )
    trainer.remove_callback(PrinterCallback)
    return trainer, callbacks


def step_cut(cfg: TrainConfig, batch: Batching) -> TrainConfig:
    """The Trainer's view of --max_tokens_per_batch and regrouped rows: one batch per optimizer
    step holding all its rows (the collator cuts it into micro-batches)."""
    if not (batch.tokens or batch.regroup):
        return cfg
    step_rows = cfg.batch_size * cfg.gradient_accumulation_steps
    return dataclasses.replace(cfg, batch_size=step_rows, gradient_accumulation_steps=1)


def _back_off(run: Run, trainer, batch: Batching, backoffs: list, metrics) -> tuple[Path | None, Batching]:
    """After an out-of-memory error: checkpoint the last completed step and record the backoff;
    returns the checkpoint to continue from (None at step 0) and the smaller cut."""
    step = trainer.state.global_step
    if not run.cfg.auto_batch_size or not batch.can_halve():
        raise LorakitError(
            f"out of memory at step {step} with {batch.describe()}: use --gradient_checkpointing, "
            "--load_in_4bit, a shorter --max_seq_length or a smaller --lora_r (`lorakit plan` shows what fits)"
        ) from None
    run.model.zero_grad(set_to_none=True)
    trainer.guard.sources.clear()
    # The weights and optimizer are those after the last completed step.
    checkpoint = trainer.save_checkpoint_now() if step > 0 else None
    smaller = batch.halved()
    record = {
        "step": step,
        "batch_size": smaller.batch_size,
        "gradient_accumulation_steps": smaller.accumulation,
    }
    if smaller.tokens:
        record["max_tokens_per_batch"] = smaller.tokens
    backoffs.append(record)
    say(
        f"lorakit: out of memory at step {step}: {batch.describe()} -> {smaller.describe()} "
        "(same effective batch); continuing"
    )
    metrics.append({"step": step, "oom_backoff": backoffs[-1]})
    _free_memory()
    return checkpoint, smaller


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# finish


def finish(run: Run, fitted: Fit) -> Path:
    """Record the outcome (finished, paused, interrupted, diverged) and write the adapter."""
    from .monitor import plot_loss_curve

    cfg, out, state = run.cfg, run.out, fitted.trainer.state
    summary = _summary(run, fitted)
    metrics, guard, pause = fitted.callbacks["metrics"], fitted.callbacks["guard"], fitted.callbacks["pause"]
    if guard.diverged:
        metrics.append({**summary, "status": "diverged"})
        last = complete_checkpoints(out)
        raise TrainingDiverged(
            f"training diverged: {cfg.max_nonfinite_steps} consecutive steps with a non-finite loss or gradient "
            f"(rows: {', '.join(guard.events[-1]['rows'][:5]) or 'see metrics.jsonl'}); "
            f"last good checkpoint: {last[-1] if last else 'none'}; lower --learning_rate or check those rows"
        )
    signum = fitted.callbacks["signals"].signum
    if signum is not None:
        metrics.append({**summary, "status": "interrupted"})
        plot_loss_curve(out)
        last = complete_checkpoints(out)
        say(
            f"lorakit: stopped at step {state.global_step}; checkpoint {last[-1] if last else '-'}; "
            f"continue with: lorakit train --config {out / 'lorakit.yaml'} --resume"
        )
        raise SystemExit(128 + signum)
    if pause is not None and pause.hit and state.global_step < state.max_steps:
        metrics.append({**summary, "status": "paused"})
        plot_loss_curve(out)
        return out
    if state.global_step == 0:  # an adapter that looks like a result but never took a step
        metrics.append({**summary, "status": "no steps"})
        raise LorakitError("no optimizer step ran: nothing was trained, no adapter written")
    metrics.append({**summary, "status": "finished"})
    plot_loss_curve(out)
    if is_main_process():  # rank 0 writes the outputs
        _write_adapter(run, fitted, summary)
    return out


def _summary(run: Run, fitted: Fit) -> dict:
    state, result = fitted.trainer.state, fitted.result
    trainable, total = run.model.get_nb_trainable_parameters()
    runtime = result.metrics.get("train_runtime", 0.0)
    evals = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    report = run.data.report
    return {
        "summary": True,
        "step": state.global_step,
        "steps": state.global_step,
        "train_loss": result.training_loss,
        "train_runtime_s": round(runtime, 2),
        "tokens_seen": state.num_input_tokens_seen,
        "tokens_per_second": round(state.num_input_tokens_seen / max(runtime or 1e-9, 1e-9), 1),
        "eval_loss": evals[-1] if evals else None,
        "best_eval_loss": state.best_metric,
        "best_checkpoint": state.best_model_checkpoint,
        "trainable_params": trainable,
        "total_params": total,
        "rows_kept": report.kept,
        "rows_dropped_overlength": len(report.dropped_overlength),
        "rows_skipped": report.skipped,
        "precision": run.precision,
        "oom_backoffs": fitted.backoffs,
        "nonfinite_steps": fitted.callbacks["guard"].events,
        "warnings": fitted.callbacks["health"].messages,
        **_efficiency(run, fitted.callbacks["counter"], trainable),
    }


def _efficiency(run: Run, counter, lora_params: int) -> dict:
    """Useful FLOP/s of the training loop and its fraction of the device's peak (efficiency.py)."""
    from ..models.loading import compute_dtype
    from .efficiency import Shape, report

    try:
        shape = Shape.of(run.model.get_base_model().config)
    except (AttributeError, TypeError):  # a config without the dense decoder fields
        return {}
    precision = run.precision
    if run.cfg.load_in_4bit or run.cfg.load_in_8bit:
        precision = compute_dtype(run.cfg, run.precision)
    return report(counter, shape, lora_params, precision)


def _write_adapter(run: Run, fitted: Fit, summary: dict) -> None:
    cfg = dataclasses.replace(
        run.cfg,
        batch_size=fitted.batch.batch_size,
        gradient_accumulation_steps=fitted.batch.accumulation,
        max_tokens_per_batch=fitted.batch.tokens,
    )
    with staged_files(run.out, last=(ADAPTER_CONFIG,)) as tmp:
        fitted.trainer.model.save_pretrained(tmp, safe_serialization=True)  # the best one with early stopping
        run.tokenizer.save_pretrained(tmp)
        write_yaml(cfg, tmp)
        atomic_write_json(tmp / MANIFEST, manifest(cfg, run, status="finished", final_metrics=summary))
    state = fitted.trainer.state
    restored = (
        f", restored best step {state.best_model_checkpoint.rsplit('-', 1)[-1]}"
        if cfg.early_stopping_patience and state.best_model_checkpoint
        else ""
    )
    efficiency = ""
    if summary.get("useful_flops_per_second"):
        efficiency = f", {summary['useful_flops_per_second'] / 1e9:.1f} useful GFLOP/s"
        if summary.get("fraction_of_peak") is not None:
            efficiency += f" = {summary['fraction_of_peak']:.0%} of the {summary['peak_source']} peak"
    say(
        f"lorakit: adapter written to {run.out} (loss {fitted.result.training_loss:.4f}, "
        f"{summary['tokens_per_second']} tokens/s{efficiency}{restored})"
    )


def manifest(cfg: TrainConfig, run: Run, **extra) -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("lorakit", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "gguf"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    hardware = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        hardware["gpu"] = torch.cuda.get_device_name(0)
    base, report, fp = run.base, run.data.report, run.fingerprint
    return {
        "config": dataclasses.asdict(cfg),
        "base_model": {"name": base.name, "path": base.path, "source": base.source, "gguf": base.gguf},
        "merge_dtype": merge_dtype_of(cfg, run.precision),
        "versions": versions,
        "git_revision": _git_revision(),
        "hardware": hardware,
        "seed": cfg.seed,
        "data_sha256": fp["data_sha256"],
        "chat_template_sha256": fp["chat_template_sha256"],
        "data": _data_record(report),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(run.started)),
        "ended": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    }


def _data_record(report: DataReport) -> dict:
    return {
        "rows": report.rows,
        "train_rows": report.kept,
        "validation_rows": report.val_rows,
        "duplicates": len(report.duplicates),
        "dropped_overlength": len(report.dropped_overlength),
        "truncated": len(report.truncated),
        "skipped": len(report.skipped),
        "skipped_rows": report.skipped,
    }


def _git_revision() -> str | None:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None
