"""Training: base model + LoRA (PEFT) trained on the encoded rows with transformers' Trainer.

Why Trainer and not TRL's SFTTrainer: lorakit tokenizes and masks rows itself (the mask comes
from the chat template, see data.py), so what is left is a plain causal-LM loop. SFTTrainer would
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

from .checkpoints import (
    check_resume,
    complete_checkpoints,
    find_resume_checkpoint,
    fingerprint,
    guard_output_dir,
)
from .config import TrainConfig, write_yaml
from .data import ChatFormat, Collator, DataReport, Encoded, encode_data, row_lengths
from .errors import LorakitError
from .io import atomic_write_json, is_main_process, say, staged_files
from .models import (
    BaseModel,
    add_lora,
    base_identity,
    load_tokenizer,
    load_training_model,
    merge_dtype_of,
    resolve_base_model,
    resolve_precision,
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
    started: float = field(default_factory=time.time)


@dataclass
class Fit:
    """What a finished (or stopped) `trainer.train()` left behind."""

    trainer: Any
    result: Any
    batch_size: int
    gradient_accumulation_steps: int
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
    model = add_lora(cfg, load_training_model(cfg, base, precision))
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
    return Run(cfg, out, base, tokenizer, data, precision, fp, checkpoint, model, started)


def _plan_check(cfg: TrainConfig, data: Encoded) -> None:
    """On a GPU, warn before loading the model when the planner says this run will not fit."""
    import torch

    if torch.cuda.is_available():
        from .plan import memory_check

        memory_check(cfg, row_lengths(data.train), torch.cuda.mem_get_info()[1])


# --------------------------------------------------------------------------------------------
# fit


def fit(run: Run, extra_callbacks: list, stop_at_step: int | None) -> Fit:
    """Run the Trainer; on out-of-memory halve the micro-batch, double the accumulation (same
    effective batch) and continue from the last completed step."""
    from .monitor import HealthWatch, MetricsLog, StopOnSignal

    cfg = run.cfg
    shared = {
        "metrics": MetricsLog(run.out),
        "health": HealthWatch(cfg.no_progress_steps),
        "signals": StopOnSignal(),
    }
    batch_size, accumulation = cfg.batch_size, cfg.gradient_accumulation_steps
    checkpoint, backoffs = run.checkpoint, []
    shared["signals"].install()
    try:
        while True:
            trainer, callbacks = _build_trainer(
                run, batch_size, accumulation, shared, extra_callbacks, stop_at_step
            )
            try:
                result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
                return Fit(trainer, result, batch_size, accumulation, backoffs, callbacks)
            except Exception as e:
                from .trainer import is_out_of_memory

                if not is_out_of_memory(e):
                    raise
                checkpoint = _back_off(run, trainer, batch_size, accumulation, backoffs, shared["metrics"])
                batch_size, accumulation = batch_size // 2, accumulation * 2
    finally:
        shared["signals"].uninstall()


def _build_trainer(run: Run, batch_size: int, accumulation: int, shared: dict, extra: list, stop_at_step):
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback

    from .monitor import LossCurve, Progress
    from .trainer import LorakitTrainer, NonFiniteGuard, StopAtStep, training_arguments

    cfg = dataclasses.replace(run.cfg, batch_size=batch_size, gradient_accumulation_steps=accumulation)
    callbacks = {**shared, "guard": NonFiniteGuard(cfg.max_nonfinite_steps)}
    callbacks["pause"] = StopAtStep(stop_at_step) if stop_at_step else None
    listed = [shared["metrics"], Progress(), shared["health"], shared["signals"], callbacks["guard"]]
    listed += [LossCurve(run.out), *extra]
    listed += [callbacks["pause"]] if callbacks["pause"] else []
    if cfg.early_stopping_patience:
        listed.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    total_steps = cfg.total_steps(len(run.data.train))
    trainer = LorakitTrainer(
        model=run.model,
        args=training_arguments(cfg, run.out, run.precision, total_steps, bool(run.data.val)),
        train_dataset=run.data.train,
        eval_dataset=run.data.val or None,
        data_collator=Collator(run.tokenizer.pad_token_id, padding_free=cfg.padding_free),
        processing_class=run.tokenizer,
        callbacks=listed,
        guard=callbacks["guard"],
        marker={"fingerprint": run.fingerprint},
        chunked_loss=cfg.chunked_loss and not cfg.use_liger_kernel,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer, callbacks


def _back_off(run: Run, trainer, batch_size: int, accumulation: int, backoffs: list, metrics) -> Path | None:
    """After an out-of-memory error: checkpoint the last completed step and record the backoff;
    returns the checkpoint to continue from (None at step 0)."""
    step = trainer.state.global_step
    if not run.cfg.auto_batch_size or batch_size == 1:
        raise LorakitError(
            f"out of memory at step {step} with batch_size {batch_size}: use --gradient_checkpointing, "
            "--load_in_4bit, a shorter --max_seq_length or a smaller --lora_r (`lorakit plan` shows what fits)"
        ) from None
    run.model.zero_grad(set_to_none=True)
    trainer.guard.sources.clear()
    # The weights and optimizer are those after the last completed step.
    checkpoint = trainer.save_checkpoint_now() if step > 0 else None
    backoffs.append(
        {"step": step, "batch_size": batch_size // 2, "gradient_accumulation_steps": accumulation * 2}
    )
    say(
        f"lorakit: out of memory at step {step}: batch_size {batch_size} -> {batch_size // 2}, "
        f"gradient_accumulation_steps {accumulation} -> {accumulation * 2} (same effective batch); continuing"
    )
    metrics.append({"step": step, "oom_backoff": backoffs[-1]})
    _free_memory()
    return checkpoint


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
    }


def _write_adapter(run: Run, fitted: Fit, summary: dict) -> None:
    cfg = dataclasses.replace(
        run.cfg, batch_size=fitted.batch_size, gradient_accumulation_steps=fitted.gradient_accumulation_steps
    )
    with staged_files(run.out, last=("adapter_config.json",)) as tmp:
        fitted.trainer.model.save_pretrained(tmp, safe_serialization=True)  # the best one with early stopping
        run.tokenizer.save_pretrained(tmp)
        write_yaml(cfg, tmp)
        atomic_write_json(tmp / "manifest.json", manifest(cfg, run, status="finished", final_metrics=summary))
    state = fitted.trainer.state
    restored = (
        f", restored best step {state.best_model_checkpoint.rsplit('-', 1)[-1]}"
        if cfg.early_stopping_patience and state.best_model_checkpoint
        else ""
    )
    say(
        f"lorakit: adapter written to {run.out} (loss {fitted.result.training_loss:.4f}, "
        f"{summary['tokens_per_second']} tokens/s{restored})"
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
