"""Training: base model + LoRA (PEFT) trained on the encoded rows with transformers' Trainer.

Why Trainer and not TRL's SFTTrainer: lorakit tokenizes and masks rows itself (the mask comes
from the chat template, see data.py), so what is left is a plain causal-LM loop. SFTTrainer would
re-process the text (it appends EOS to text that already ends in the end-of-turn token, and builds
its own mask), which is the layer where silent data bugs come from.

On top of Trainer, lorakit adds what it lacks for unattended runs (the subclass and callbacks
below): checkpoints written to a temporary directory and renamed, a fingerprint that refuses to
resume on changed data/template/settings, a NaN/inf guard that skips the step and names the rows,
out-of-memory backoff that keeps the effective batch, and stop-on-signal with a checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from .config import TrainConfig, write_yaml
from .data import Collator, DataReport, prepare_data
from .errors import LorakitError
from .io import atomic_write_json, is_main_process, staged_files
from .models import load_model, load_tokenizer, resolve_base_model

CHECKPOINT_MARKER = "lorakit-checkpoint.json"
# Settings that may change between a checkpoint and its resume without changing the run's maths.
RESUMABLE_CHANGES = {
    "chunked_loss",
    "padding_free",
    "torch_compile",
    "use_liger_kernel",
    "output_dir",
    "overwrite",
    "resume",
    "resume_from_checkpoint",
    "resume_ignore_changes",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "auto_batch_size",
    "batch_size",
    "gradient_accumulation_steps",
    "dataset",
    "val_dataset",
    "no_progress_steps",
    "max_nonfinite_steps",
    "base_model",
    "skip_bad_rows",
}


class TrainingDiverged(LorakitError):
    exit_code = 3


def say(*args, **kwargs) -> None:
    """print() on the main process only: one log for a distributed run."""
    if is_main_process():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def check_precision(cfg: TrainConfig) -> str:
    """'fp16', 'bf16' or 'fp32'; a flag the hardware cannot do is a one-line error."""
    import torch

    if cfg.fp16 and cfg.bf16:
        raise LorakitError("--fp16 and --bf16 are exclusive: pick one")
    cuda = torch.cuda.is_available()
    if cfg.fp16 and not cuda:
        raise LorakitError("--fp16 needs a CUDA GPU; on this CPU use --bf16 (if supported) or neither (fp32)")
    if cfg.bf16:
        if cuda and not torch.cuda.is_bf16_supported():
            raise LorakitError("--bf16 needs an Ampere or newer GPU; use --fp16 on this GPU")
        if not cuda and not cpu_supports_bf16():
            raise LorakitError(
                "--bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); train in fp32 (drop --bf16)"
            )
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise LorakitError("--load_in_4bit and --load_in_8bit are exclusive: pick one")
    return "fp16" if cfg.fp16 else "bf16" if cfg.bf16 else "fp32"


def cpu_supports_bf16() -> bool:
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# --------------------------------------------------------------------------------------------
# Fingerprints and checkpoints


def fingerprint(
    cfg: TrainConfig, train_examples: list[dict], val_examples: list[dict], chat_template: str
) -> dict:
    data = hashlib.sha256()
    for ex in train_examples + [{"val": True}] + val_examples:
        data.update(json.dumps([ex.get("input_ids"), ex.get("labels")]).encode())
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    settings["effective_batch_size"] = cfg.batch_size * cfg.gradient_accumulation_steps
    return {
        "data_sha256": data.hexdigest(),
        "chat_template_sha256": hashlib.sha256((chat_template or "").encode()).hexdigest(),
        "settings": settings,
    }


def fingerprint_changes(saved: dict, now: dict) -> list[str]:
    changes = []
    if saved.get("data_sha256") != now["data_sha256"]:
        changes.append("the dataset (its rows or their tokenization) changed")
    if saved.get("chat_template_sha256") != now["chat_template_sha256"]:
        changes.append("the chat template changed")
    old, new = saved.get("settings", {}), now["settings"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changes.append(f"'{key}' changed from {old.get(key)!r} to {new.get(key)!r}")
    return changes


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoints with the marker written last; a partial or foreign directory is never listed."""
    found = []
    for d in out.glob("checkpoint-*"):
        if d.is_dir() and (d / CHECKPOINT_MARKER).is_file() and d.name.split("-")[-1].isdigit():
            found.append(d)
    return sorted(found, key=lambda d: int(d.name.split("-")[-1]))


def find_resume_checkpoint(cfg: TrainConfig, out: Path) -> Path | None:
    if cfg.resume_from_checkpoint:
        ckpt = Path(cfg.resume_from_checkpoint).expanduser()
        if not (ckpt / CHECKPOINT_MARKER).is_file():
            raise LorakitError(
                f"--resume_from_checkpoint {ckpt}: not a complete lorakit checkpoint (no {CHECKPOINT_MARKER})"
            )
        return ckpt
    if cfg.resume:
        found = complete_checkpoints(out)
        if not found:
            raise LorakitError(f"--resume: no complete checkpoint in {out}; start without --resume")
        return found[-1]
    return None


def _trainer_class():
    import torch
    from transformers import Trainer
    from transformers.trainer_utils import rotate_checkpoints

    class LorakitTrainer(Trainer):
        """Trainer with atomic checkpoints and a non-finite-loss guard (see the module docstring)."""

        lorakit_marker: dict = {}
        nonfinite_sources: list[str] = []
        block_saves = False

        lorakit_chunked = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            sources = inputs.pop("sources", None)
            # The chunked loss calls the decoder directly, which a DDP wrapper must not be
            # bypassed for: multi-process runs use the model's own loss.
            if self.lorakit_chunked and self.args.world_size == 1:
                from .loss import causal_lm_loss

                loss = causal_lm_loss(model, inputs, num_items_in_batch)
                result = (loss, {}) if return_outputs else loss  # evaluation only needs the loss
            else:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = result[0] if return_outputs else result
            if model.training and not torch.isfinite(loss.detach()).all():
                self.nonfinite_sources.extend(sources or ["?"])
            return result

        def _save_checkpoint(self, model, trial):
            """Write the checkpoint into a staging directory, add the marker, then rename it.

            Distributed: every rank writes its part (its RNG state) into the same staging
            directory; the main process then adds the marker and renames it.
            """
            if self.block_saves:
                return
            real_out = self.args.output_dir
            name = f"checkpoint-{self.state.global_step}"
            stage_root = str(Path(real_out) / f".staging-{name}")
            main = self.args.should_save
            if main:
                shutil.rmtree(stage_root, ignore_errors=True)
                os.makedirs(stage_root)
            self.accelerator.wait_for_everyone()
            self.args.output_dir = stage_root
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = real_out
            self.accelerator.wait_for_everyone()
            if main:
                staged = Path(stage_root) / name
                state_file = staged / "trainer_state.json"
                if state_file.is_file():  # paths recorded while writing point into the staging dir
                    state_file.write_text(state_file.read_text().replace(stage_root, real_out))
                atomic_write_json(
                    staged / CHECKPOINT_MARKER, {**self.lorakit_marker, "step": self.state.global_step}
                )
                final = Path(real_out) / name
                if final.exists():
                    shutil.rmtree(final)
                os.rename(staged, final)
                shutil.rmtree(stage_root, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            if self.state.best_model_checkpoint and stage_root in self.state.best_model_checkpoint:
                self.state.best_model_checkpoint = self.state.best_model_checkpoint.replace(
                    stage_root, real_out
                )
            if self.args.should_save:
                rotate_checkpoints(
                    real_out, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=False
                )

    return LorakitTrainer


def _nonfinite_guard(max_steps: int):
    import torch
    from transformers import TrainerCallback

    class NonFiniteGuard(TrainerCallback):
        """Before each optimizer step: if the loss or any gradient is NaN/inf, drop the gradients
        (AdamW skips parameters without one, so the step changes nothing) and report the rows."""

        def __init__(self):
            self.trainer = None
            self.consecutive = 0
            self.events: list[dict] = []
            self.diverged = False

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
            bad_grad = any(not torch.isfinite(p.grad).all() for p in params)
            sources = list(dict.fromkeys(self.trainer.nonfinite_sources))
            self.trainer.nonfinite_sources.clear()
            if not bad_grad and not sources:
                self.consecutive = 0
                return
            for p in params:
                p.grad = None
            self.consecutive += 1
            event = {
                "step": state.global_step + 1,
                "rows": sources,
                "kind": "loss" if sources else "gradient",
            }
            self.events.append(event)
            say(
                f"lorakit: warning: non-finite {event['kind']} at step {event['step']}; step skipped"
                + (f" (rows: {', '.join(sources[:8])})" if sources else ""),
                flush=True,
            )
            if self.consecutive >= max_steps:
                self.diverged = True
                self.trainer.block_saves = True  # keep the last good checkpoint as the newest
                control.should_training_stop = True
            return control

    return NonFiniteGuard()


def _is_oom(e: BaseException) -> bool:
    import torch

    return (
        isinstance(e, torch.OutOfMemoryError)
        or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())
        or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e).lower())
    )


# --------------------------------------------------------------------------------------------
# Model


def load_training_model(cfg: TrainConfig, base, precision: str):
    import torch

    cuda = torch.cuda.is_available()
    # Frozen base weights in the half dtype on GPU; on CPU fp32 weights with bf16 autocast,
    # which runs as fast as bf16 weights here and keeps the frozen weights exact.
    dtype = (
        {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        if cuda
        else torch.float32
    )
    quantization = None
    if cfg.load_in_4bit or cfg.load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise LorakitError(
                "--load_in_4bit/--load_in_8bit need bitsandbytes: pip install 'lorakit[quant]'"
            ) from None
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
            cfg.bnb_4bit_compute_dtype
        )
        if compute is None:  # auto
            compute = (
                dtype
                if cuda and dtype != torch.float32
                else (torch.bfloat16 if not cuda and cpu_supports_bf16() else torch.float32)
            )
            if cuda and compute == torch.float32:
                compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        quantization = BitsAndBytesConfig(
            load_in_4bit=cfg.load_in_4bit,
            load_in_8bit=cfg.load_in_8bit,
            bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=compute,
        )
    try:
        model = load_model(
            base, dtype=dtype, trust_remote_code=cfg.trust_remote_code, quantization_config=quantization
        )
    except (RuntimeError, ValueError, ImportError) as e:
        if quantization is None:
            raise
        raise LorakitError(
            f"bitsandbytes cannot load this model {'in 4-bit' if cfg.load_in_4bit else 'in 8-bit'} here "
            f"({str(e).splitlines()[0][:160]}); on this machine train without --load_in_4bit/--load_in_8bit"
        ) from None
    model.config.use_cache = False  # the KV cache is useless in training and breaks per-row masks
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return model


def add_lora(cfg: TrainConfig, model):
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules[0] if cfg.target_modules == ["all-linear"] else cfg.target_modules
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        modules_to_save=cfg.modules_to_save or None,
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise LorakitError(
            f"--target_modules {','.join(cfg.target_modules)}: {str(e).splitlines()[0]}"
        ) from None
    if cfg.gradient_checkpointing and not (cfg.load_in_4bit or cfg.load_in_8bit):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


# --------------------------------------------------------------------------------------------
# The run


def _training_args(cfg: TrainConfig, out: Path, precision: str, total_steps: int, has_val: bool):
    import torch
    from transformers import TrainingArguments

    warmup = cfg.warmup_steps
    if warmup >= total_steps:
        warmup = total_steps // 10
    early = cfg.early_stopping_patience > 0
    eval_strategy = ("steps" if cfg.eval_steps > 0 else "epoch") if has_val else "no"
    save_strategy, save_steps = "steps", cfg.save_steps
    if early:  # the best checkpoint must exist to be restored: save at every evaluation
        save_strategy, save_steps = eval_strategy, cfg.eval_steps or cfg.save_steps
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        warmup_steps=warmup,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler_type,
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps if cfg.eval_steps > 0 else None,
        save_strategy=save_strategy,
        save_steps=save_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        report_to=["tensorboard"],
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=True,
        prediction_loss_only=True,
        torch_compile=cfg.torch_compile,
        use_liger_kernel=cfg.use_liger_kernel,
    )


def manifest(cfg: TrainConfig, base, fp: dict, report: DataReport, started: float, **extra) -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("lorakit", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "gguf"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        rev = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        rev = None
    hardware = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        hardware["gpu"] = torch.cuda.get_device_name(0)
    return {
        "config": dataclasses.asdict(cfg),
        "base_model": {"name": base.name, "path": base.path, "source": base.source, "gguf": base.gguf},
        "versions": versions,
        "git_revision": rev,
        "hardware": hardware,
        "seed": cfg.seed,
        "data_sha256": fp["data_sha256"],
        "chat_template_sha256": fp["chat_template_sha256"],
        "data": {
            "rows": report.rows,
            "train_rows": report.kept,
            "validation_rows": report.val_rows,
            "duplicates": len(report.duplicates),
            "dropped_overlength": len(report.dropped_overlength),
            "truncated": len(report.truncated),
            "skipped": len(report.skipped),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "ended": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    }


def _stop_at(step: int):
    from transformers import TrainerCallback

    class StopAtStep(TrainerCallback):
        """Pause at a step (checkpoint written, schedule unchanged); used by successive halving."""

        hit = False

        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= step:
                control.should_save = control.should_training_stop = True
                self.hit = True
            return control

    return StopAtStep()


def train(cfg: TrainConfig, callbacks: list | None = None, stop_at_step: int | None = None) -> Path:
    """Train a LoRA adapter; returns the output directory holding it.

    `callbacks` are extra transformers TrainerCallbacks; with `stop_at_step` the run pauses at that
    step with a checkpoint (no final adapter) and continues later with `resume=True`.
    """
    started = time.time()
    out = Path(cfg.output_dir).expanduser()
    resuming = cfg.resume or bool(cfg.resume_from_checkpoint)
    if not resuming and not cfg.overwrite:
        if (out / "adapter_config.json").exists():
            raise LorakitError(
                f"{out} already holds an adapter: pass --overwrite or choose another --output_dir"
            )
        if complete_checkpoints(out):
            raise LorakitError(
                f"{out} holds checkpoints of an unfinished run: pass --resume to continue it, or --overwrite"
            )
    from .data import load_samples

    samples = load_samples(
        cfg
    )  # check the data (fast, no tokenizer) before spending time on imports and the model

    from transformers import EarlyStoppingCallback, set_seed
    from transformers.trainer_callback import PrinterCallback

    from .monitor import HealthWatch, LossCurve, MetricsLog, Progress, StopOnSignal, plot_loss_curve

    precision = check_precision(cfg)
    base = resolve_base_model(cfg.base_model)
    tokenizer = load_tokenizer(base, cfg.trust_remote_code)
    examples, val_examples, report = prepare_data(cfg, tokenizer, samples)
    say(f"lorakit: data {cfg.dataset or 'demo'}: {report.summary()}", flush=True)
    if cfg.early_stopping_patience and not val_examples:
        raise LorakitError(
            "--early_stopping_patience needs validation data: add --val_size 0.1 or --val_dataset FILE"
        )
    import torch

    if torch.cuda.is_available():
        memory_check(cfg, [len(e["input_ids"]) for e in examples], torch.cuda.mem_get_info()[1])
    fp = fingerprint(cfg, examples, val_examples, tokenizer.chat_template)
    checkpoint = find_resume_checkpoint(cfg, out)
    if checkpoint is not None:
        saved = json.loads((checkpoint / CHECKPOINT_MARKER).read_text())
        changes = fingerprint_changes(saved.get("fingerprint", {}), fp)
        if changes and not cfg.resume_ignore_changes:
            raise LorakitError(
                f"cannot resume from {checkpoint}: {'; '.join(changes)} (pass --resume_ignore_changes to resume anyway)"
            )
        say(f"lorakit: resuming from {checkpoint}", flush=True)
    elif cfg.overwrite:
        for old in out.glob("checkpoint-*"):
            shutil.rmtree(old, ignore_errors=True)

    set_seed(cfg.seed)
    model = add_lora(cfg, load_training_model(cfg, base, precision))
    trainable, total = model.get_nb_trainable_parameters()
    say(
        f"lorakit: trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}",
        flush=True,
    )

    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_yaml(cfg, out)
    signals = StopOnSignal()
    health = HealthWatch(cfg.no_progress_steps)
    metrics = MetricsLog(out)
    backoffs: list[dict] = []
    batch_size, accumulation = cfg.batch_size, cfg.gradient_accumulation_steps
    signals.install()
    try:
        while True:
            run_cfg = dataclasses.replace(
                cfg, batch_size=batch_size, gradient_accumulation_steps=accumulation
            )
            micro_batches = math.ceil(len(examples) / batch_size)
            steps_per_epoch = max(1, math.ceil(micro_batches / accumulation))
            total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_epochs)
            args = _training_args(run_cfg, out, precision, total_steps, bool(val_examples))
            guard = _nonfinite_guard(cfg.max_nonfinite_steps)
            pause = _stop_at(stop_at_step) if stop_at_step else None
            run_callbacks = [metrics, Progress(), health, signals, guard, LossCurve(out), *(callbacks or [])]
            if pause is not None:
                run_callbacks.append(pause)
            if cfg.early_stopping_patience:
                run_callbacks.append(
                    EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience)
                )
            trainer = _trainer_class()(
                model=model,
                args=args,
                train_dataset=examples,
                eval_dataset=val_examples or None,
                data_collator=Collator(tokenizer.pad_token_id, padding_free=cfg.padding_free),
                processing_class=tokenizer,
                callbacks=run_callbacks,
            )
            trainer.remove_callback(PrinterCallback)
            trainer.lorakit_marker = {"fingerprint": fp}
            trainer.lorakit_chunked = cfg.chunked_loss and not cfg.use_liger_kernel
            guard.trainer = trainer
            try:
                result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
                break
            except Exception as e:
                if not _is_oom(e):
                    raise
                step = trainer.state.global_step
                if not cfg.auto_batch_size or batch_size == 1:
                    raise LorakitError(
                        f"out of memory at step {step} with batch_size {batch_size}: use --gradient_checkpointing, "
                        "--load_in_4bit, a shorter --max_seq_length or a smaller --lora_r (`lorakit plan` shows what fits)"
                    ) from None
                model.zero_grad(set_to_none=True)
                trainer.nonfinite_sources.clear()
                checkpoint = None
                if step > 0:  # weights and optimizer are those after the last completed step
                    trainer._save_checkpoint(trainer.model, None)
                    checkpoint = out / f"checkpoint-{step}"
                backoffs.append(
                    {
                        "step": step,
                        "batch_size": batch_size // 2,
                        "gradient_accumulation_steps": accumulation * 2,
                    }
                )
                say(
                    f"lorakit: out of memory at step {step}: batch_size {batch_size} -> {batch_size // 2}, "
                    f"gradient_accumulation_steps {accumulation} -> {accumulation * 2} (same effective batch); continuing",
                    flush=True,
                )
                metrics.append({"step": step, "oom_backoff": backoffs[-1]})
                batch_size, accumulation = batch_size // 2, accumulation * 2
                _free_memory()
    finally:
        signals.uninstall()

    final_cfg = dataclasses.replace(cfg, batch_size=batch_size, gradient_accumulation_steps=accumulation)
    state = trainer.state
    evals = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    summary = {
        "summary": True,
        "step": state.global_step,
        "steps": state.global_step,
        "train_loss": result.training_loss,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "tokens_seen": state.num_input_tokens_seen,
        "tokens_per_second": round(
            state.num_input_tokens_seen / max(result.metrics.get("train_runtime", 1e-9), 1e-9), 1
        ),
        "eval_loss": evals[-1] if evals else None,
        "best_eval_loss": state.best_metric,
        "best_checkpoint": state.best_model_checkpoint,
        "trainable_params": trainable,
        "total_params": total,
        "rows_kept": report.kept,
        "rows_dropped_overlength": len(report.dropped_overlength),
        "precision": precision,
        "oom_backoffs": backoffs,
        "nonfinite_steps": guard.events,
        "warnings": health.messages,
    }
    if guard.diverged:
        metrics.append({**summary, "status": "diverged"})
        last = complete_checkpoints(out)
        raise TrainingDiverged(
            f"training diverged: {cfg.max_nonfinite_steps} consecutive steps with a non-finite loss or gradient "
            f"(rows: {', '.join(guard.events[-1]['rows'][:5]) or 'see metrics.jsonl'}); "
            f"last good checkpoint: {last[-1] if last else 'none'}; lower --learning_rate or check those rows"
        )
    if signals.signum is not None:
        metrics.append({**summary, "status": "interrupted"})
        plot_loss_curve(out)
        last = complete_checkpoints(out)
        say(
            f"lorakit: stopped at step {state.global_step}; checkpoint {last[-1] if last else '-'}; "
            f"continue with: lorakit train --config {out / 'lorakit.yaml'} --resume",
            flush=True,
        )
        raise SystemExit(128 + signals.signum)
    if pause is not None and pause.hit and state.global_step < state.max_steps:
        metrics.append({**summary, "status": "paused"})
        plot_loss_curve(out)
        return out
    metrics.append({**summary, "status": "finished"})
    plot_loss_curve(out)
    if not is_main_process():  # rank 0 writes the outputs
        return out
    with staged_files(out, last=("adapter_config.json",)) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)  # the best one with early stopping
        tokenizer.save_pretrained(tmp)
        write_yaml(final_cfg, tmp)
        atomic_write_json(
            tmp / "manifest.json",
            manifest(final_cfg, base, fp, report, started, status="finished", final_metrics=summary),
        )
    restored = (
        f", restored best step {state.best_model_checkpoint.rsplit('-', 1)[-1]}"
        if cfg.early_stopping_patience and state.best_model_checkpoint
        else ""
    )
    say(
        f"lorakit: adapter written to {out} (loss {result.training_loss:.4f}, {summary['tokens_per_second']} tokens/s{restored})",
        flush=True,
    )
    return out


def memory_check(cfg: TrainConfig, lengths: list[int], gpu_bytes: int) -> bool:
    """Run the planner for this exact run on this GPU; warn (and return False) when it will not fit."""
    from .config import PlanConfig
    from .plan import GIB, make_plan

    try:
        plan_cfg = PlanConfig(**dataclasses.asdict(cfg), gpu_memory=f"{gpu_bytes / GIB:.2f}GiB")
        lengths_info = (max(lengths), sum(lengths) / len(lengths), len(lengths), "the training data")
        p = make_plan(plan_cfg, lengths=lengths_info)
    except Exception as e:  # the planner must never stop a run it cannot model
        say(f"lorakit: memory plan skipped ({type(e).__name__}: {str(e)[:120]})", flush=True)
        return True
    if not p.fits:
        say(
            f"lorakit: warning: this run is planned to need {p.total_bytes / GIB:.1f} GiB but the GPU has "
            f"{gpu_bytes / GIB:.1f} GiB; `lorakit plan --fit --gpu_memory {gpu_bytes / GIB:.0f}GiB` with the same flags "
            "finds settings that fit (out-of-memory backoff will try smaller micro-batches)",
            flush=True,
        )
    return bool(p.fits)


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
