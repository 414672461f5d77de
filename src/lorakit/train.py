"""Training: base model + LoRA (PEFT) trained on the encoded rows with transformers' Trainer.

Why Trainer and not TRL's SFTTrainer: lorakit tokenizes and masks rows itself (the mask comes
from the chat template, see data.py), so what is left is a plain causal-LM loop. SFTTrainer would
re-process the text (it appends EOS to text that already ends in the end-of-turn token, and builds
its own mask), which is the layer where silent data bugs come from.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .config import TrainConfig, write_yaml
from .data import Collator, prepare_data
from .errors import LorakitError
from .io import staged_files
from .models import load_model, load_tokenizer, resolve_base_model


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
    return "fp16" if cfg.fp16 else "bf16" if cfg.bf16 else "fp32"


def cpu_supports_bf16() -> bool:
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _callbacks(out: Path):
    from transformers import TrainerCallback

    class MetricsLog(TrainerCallback):
        """Appends every log line to metrics.jsonl, with real (non-pad) tokens per second."""

        def __init__(self):
            self.path = out / "metrics.jsonl"
            self.path.unlink(missing_ok=True)
            self.last = (time.perf_counter(), 0)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            now, seen = time.perf_counter(), state.num_input_tokens_seen
            row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
            if "eval_loss" in logs:
                row["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
            if "loss" in logs and now > self.last[0]:
                row["tokens_per_second"] = round((seen - self.last[1]) / (now - self.last[0]), 1)
                self.last = (now, seen)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    return [MetricsLog()]


def train(cfg: TrainConfig) -> Path:
    """Train a LoRA adapter; returns the output directory holding it."""
    out = Path(cfg.output_dir).expanduser()
    if (out / "adapter_config.json").exists() and not cfg.overwrite:
        raise LorakitError(f"{out} already holds an adapter: pass --overwrite or choose another --output_dir")
    from .data import load_samples

    load_samples(cfg)  # check the data (fast, no tokenizer) before spending time on imports and the model

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    precision = check_precision(cfg)
    base = resolve_base_model(cfg.base_model)
    tokenizer = load_tokenizer(base, cfg.trust_remote_code)
    examples, val_examples, report = prepare_data(cfg, tokenizer)
    print(f"lorakit: data {cfg.dataset or 'demo'}: {report.summary()}", flush=True)

    set_seed(cfg.seed)
    cuda = torch.cuda.is_available()
    # Frozen base weights in the half dtype on GPU; on CPU fp32 weights with bf16 autocast,
    # which runs as fast as bf16 weights here and keeps the frozen weights exact.
    dtype = (
        {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        if cuda
        else torch.float32
    )
    model = load_model(base, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    model.config.use_cache = False  # the KV cache is useless in training and breaks per-row masks
    targets = cfg.target_modules[0] if cfg.target_modules == ["all-linear"] else cfg.target_modules
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise LorakitError(
            f"--target_modules {','.join(cfg.target_modules)}: {str(e).splitlines()[0]}"
        ) from None
    trainable, total = model.get_nb_trainable_parameters()
    print(
        f"lorakit: trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}",
        flush=True,
    )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()

    micro_batches = math.ceil(len(examples) / cfg.batch_size)
    steps_per_epoch = max(1, math.ceil(micro_batches / cfg.gradient_accumulation_steps))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_epochs)
    warmup = cfg.warmup_steps
    if warmup >= total_steps:
        warmup = total_steps // 10
        print(
            f"lorakit: warmup_steps {cfg.warmup_steps} >= the run's {total_steps} steps; warming up for {warmup}",
            flush=True,
        )

    out.mkdir(parents=True, exist_ok=True)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.batch_size,
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
        use_cpu=not cuda,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        eval_strategy=("steps" if cfg.eval_steps > 0 else "epoch") if val_examples else "no",
        eval_steps=cfg.eval_steps if cfg.eval_steps > 0 else None,
        per_device_eval_batch_size=cfg.batch_size,
        report_to=["tensorboard"],
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=cfg.seed,
        disable_tqdm=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=examples,
        eval_dataset=val_examples or None,
        data_collator=Collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=_callbacks(out),
    )
    result = trainer.train()
    tokens = trainer.state.num_input_tokens_seen
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    summary = {
        "summary": True,
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / max(result.metrics.get("train_runtime", 1e-9), 1e-9), 1),
        "eval_loss": evals[-1] if evals else None,
        "trainable_params": trainable,
        "total_params": total,
        "rows_kept": report.kept,
        "rows_dropped_overlength": len(report.dropped_overlength),
        "precision": precision,
    }
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(summary) + "\n")

    with staged_files(out, last=("adapter_config.json",)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_yaml(cfg, tmp)
    print(
        f"lorakit: adapter written to {out} (loss {result.training_loss:.4f}, {summary['tokens_per_second']} tokens/s)",
        flush=True,
    )
    return out
