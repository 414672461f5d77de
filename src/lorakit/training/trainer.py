"""What lorakit adds to transformers' Trainer for unattended runs: atomic checkpoints with a
marker, the supervised-only chunked loss, a NaN/inf guard that skips the step and names the rows,
and a pause at a given step (successive halving). Imported only when training starts: it pulls in
transformers' Trainer, which takes seconds to import."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer_utils import rotate_checkpoints

from ..core.config import TrainConfig
from ..core.files import atomic_write_json, say
from ..core.labels import IGNORE_INDEX
from .checkpoints import CHECKPOINT_MARKER


class NonFiniteGuard(TrainerCallback):
    """Before each optimizer step: if the loss or any gradient is NaN/inf, drop the gradients
    (AdamW skips parameters without one, so the step changes nothing) and report the rows.
    After `max_steps` such steps in a row the run stops as diverged."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps
        self.sources: list[str] = []  # rows of micro-batches with a non-finite loss, this step
        self.consecutive = 0
        self.events: list[dict] = []
        self.diverged = False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        bad_grad = any(not torch.isfinite(p.grad).all() for p in params)
        sources = list(dict.fromkeys(self.sources))
        self.sources.clear()
        if not bad_grad and not sources:
            self.consecutive = 0
            return
        for p in params:
            p.grad = None
        self.consecutive += 1
        event = {"step": state.global_step + 1, "rows": sources, "kind": "loss" if sources else "gradient"}
        self.events.append(event)
        say(
            f"lorakit: warning: non-finite {event['kind']} at step {event['step']}; step skipped"
            + (f" (rows: {', '.join(sources[:8])})" if sources else "")
        )
        if self.consecutive >= self.max_steps:
            self.diverged = True  # no more checkpoints: the last good one stays the newest
            control.should_training_stop = True
        return control


class Timed(TrainerCallback):
    """Times the training loop for the efficiency record (efficiency.Counter)."""

    def __init__(self, counter):
        self.counter = counter

    def on_train_begin(self, args, state, control, **kw):
        self.counter.start()

    def on_train_end(self, args, state, control, **kw):
        self.counter.stop()


class StopAtStep(TrainerCallback):
    """Pause at a step (checkpoint written, schedule unchanged); used by successive halving."""

    def __init__(self, step: int):
        self.step = step
        self.hit = False

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_save = control.should_training_stop = True
            self.hit = True
        return control


class LorakitTrainer(Trainer):
    """Trainer with atomic marked checkpoints, the chunked loss and the non-finite guard."""

    def __init__(
        self, *args, guard: NonFiniteGuard, marker: dict, chunked_loss: bool, counter=None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.marker = marker
        self.chunked_loss = chunked_loss
        self.counter = counter  # efficiency.Counter: real tokens, squared lengths, labels trained on
        if chunked_loss and self.args.world_size > 1:
            say(
                "lorakit: note: --chunked_loss is off with several processes (the DDP wrapper must run the "
                "model's own forward); the model's loss is used"
            )

    def _get_train_sampler(self, train_dataset=None):
        # Kept private override: for a dataset that is not a `datasets.Dataset`, Trainer learns
        # the row lengths for group_by_length by reading every row (a million rows: a pass over
        # the whole cache); the cached rows know their lengths from their offsets.
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(batch, dataset=dataset, lengths=dataset.lengths())
        return super()._get_train_sampler(train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """With --max_tokens_per_batch the batch is a whole optimizer step (gradient accumulation
        1 for the Trainer) carrying its token-budget micro-batches: each is a forward and backward
        whose loss is a sum over its labels divided by the step's label count, so the gradients add
        up to the step's mean loss, as with row-count micro-batches."""
        parts = inputs.pop("micro_batches", None)
        if not parts:
            return super().training_step(model, inputs, num_items_in_batch)
        if not (self.chunked_loss and self.args.world_size == 1) and not self.model_accepts_loss_kwargs:
            from ..core.errors import LorakitError

            raise LorakitError(
                "--max_tokens_per_batch: this model's loss cannot be given the step's label count; "
                "use --chunked_loss (one process) or drop --max_tokens_per_batch"
            )
        if num_items_in_batch is None:  # the Trainer counts labels only for a loss that takes the count
            num_items_in_batch = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum().to(self.args.device)
        total = None
        for k, part in enumerate(parts):
            # Gradients synchronise across processes once per step, after the last micro-batch.
            last = k == len(parts) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = super().training_step(model, part, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sources = inputs.pop("sources", None)
        inputs.pop("micro_batches", None)  # evaluation batches come through the same collator
        if model.training and self.counter is not None:
            self.counter.add(inputs)
        # The chunked loss calls the decoder directly, which a DDP wrapper must not be bypassed
        # for: multi-process runs use the model's own loss.
        if self.chunked_loss and self.args.world_size == 1:
            from .loss import causal_lm_loss

            # accelerate applies --bf16/--fp16 autocast by wrapping the model's forward, which the
            # chunked loss does not call (it runs the decoder and the head itself): same context here.
            with self.accelerator.autocast():
                loss = causal_lm_loss(model, inputs, num_items_in_batch)
            result = (loss, {}) if return_outputs else loss  # evaluation only needs the loss
        else:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if model.training and not torch.isfinite(loss.detach()).all():
            self.guard.sources.extend(sources or ["?"])
        return result

    def save_checkpoint_now(self) -> Path:
        """A checkpoint of the last completed step, outside the save schedule (out-of-memory
        backoff restarts from it)."""
        self._save_checkpoint(self.model, None)
        return Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"

    # A private Trainer method, overridden on purpose: no public hook runs *around* the save, and
    # the files must be written elsewhere and renamed into place, so a process killed mid-save
    # never leaves a checkpoint-N that a later save of step N writes into and mixes with.
    # on_save runs only after the files are already in their final place. The kill -9 ->
    # --resume bit-identical test and the partial-checkpoint test pin what this buys.
    def _save_checkpoint(self, model, trial):
        """Write the checkpoint into a staging directory, add the marker, then rename it.

        Distributed: every rank writes its part (its RNG state) into the same staging directory;
        the main process then adds the marker and renames it.
        """
        if self.guard.diverged:
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
        if self.state.best_model_checkpoint:  # recorded while saving into the staging directory
            self.state.best_model_checkpoint = self.state.best_model_checkpoint.replace(stage_root, real_out)
        if main:
            staged = Path(stage_root) / name
            if (staged / "trainer_state.json").is_file():
                state = TrainerState.load_from_json(str(staged / "trainer_state.json"))
                state.best_model_checkpoint = self.state.best_model_checkpoint
                state.save_to_json(str(staged / "trainer_state.json"))
            atomic_write_json(staged / CHECKPOINT_MARKER, {**self.marker, "step": self.state.global_step})
            final = Path(real_out) / name
            if final.exists():
                shutil.rmtree(final)
            os.rename(staged, final)
            shutil.rmtree(stage_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            rotate_checkpoints(
                real_out, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=False
            )


def is_out_of_memory(e: BaseException) -> bool:
    message = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)
    )


def optimizer_name(optim: str) -> str:
    """--optim auto: fused AdamW where CUDA runs it (one kernel for all parameters), else adamw_torch."""
    if optim != "auto":
        return optim
    return "adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch"


def training_arguments(
    cfg: TrainConfig, out: Path, precision: str, total_steps: int, has_val: bool, eval_batch_size: int = 0
):

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
        per_device_eval_batch_size=eval_batch_size or cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        warmup_steps=warmup,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler_type,
        max_grad_norm=cfg.max_grad_norm,
        optim=optimizer_name(cfg.optim),
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
        report_to=[] if cfg.report_to == ["none"] else cfg.report_to,
        run_name=cfg.run_name or out.name,
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


class OptunaPruning(TrainerCallback):
    """Reports each validation loss to an Optuna trial and stops the run when Optuna prunes it."""

    def __init__(self, study_trial):
        self.study_trial = study_trial
        self.pruned = False

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.study_trial.report(metrics["eval_loss"], state.global_step)
        if self.study_trial.should_prune():
            self.pruned = True
            control.should_training_stop = True
        return control


class StartFromAdapter(TrainerCallback):
    """At the start of a fresh run, load an earlier adapter's LoRA weights into the model
    (PEFT's own loader), so training continues from that adapter instead of a new LoRA init.
    Not for a resumed run: its checkpoint holds newer weights (transformers loads them before
    on_train_begin, so the caller decides). The adapter must have the run's rank and targets."""

    def __init__(self, adapter_dir: str | Path):
        self.path = Path(adapter_dir) / "adapter_model.safetensors"
        self.loaded = False

    def on_train_begin(self, args, state, control, model=None, **kw):
        if self.loaded:  # a restart after an out-of-memory backoff keeps the weights it has
            return
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        result = set_peft_model_state_dict(model, load_file(str(self.path)))
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
        if missing:
            from ..core.errors import LorakitError

            raise LorakitError(
                f"{self.path}: LoRA weights that do not fit this run's model ({missing[0]} ...)"
            )
        self.loaded = True
        say(f"lorakit: starting from the weights of {self.path.parent}")
