"""One command for the day a GPU is lent: the memory planner against real allocations, and
real-token throughput of lorakit against the guide's recipe and TRL's padding-free SFTTrainer.

Memory. For each configuration (LoRA in bf16 or 4-bit QLoRA through bitsandbytes NF4, gradient
checkpointing on or off, 512 or 2048 tokens), a model of the real shape with random weights is
saved to a temporary folder and loaded back through lorakit's own loading code
(`load_training_model` + `add_lora`, the path of `lorakit train`, `--load_in_4bit` included).
Models too large to build and load in the time are cut to their first layers; the planner is then
asked about the same cut config, and the table says so. Two steps are measured on each:

  planner's step   what `lorakit plan` traces: the model's own loss over full logits, backward,
                   AdamW (foreach), no autocast.
  lorakit's step   what `lorakit train` runs: bf16 autocast, the chunked supervised loss,
                   gradient clipping, fused AdamW on CUDA.

Both are compared with the planner's allocated bytes: base weights + LoRA weights + AdamW state +
the traced step peak (activations, logits, gradients, temporaries) + the de-quantized layer
temporary. The planner's CUDA context and allocator slack are left out: they are memory the
process holds that torch.cuda.max_memory_allocated() does not report. The measured figure is
max_memory_allocated() over a steady-state step (after a first step created the optimizer's
moments), minus what was allocated before the model was loaded.

Throughput. The same synthetic long-tailed rows (benchmarks/speed.py's make_data), the same LoRA
(r=64 on the seven projections), batch 4 x 4, one epoch, bf16, no gradient checkpointing:
(a) `lorakit train` defaults, (b) the guide's recipe (Trainer + PEFT, rows padded to
max_seq_length, default collator; speed.py's `_guide`), (c) TRL's SFTTrainer with
`padding_free=True` (flash_attention_2 when flash-attn is installed, else sdpa). Real (non-pad)
tokens / train_runtime.

    python benchmarks/gpu_check.py                  # on the GPU machine: < 8 minutes (--budget_s)
    python benchmarks/gpu_check.py --cpu-smoke      # the same code paths on CPU, tiny shapes, < 1 min

On CPU there is no allocator to ask: the "measured" figures come from lorakit's live-storage
counter (plan.live_bytes_counter) run on the real tensors, as benchmarks/plan_vs_measured.py does.
Nothing is downloaded (HF_HUB_OFFLINE=1): configs are lorakit's bundled ones, the tokenizer and the
SmolLM2 weights are the embedded model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Set before transformers / huggingface_hub are imported: they read these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MIB = 2**20
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Shape:
    """A bundled config, cut to `layers` decoder layers (None = all of them)."""

    name: str
    layers: int | None = None
    prep_s: float = 0.0  # estimated seconds to build and save its random weights (budget guard)


@dataclass(frozen=True)
class MemoryCase:
    shape: Shape
    qlora: bool
    checkpointing: bool
    seq: int
    batch: int
    est_s: float  # estimated seconds: plan + load (+ quantize) + 4 steps


@dataclass(frozen=True)
class SpeedCase:
    shape: Shape
    embedded: bool  # SmolLM2's real weights from the embedded model, else random weights
    recipe: str  # lorakit | guide | trl
    est_s: float


# On one H100: full Llama-3.2-1B (16 layers, 1.2B parameters); the 7-8B models cut to 4 layers (~2B
# parameters, 4 GB of bf16 weights to write and read back), which keeps their real layer widths,
# vocabulary and LM head. Estimated seconds are generous: the guard skips what would overrun.
# Estimates (not measured: no GPU was available when they were written): building and saving 2.5 GB
# of random weights ~10 s, 4 GB ~15 s; a memory row = plan (1-3 s on the CPU) + load from the page
# cache and copy to the GPU (+ NF4 quantization) + 4 steps; a throughput row = data encoding and
# Trainer set-up + ~90k real tokens (the guide: 384 x 1024 padded positions).
LLAMA_1B = Shape("Llama-3.2-1B", None, 15)
LLAMA_8B = Shape("Llama-3.1-8B", 4, 20)
QWEN_7B = Shape("Qwen2.5-7B", 4, 20)
SMOL = Shape("SmolLM2-135M", None, 10)
GPU_MEMORY = [
    MemoryCase(LLAMA_1B, False, False, 512, 4, 15),
    MemoryCase(LLAMA_1B, True, False, 512, 4, 20),
    MemoryCase(LLAMA_1B, False, True, 2048, 4, 15),
    MemoryCase(LLAMA_1B, True, True, 2048, 4, 20),
    MemoryCase(LLAMA_8B, False, False, 2048, 2, 15),
    MemoryCase(LLAMA_8B, True, True, 2048, 2, 20),
    MemoryCase(QWEN_7B, True, False, 512, 4, 20),
    MemoryCase(QWEN_7B, False, True, 2048, 2, 15),
]
GPU_SPEED = [
    SpeedCase(SMOL, True, "lorakit", 15),
    SpeedCase(SMOL, True, "guide", 20),
    SpeedCase(SMOL, True, "trl", 20),
    SpeedCase(LLAMA_1B, False, "lorakit", 20),
    SpeedCase(LLAMA_1B, False, "guide", 40),
    SpeedCase(LLAMA_1B, False, "trl", 25),
]
# CPU smoke: the same shapes shrunk to 2 layers of width 64 (vocabularies kept), short rows.
SMOKE_SMOL, SMOKE_LLAMA = Shape("SmolLM2-135M", 2), Shape("Llama-3.2-1B", 2)
SMOKE_MEMORY = [
    MemoryCase(SMOKE_SMOL, False, False, 64, 2, 5),
    MemoryCase(SMOKE_SMOL, False, True, 128, 2, 5),
    MemoryCase(SMOKE_LLAMA, False, False, 64, 2, 5),
    MemoryCase(SMOKE_LLAMA, True, True, 64, 2, 5),
]
SMOKE_SPEED = [SpeedCase(SMOKE_SMOL, False, r, 10) for r in ("lorakit", "guide", "trl")]
SMOKE_WIDTH = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


class Budget:
    """Wall-clock guard: an item runs only if its estimate fits before the deadline, less what is
    reserved for the items after it; skipped items are reported, never dropped silently."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allows(self, est_s: float, reserve_s: float = 0.0) -> bool:
        return self.elapsed() + est_s + reserve_s <= self.seconds


# --------------------------------------------------------------------------------------------
# Device helpers: every CUDA call is behind a device check, so the CPU smoke never touches CUDA.


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def allocated(device) -> int:
    import torch

    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


# --------------------------------------------------------------------------------------------
# Models of the real shapes


def shape_config(shape: Shape, tokenizer, smoke: bool):
    """(config, layers info): the bundled config, cut to `shape.layers` (and shrunk in width for
    the smoke); the info says how far it was cut, for the report."""
    from lorakit.planning.trace import _truncate_layers, load_model_config

    config, _ = load_model_config(shape.name)
    full = config.num_hidden_layers
    layers = min(shape.layers or full, full)
    if layers < full:
        config = _truncate_layers(config, layers)
    info = {"layers": layers, "layers_full": full, "cut": layers < full, "hidden_size": config.hidden_size}
    if smoke:
        for key, value in SMOKE_WIDTH.items():
            setattr(config, key, value)
        if getattr(config, "head_dim", None):
            config.head_dim = SMOKE_WIDTH["hidden_size"] // SMOKE_WIDTH["num_attention_heads"]
        info |= {"hidden_size": config.hidden_size, "shrunk": True}
    config.use_cache = False
    # The SmolLM2 tokenizer drives every shape (no other tokenizer is available offline); its ids
    # are below every bundled vocabulary size. The pad id is the embedding's padding_idx.
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return config, info


def random_model_folder(work: Path, shape: Shape) -> Path:
    return work / "models" / f"{shape.name}-{shape.layers or 'all'}"


def weight_dtype(precision: str):
    """The dtype weights are saved in: lorakit loads a GPU run's base in its half dtype, a CPU
    run's in fp32 (models.base_weight_dtype); the guide and TRL load the checkpoint's dtype."""
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def save_random_model(config, tokenizer, folder: Path, device, dtype) -> Path:
    """Random weights of `config`, initialised on `device` (fast on a GPU), saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    free_memory(device)
    return folder


def save_embedded_copy(folder: Path, dtype) -> Path:
    """The embedded SmolLM2-135M-Instruct weights, saved in `dtype` so every recipe loads the same
    bf16 weights (the converted cache is fp32 and `from_pretrained` keeps a checkpoint's dtype)."""
    from transformers import AutoModelForCausalLM

    from lorakit.models.loading import load_tokenizer, resolve_base_model

    base = resolve_base_model("")
    AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype).save_pretrained(folder)
    load_tokenizer(base).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------
# Memory: planner vs measured


def train_config(case: MemoryCase, precision: str, model_dir: str = ""):
    from lorakit.core.config import PlanConfig

    return PlanConfig(
        base_model=model_dir,
        bf16=precision == "bf16",
        load_in_4bit=case.qlora,
        # On CPU lorakit keeps fp32 weights; the 4-bit matmuls are asked for in fp32 too, so that
        # the planner (which plans in the compute dtype) and the measured model agree.
        bnb_4bit_compute_dtype="fp32" if precision == "fp32" else "auto",
        gradient_checkpointing=case.checkpointing,
        batch_size=case.batch,
        max_seq_length=case.seq,
        report_to=["none"],
    )


def planned(config, cfg) -> dict:
    """The planner's figures for this exact (possibly cut) config, in bytes."""
    from lorakit.planning.memory import make_plan

    p = make_plan(
        cfg, config, "gpu_check", (cfg.max_seq_length, float(cfg.max_seq_length), None, "gpu_check")
    )
    m = p.memory
    static = m.base_weights + m.lora_weights + m.optimizer_state
    return {
        "static": static,
        "step": m.step_peak + m.dequant_temporary,
        "allocated": static + m.step_peak + m.dequant_temporary,
        "total": p.total_bytes,  # + CUDA context and allocator slack
        "trainable": p.trainable,
    }


def load_lorakit(model_dir: str, cfg, device):
    """The model exactly as `lorakit train` builds it: load_training_model (bitsandbytes for
    4-bit, prepare_model_for_kbit_training) then add_lora."""
    from lorakit.core.config import TrainConfig
    from lorakit.core.fields import as_config
    from lorakit.models.loading import add_lora, load_training_model, resolve_base_model

    train_cfg = as_config(cfg, TrainConfig)
    model = add_lora(train_cfg, load_training_model(train_cfg, resolve_base_model(model_dir), cfg.precision))
    if not cfg.load_in_4bit:
        model.to(device)  # a 4-bit model is placed on the GPU by its device_map while it loads
    return model


def static_bytes(model, optimizer, extra=()) -> int:
    """Bytes of the distinct storages held between steps (CPU: no allocator to ask): parameters,
    buffers, bitsandbytes quantization constants, optimizer moments and the batch."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
        elif dataclasses.is_dataclass(t) or hasattr(t, "__dict__"):  # a QuantState, nested ones too
            for v in vars(t).values():
                if isinstance(v, torch.Tensor) or type(v).__name__ == "QuantState":
                    add(v)

    for p in model.parameters():
        add(p)
        if getattr(p, "quant_state", None) is not None:
            add(p.quant_state)
    for b in model.buffers():
        add(b)
    for state in optimizer.state.values():
        for v in state.values():
            add(v)
    for t in extra:
        add(t)
    return total


def make_step(model, ids, kind: str, precision: str, device):
    """(step function, optimizer) for the planner's step or lorakit's step (see the docstring)."""
    import torch

    from lorakit.training.loss import causal_lm_loss

    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "planner":
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)  # what plan.step_peak_bytes runs
    else:  # lorakit's optim "auto": fused AdamW on CUDA, adamw_torch elsewhere
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    mask = torch.ones_like(ids)
    half = precision in ("bf16", "fp16")

    def step() -> None:
        if kind == "planner":
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
                loss = causal_lm_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": ids})
        loss.backward()
        if kind != "planner":
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer, mask


def measure_steps(model, case: MemoryCase, vocab: int, precision: str, device, baseline: int) -> dict:
    """Static bytes and steady-state step peak of both steps, in bytes."""
    import torch

    from lorakit.planning.trace import live_bytes_counter

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (case.batch, case.seq), generator=gen).to(device)
    model.train()
    out = {}
    for kind in ("planner", "lorakit"):
        step, optimizer, mask = make_step(model, ids, kind, precision, device)
        step()  # warm-up: the optimizer's moments exist from here on, as in every later step
        if device.type == "cuda":
            before = allocated(device)
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            out[kind] = {
                "static": before - baseline,
                "step": peak - before,
                "reserved": torch.cuda.max_memory_reserved(),
            }
        else:
            before = static_bytes(model, optimizer, (ids, mask))
            counter = live_bytes_counter()
            with counter:
                step()
            out[kind] = {"static": before, "step": counter.peak, "reserved": None}
        out[kind]["peak"] = out[kind]["static"] + out[kind]["step"]
        del step, optimizer, mask
        free_memory(device)
    return out


def error_pct(predicted: float, measured: float) -> float:
    return 100.0 * (predicted - measured) / measured


def memory_row(case: MemoryCase, info: dict, model_dir: str, config, precision, device) -> dict:
    cfg = train_config(case, precision, model_dir)
    started = time.monotonic()
    plan = planned(config, cfg)
    free_memory(device)
    baseline = allocated(device)
    model = load_lorakit(model_dir, cfg, device)
    try:
        measured = measure_steps(model, case, config.vocab_size, precision, device, baseline)
    finally:
        del model
        free_memory(device)
    mine, real = measured["planner"], measured["lorakit"]
    return {
        "model": case.shape.name,
        **info,
        "method": "QLoRA (NF4)" if case.qlora else "LoRA",
        "precision": precision,
        "gradient_checkpointing": case.checkpointing,
        "batch": case.batch,
        "seq": case.seq,
        "predicted_mib": plan["allocated"] / MIB,
        "measured_mib": mine["peak"] / MIB,
        "error_pct": error_pct(plan["allocated"], mine["peak"]),
        "measured_lorakit_mib": real["peak"] / MIB,
        "lorakit_error_pct": error_pct(plan["allocated"], real["peak"]),
        "predicted_static_mib": plan["static"] / MIB,
        "measured_static_mib": mine["static"] / MIB,
        "predicted_step_mib": plan["step"] / MIB,
        "measured_step_mib": mine["step"] / MIB,
        "measured_lorakit_step_mib": real["step"] / MIB,
        "planner_total_mib": plan["total"] / MIB,
        "max_reserved_mib": mine["reserved"] / MIB if mine["reserved"] is not None else None,
        "seconds": time.monotonic() - started,
        "status": "ok",
    }


def run_memory(cases, tokenizer, work: Path, precision: str, device, smoke: bool, budget, reserve_s) -> list:
    rows, saved = [], {}
    for case in cases:
        label = f"{case.shape.name} {'QLoRA' if case.qlora else 'LoRA'} gc={case.checkpointing} {case.batch}x{case.seq}"
        base = {"model": case.shape.name, "method": "QLoRA (NF4)" if case.qlora else "LoRA"}
        base |= {"gradient_checkpointing": case.checkpointing, "batch": case.batch, "seq": case.seq}
        prep = 0.0 if case.shape in saved else case.shape.prep_s
        if not budget.allows(prep + case.est_s, reserve_s):
            rows.append({**base, "status": f"skipped: time budget ({budget.elapsed():.0f} s used)"})
            print(f"memory  {label}: skipped (time budget)", flush=True)
            continue
        try:
            if case.shape not in saved:
                config, info = shape_config(case.shape, tokenizer, smoke)
                folder = random_model_folder(work, case.shape)
                if not folder.exists():
                    save_random_model(config, tokenizer, folder, device, weight_dtype(precision))
                saved[case.shape] = (config, info, str(folder))
            config, info, folder = saved[case.shape]
            row = memory_row(case, info, folder, config, precision, device)
        # One failing configuration (out of memory, a missing kernel) must not stop the rest; the next
        # row frees what it left once this exception (and the frames it holds) is gone.
        except Exception as e:
            row = {
                **base,
                "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
            }
        rows.append(row)
        if row["status"] == "ok":
            print(
                f"memory  {label}: predicted {row['predicted_mib']:.0f} MiB, measured {row['measured_mib']:.0f} MiB "
                f"({row['error_pct']:+.1f}%), lorakit's step {row['measured_lorakit_mib']:.0f} MiB "
                f"({row['seconds']:.0f} s)",
                flush=True,
            )
        else:
            print(f"memory  {label}: {row['status']}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# Throughput: lorakit train, the guide's recipe, TRL padding-free


def encoded_rows(recipe: dict, tokenizer) -> list[dict]:
    """The rows every recipe trains on: lorakit's encoding of the data file (assistant-only labels),
    the same rows `lorakit train` encodes from it."""
    from lorakit.core.config import TrainConfig
    from lorakit.data.encode import encode_samples, load_samples
    from lorakit.data.formats import DataReport
    from lorakit.data.template import ChatFormat

    samples, _, _ = load_samples(TrainConfig(**recipe))
    return encode_samples(samples, ChatFormat(tokenizer), recipe["max_seq_length"], report=DataReport())


def run_lorakit(recipe: dict) -> tuple[float, int]:
    """(train_runtime seconds, the non-pad tokens lorakit counted: a check that it trained the same rows)."""
    from lorakit.core.config import TrainConfig
    from lorakit.training.train import train

    out = train(TrainConfig(**recipe))
    summary = json.loads(Path(out, "metrics.jsonl").read_text().splitlines()[-1])
    return float(summary["train_runtime_s"]), int(summary["tokens_seen"])


def run_guide(recipe: dict, examples: list[dict], tokenizer) -> float:
    from speed import _guide
    from transformers import TrainerCallback

    model, seconds = _guide(recipe, examples, tokenizer, TrainerCallback())
    del model
    return float(seconds)


def attention_for_padding_free(device) -> str:
    """flash_attention_2 where flash-attn is installed on a GPU; else sdpa, which transformers runs
    with a block-diagonal mask built from the packed position ids (correct, slower)."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def run_trl(recipe: dict, examples: list[dict], tokenizer, attention: str, device, dtype) -> float:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    torch.manual_seed(recipe["seed"])
    # The dtype is explicit: transformers refuses flash_attention_2 for a model it would load in fp32.
    model = AutoModelForCausalLM.from_pretrained(
        recipe["base_model"], dtype=dtype, attn_implementation=attention
    )
    args = SFTConfig(
        output_dir=recipe["output_dir"],
        per_device_train_batch_size=recipe["batch_size"],
        gradient_accumulation_steps=recipe["gradient_accumulation_steps"],
        learning_rate=recipe["learning_rate"],
        num_train_epochs=1,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=recipe["seed"],
        use_cpu=device.type != "cuda",
        disable_tqdm=True,
        bf16=recipe.get("bf16", False),
        gradient_checkpointing=False,  # as the other two recipes (SFTConfig's default is on)
        padding_free=True,
        max_length=None,  # rows are already within max_seq_length; padding-free refuses truncation
    )
    lora = LoraConfig(
        r=recipe["lora_r"],
        lora_alpha=recipe["lora_alpha"],
        lora_dropout=recipe["lora_dropout"],
        target_modules=SEVEN,
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
    )
    result = trainer.train()
    del trainer, model
    return float(result.metrics["train_runtime"])


def run_speed(cases, tokenizer, work: Path, precision: str, device, smoke: bool, budget, rows: int) -> list:
    import torch
    from speed import guide_recipe, make_data

    from lorakit.models.loading import load_tokenizer, resolve_base_model

    data = work / "speed-train.jsonl"
    # Short rows in the smoke (median ~30 tokens) so a 1024-token padding is not the whole test.
    make_data(data, rows, seed=1, scale=0.15 if smoke else 1.0)
    max_len = 192 if smoke else 1024  # smoke: the guide pads every row to this
    results, prepared = [], {}
    for case in cases:
        label = f"{case.shape.name} {case.recipe}"
        base = {"model": case.shape.name, "recipe": case.recipe}
        prep = 0.0 if case.shape in prepared else case.shape.prep_s
        if not budget.allows(prep + case.est_s):
            results.append({**base, "status": f"skipped: time budget ({budget.elapsed():.0f} s used)"})
            print(f"speed   {label}: skipped (time budget)", flush=True)
            continue
        try:
            if case.recipe == "trl" and importlib.util.find_spec("trl") is None:
                raise RuntimeError("trl is not installed (pip install 'lorakit[dev]')")
            if case.shape not in prepared:
                if case.embedded:
                    folder = work / "models" / f"embedded-{case.shape.name}"
                    if not folder.exists():
                        save_embedded_copy(folder, weight_dtype(precision))
                else:  # the memory rows' saved model of this shape when there is one
                    folder = random_model_folder(work, case.shape)
                    if not folder.exists():
                        config, _ = shape_config(case.shape, tokenizer, smoke)
                        save_random_model(config, tokenizer, folder, device, weight_dtype(precision))
                model_tok = load_tokenizer(resolve_base_model(str(folder)))
                prepared[case.shape] = (str(folder), model_tok)
            folder, model_tok = prepared[case.shape]
            out = work / "runs" / f"{case.shape.name}-{case.recipe}"
            shutil.rmtree(out, ignore_errors=True)
            recipe = guide_recipe(folder, str(data), str(out))
            recipe |= {"max_seq_length": max_len, "bf16": precision == "bf16", "report_to": ["none"]}
            examples = encoded_rows(recipe, model_tok)
            real_tokens = sum(len(e["input_ids"]) for e in examples)
            attention = attention_for_padding_free(device) if case.recipe == "trl" else "sdpa"
            free_memory(device)
            before = allocated(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            started = time.monotonic()
            tokens_seen = None
            if case.recipe == "lorakit":
                seconds, tokens_seen = run_lorakit(recipe)
            elif case.recipe == "guide":
                seconds = run_guide(recipe, examples, model_tok)
            else:
                seconds = run_trl(recipe, examples, model_tok, attention, device, weight_dtype(precision))
            row = {
                **base,
                "attention": attention,
                "precision": precision,
                "rows": len(examples),
                "real_tokens": real_tokens,
                "tokens_seen": tokens_seen,
                "train_seconds": seconds,
                "tokens_per_second": real_tokens / seconds,
                # The run's own peak: what an earlier run may have left allocated is subtracted.
                "peak_mib": (torch.cuda.max_memory_allocated() - before) / MIB
                if device.type == "cuda"
                else None,
                "seconds": time.monotonic() - started,
                "status": "ok",
            }
        except Exception as e:  # a recipe that fails is reported; the others still run
            row = {
                **base,
                "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
            }
        free_memory(device)
        results.append(row)
        if row["status"] == "ok":
            print(
                f"speed   {label}: {row['tokens_per_second']:.0f} real tokens/s ({row['real_tokens']} tokens, "
                f"{row['train_seconds']:.1f} s)",
                flush=True,
            )
        else:
            print(f"speed   {label}: {row['status']}", flush=True)
    by_model: dict[str, float] = {
        r["model"]: r["tokens_per_second"]
        for r in results
        if r.get("recipe") == "guide" and r["status"] == "ok"
    }
    for r in results:
        if r["status"] == "ok" and r["model"] in by_model:
            r["x_guide"] = r["tokens_per_second"] / by_model[r["model"]]
    return results


# --------------------------------------------------------------------------------------------
# Report


def _fmt(value, spec: str = ".0f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _layers(row: dict) -> str:
    """`16/16`, or `4/32 cut`: a model cut to its first layers (the planner was asked about the cut
    config); a shrunk width is named."""
    if "layers" not in row:
        return "-"
    text = f"{row['layers']}/{row['layers_full']}" + (" cut" if row["cut"] else "")
    return text + (f", hidden {row['hidden_size']}" if row.get("shrunk") else "")


def markdown(report: dict) -> str:
    lines = [
        f"# gpu_check: {report['device']} ({report['mode']})",
        "",
        f"{report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "## Memory: planner vs measured",
        "",
        "predicted: the planner's allocated bytes (base + LoRA weights, AdamW state, traced step peak, "
        "de-quantized layer; no CUDA context or allocator slack). measured: "
        + (
            "torch.cuda.max_memory_allocated() over a steady-state step"
            if report["mode"] == "gpu"
            else "live storages between steps + the live-storage counter's peak over a steady-state step (CPU)"
        )
        + "; planner's step = what the planner traces (model loss over full logits, foreach AdamW), "
        "lorakit's step = what `lorakit train` runs (bf16 autocast in bf16 runs, chunked loss, clipping, its AdamW).",
        "",
        "| model | layers | method | grad. ckpt | B x T | predicted MiB | measured MiB | error % "
        "| lorakit's step MiB | error % | step: predicted / measured MiB | static: predicted / measured MiB |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["memory"]:
        head = f"| {r['model']} | {_layers(r)} | {r['method']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['batch']} x {r['seq']} "
        if r["status"] != "ok":
            lines.append(head + f"| {r['status']} | | | | | | |")
            continue
        lines.append(
            head
            + f"| {_fmt(r['predicted_mib'])} | {_fmt(r['measured_mib'])} | {_fmt(r['error_pct'], '+.1f')} "
            f"| {_fmt(r['measured_lorakit_mib'])} | {_fmt(r['lorakit_error_pct'], '+.1f')} "
            f"| {_fmt(r['predicted_step_mib'])} / {_fmt(r['measured_step_mib'])} "
            f"| {_fmt(r['predicted_static_mib'])} / {_fmt(r['measured_static_mib'])} |"
        )
    lines += [
        "",
        "## Throughput: real (non-pad) tokens/s",
        "",
        "Same rows, same LoRA (r=64, seven projections), batch 4 x 4, one epoch, "
        f"{report['speed_precision']}, no gradient checkpointing. guide = Trainer + PEFT, rows padded to "
        "max_seq_length, default collator; trl = SFTTrainer with padding_free=True.",
        "",
        "| model | recipe | attention | rows | real tokens | train s | real tokens/s | x guide | peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["throughput"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['recipe']} | {r['status']} | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['attention']} | {r['rows']} | {r['real_tokens']} "
            f"| {r['train_seconds']:.1f} | {r['tokens_per_second']:.0f} | {_fmt(r.get('x_guide'), '.2f')} "
            f"| {_fmt(r['peak_mib'])} |"
        )
    lines += ["", *[f"- {n}" for n in report["notes"]], ""]
    return "\n".join(lines)


def versions() -> dict:
    import importlib.metadata as md
    import subprocess

    out = {}
    try:  # the commit measured, for the README's figures
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        )
        if rev.returncode == 0:
            out["lorakit commit"] = rev.stdout.strip()
    except OSError:
        pass
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "flash-attn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes on CPU: the same code paths, < 1 min"
    )
    ap.add_argument(
        "--budget_s", type=float, default=None, help="wall-clock budget (default 450 GPU, 300 smoke)"
    )
    ap.add_argument("--out", default="", help="work and output folder (default: a new temporary folder)")
    ap.add_argument("--json", default="", help="JSON results (default OUT/gpu_check.json)")
    ap.add_argument("--markdown", default="", help="markdown tables (default OUT/gpu_check.md)")
    ap.add_argument(
        "--rows", type=int, default=None, help="training rows per throughput run (default 384 GPU, 16 smoke)"
    )
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    budget = Budget(args.budget_s or (300.0 if smoke else 450.0))
    sys.path.insert(0, str(HERE))  # speed.py: make_data, guide_recipe, _guide

    import torch

    from lorakit.models.loading import load_tokenizer, resolve_base_model

    if smoke:
        device = torch.device("cpu")
        # Width-64 matrices: on a shared 2-core machine each multi-threaded matmul waits ~16 ms
        # for a busy core (measured), one thread runs them in microseconds.
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        ap.error("no CUDA GPU: run with --cpu-smoke on a machine without one")
    precision = "bf16" if device.type == "cuda" else "fp32"
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="lorakit-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"  # saved models and training runs, removed at the end
    work.mkdir(parents=True, exist_ok=True)
    memory_cases, speed_cases = (SMOKE_MEMORY, SMOKE_SPEED) if smoke else (GPU_MEMORY, GPU_SPEED)
    if args.skip_memory:
        memory_cases = []
    if args.skip_speed:
        speed_cases = []
    rows = args.rows or (16 if smoke else 384)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {label}, budget {budget.seconds:.0f} s, output {out}", flush=True)
    tokenizer = load_tokenizer(resolve_base_model(""))  # the embedded SmolLM2's (no download)
    # The throughput runs are the second half: their estimated time is kept free of memory rows.
    reserve = sum(c.est_s for c in speed_cases) + sum({c.shape: c.shape.prep_s for c in speed_cases}.values())
    memory = run_memory(memory_cases, tokenizer, work, precision, device, smoke, budget, reserve)
    speed = run_speed(speed_cases, tokenizer, work, precision, device, smoke, budget, rows)
    notes = [
        "Random weights of the real shapes (lorakit's bundled configs). layers `4/32 cut`: the model was cut "
        "to its first 4 of 32 decoder layers to fit the time (widths, vocabulary and LM head kept); the "
        "planner was asked about the same cut config.",
        "The SmolLM2 tokenizer (embedded) drives every shape; its ids fit every vocabulary.",
        "Throughput rows ran in one process, one after the other; train s is the Trainer's train_runtime "
        "(first steps included); peak MiB is max_memory_allocated() during the run.",
    ]
    if device.type == "cuda":
        notes.append(
            "Measured static memory (weights, LoRA, AdamW state, the batch) also holds the cuBLAS workspaces "
            "torch allocates through its allocator (tens of MiB)."
        )
        notes.append("SmolLM2-135M throughput rows train its real (embedded) weights, copied to bf16.")
    if smoke:
        notes.append(
            "CPU smoke: 2 layers of width 64 (vocabularies kept), fp32, one thread, short rows; the figures "
            "check the code paths, not a GPU."
        )
    report = {
        "device": label,
        "mode": "cpu-smoke" if smoke else "gpu",
        "budget_s": budget.seconds,
        "elapsed_s": budget.elapsed(),
        "speed_precision": precision,
        "versions": versions(),
        "memory": memory,
        "throughput": speed,
        "notes": notes,
    }
    json_path = Path(args.json) if args.json else out / "gpu_check.json"
    md_path = Path(args.markdown) if args.markdown else out / "gpu_check.md"
    json_path.write_text(json.dumps(report, indent=2))
    table = markdown(report)
    md_path.write_text(table)
    shutil.rmtree(work, ignore_errors=True)  # GBs of random weights
    print("\n" + table)
    print(f"wrote {json_path} and {md_path} in {budget.elapsed():.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
