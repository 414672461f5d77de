"""The memory plan of a run: weights, adapters, optimizer state, activations (traced), the GPU's
budget, and the speed estimate.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import NamedTuple

from ..core.config import PlanConfig, TrainConfig
from ..core.errors import LorakitError
from ..core.fields import memory_bytes
from .trace import _cached, _lora_key, load_model_config, meta_peft_model, traced_peak

GIB = 1024**3
# CUDA context, cuBLAS/cuDNN workspaces and kernels: memory a process holds outside what
# torch.cuda.max_memory_allocated() reports (0.4-0.8 GiB on recent GPUs and drivers).
CUDA_CONTEXT_BYTES = int(0.6 * GIB)
# The caching allocator reserves more than it hands out (fragmentation, rounding): ~5-15% in
# training loops; planned as 10% of the dynamic (traced) peak.
ALLOCATOR_SLACK = 0.10

# name: (label, memory GiB, dense bf16/fp16 tensor TFLOP/s with fp32 accumulation, vendor sheets)
GPUS: dict[str, tuple[str, float, float]] = {
    "t4": ("NVIDIA T4", 16, 65),
    "rtx3090": ("GeForce RTX 3090", 24, 71),
    "rtx4070tisuper": ("GeForce RTX 4070 Ti SUPER", 16, 88),
    "rtx4080": ("GeForce RTX 4080", 16, 97),
    "rtx4090": ("GeForce RTX 4090", 24, 165),
    "rtx5090": ("GeForce RTX 5090", 32, 209),
    "a10g": ("NVIDIA A10G", 24, 70),
    "l4": ("NVIDIA L4", 24, 121),
    "a6000": ("RTX A6000", 48, 155),
    "l40s": ("NVIDIA L40S", 48, 362),
    "a100-40": ("NVIDIA A100 40GB", 40, 312),
    "a100-80": ("NVIDIA A100 80GB", 80, 312),
    "h100-pcie": ("NVIDIA H100 PCIe", 80, 756),
    "h100": ("NVIDIA H100 80GB (SXM)", 80, 989),
    "h200": ("NVIDIA H200", 141, 989),
}
# torch.cuda.get_device_name() -> GPUS key, first match wins (e.g. "NVIDIA H100 80GB HBM3",
# "NVIDIA A100-SXM4-80GB", "Tesla T4", "NVIDIA GeForce RTX 4090").
DEVICE_NAMES = (
    (r"H200", "h200"),
    (r"H100.*PCIe", "h100-pcie"),
    (r"H100", "h100"),
    (r"A100.*40GB", "a100-40"),
    (r"A100", "a100-80"),
    (r"L40S", "l40s"),
    (r"A10G", "a10g"),
    (r"\bL4\b", "l4"),
    (r"A6000", "a6000"),
    (r"RTX 5090", "rtx5090"),
    (r"RTX 4090", "rtx4090"),
    (r"RTX 4080", "rtx4080"),
    (r"RTX 4070 Ti SUPER", "rtx4070tisuper"),
    (r"RTX 3090", "rtx3090"),
    (r"\bT4\b", "t4"),
)


def gpu_key(device_name: str) -> str | None:
    """The GPUS key of a CUDA device name, or None for a card not in the table."""

    return next((key for pattern, key in DEVICE_NAMES if re.search(pattern, device_name)), None)


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# --------------------------------------------------------------------------------------------
# Static memory


def weight_bytes(model, cfg: TrainConfig, dtype_bytes: int) -> tuple[int, int]:
    """(bytes of the frozen base weights, bytes of the largest de-quantized layer temporary).

    bitsandbytes quantizes every nn.Linear of the base but the output head; the other parameters
    (norms, biases) are then cast to fp32 by PEFT's prepare_model_for_kbit_training, which lorakit
    runs on every 4/8-bit base, and so are the embedding and LM head unless the run is in a half
    dtype (bf16/fp16), where lorakit keeps them in it (models.load_training_model).
      NF4: 0.5 byte/param + one absmax per 64-value block: fp32 (4 B), or with double
           quantization 1 B plus an fp32 per 256 blocks.
      int8 (LLM.int8): 1 byte/param + one fp32 scale per output row.
    """
    import torch

    quantized = cfg.load_in_4bit or cfg.load_in_8bit
    other_bytes = 4 if quantized else dtype_bytes
    half_embeddings = set()
    if quantized and cfg.precision != "fp32":
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                half_embeddings.add(id(module.weight))
    total = largest = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        if (
            "lora_" in name
            or not isinstance(module, torch.nn.Linear)
            or getattr(module, "weight", None) is None
        ):
            continue
        if name.endswith("lm_head") or "modules_to_save" in name or "original_module" in name:
            continue
        w = module.weight
        seen.add(id(w))
        n = w.numel()
        if cfg.load_in_4bit:
            consts = n / 64 + n / (64 * 256) * 4 if cfg.bnb_4bit_use_double_quant else n / 64 * 4
            total += int(n / 2 + consts)
            largest = max(largest, n * 2)
        elif cfg.load_in_8bit:
            total += n + w.shape[0] * 4
            largest = max(largest, n * 2)
        else:
            total += n * dtype_bytes
        if module.bias is not None:
            seen.add(id(module.bias))
            total += module.bias.numel() * other_bytes
    for p in model.parameters():
        if id(p) in seen or p.requires_grad:
            continue
        seen.add(id(p))
        total += p.numel() * (dtype_bytes if id(p) in half_embeddings else other_bytes)
    return total, largest


def linear_params(model) -> int:
    """Parameters of the base's linear layers (LM head included): 2 FLOPs each per token forward."""
    import torch

    return sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in n and "modules_to_save" not in n
    )


# --------------------------------------------------------------------------------------------
# The plan


@dataclass
class Memory:
    """Planned bytes per GPU, by what holds them."""

    base_weights: int
    lora_weights: int  # fp32
    optimizer_state: int  # AdamW m and v, fp32 (less for 8-bit and single-state optimizers)
    step_peak: int  # traced: activations, logits, gradients, temporaries
    gradients: int  # part of step_peak (fp32)
    logits: int  # part of step_peak: logits and loss buffers
    dequant_temporary: int = 0  # the largest de-quantized layer (4/8-bit bases)
    gathered_layer: int = 0  # one decoder layer gathered when weights are sharded
    allocator_slack: int = 0
    cuda_context: int = CUDA_CONTEXT_BYTES

    LABELS = {
        "base_weights": "base weights",
        "lora_weights": "LoRA weights (fp32)",
        "optimizer_state": "optimizer state (AdamW: m, v in fp32)",
        "step_peak": "step peak (traced): activations, logits, gradients, temporaries",
        "gradients": "  of which gradients (fp32)",
        "logits": "  of which logits and loss buffers",
        "dequant_temporary": "de-quantized layer temporary",
        "gathered_layer": "gathered layer (weights sharded)",
        "allocator_slack": "allocator slack (10% of the dynamic peak)",
        "cuda_context": "CUDA context and workspaces",
    }
    PARTS = ("gradients", "logits")  # included in step_peak
    OPTIONAL = ("dequant_temporary", "gathered_layer")  # shown only when non-zero

    @property
    def dynamic(self) -> int:
        return self.step_peak + self.dequant_temporary + self.gathered_layer

    @property
    def total(self) -> int:
        return sum(b for name, b in self.as_dict().items() if name not in self.PARTS)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def rows(self) -> list[tuple[str, int, bool]]:
        """(label, bytes, is a part of the row above) for display."""
        return [
            (self.LABELS[name], b, name in self.PARTS)
            for name, b in self.as_dict().items()
            if b or name not in self.OPTIONAL
        ]


@dataclass
class Plan:
    model: str
    config_source: str
    precision: str
    batch_size: int
    seq_len: int
    seq_len_source: str
    trainable: int
    total: int
    memory: Memory
    tokens_per_second: float = 0.0
    epoch_seconds: float | None = None
    gpu: str = ""
    budget_bytes: int | None = None
    rows_over_length: int | None = None  # --fit shortened max_seq_length: training rows now over it

    @property
    def total_bytes(self) -> int:
        return self.memory.total

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.total_bytes <= self.budget_bytes

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["total_bytes"] = self.total_bytes
        d["fits"] = self.fits
        return d


def optimizer_state_bytes(optim: str) -> float:
    """Optimizer state per trainable parameter: AdamW keeps two fp32 moments (8 bytes), its
    8-bit variants two 8-bit ones (~2 bytes with block scales), Lion and RMSprop one moment,
    SGD none (transformers' SGD has no momentum by default)."""
    if optim.startswith("sgd"):
        return 0
    if "8bit" in optim:
        return 2 if ("adamw" in optim or "ademamix" in optim) else 1
    if "lion" in optim or "rmsprop" in optim or "adagrad" in optim:
        return 4
    return 8


def _sharding(cfg: PlanConfig, memory: Memory, layers: int, dtype_bytes: int, base_params: int) -> Memory:
    """Per-GPU memory with --num_gpus N: ZeRO-2 shards gradients and optimizer state; ZeRO-3 and
    FSDP (full shard) also the weights, gathering one decoder layer at a time."""
    n = getattr(cfg, "num_gpus", 1)
    if n <= 1 or cfg.distributed == "ddp":
        return memory
    grads = memory.gradients
    memory = dataclasses.replace(
        memory,
        optimizer_state=memory.optimizer_state // n,
        step_peak=memory.step_peak - (grads - grads // n),
        gradients=grads // n,
    )
    if cfg.distributed in ("fsdp", "deepspeed_zero3"):
        memory = dataclasses.replace(
            memory,
            base_weights=memory.base_weights // n,
            lora_weights=memory.lora_weights // n,
            gathered_layer=base_params * dtype_bytes // max(layers, 1),
        )
    return memory


def parse_memory(text: str) -> int:
    size = memory_bytes(text)
    if size is None:
        raise LorakitError(f"--gpu_memory {text!r}: write a size such as 16GB or 24GiB")
    return size


def budget(cfg: PlanConfig) -> tuple[str, int | None, float | None]:
    """(gpu label, memory budget in bytes, peak TFLOP/s) from --gpu / --gpu_memory."""
    label, memory, tflops = "", None, None
    if cfg.gpu:
        key = cfg.gpu.lower().replace(" ", "").replace("_", "-")
        if key not in GPUS:
            import difflib

            close = difflib.get_close_matches(key, list(GPUS), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(GPUS)}"
            raise LorakitError(f"--gpu {cfg.gpu}: unknown GPU{hint} (or give --gpu_memory)")
        label, gib, tflops = GPUS[key]
        memory = int(gib * GIB)
    if cfg.gpu_memory:
        memory = parse_memory(cfg.gpu_memory)
        label = label or cfg.gpu_memory
    return label, memory, tflops


class Lengths(NamedTuple):
    """Row lengths a plan is made for: the peak (sets the activation memory), the mean (sets
    the time), the row count and where they came from; `every` holds each row's length when
    they came from a dataset."""

    peak: int
    mean: float
    rows: int | None
    source: str
    every: tuple[int, ...] = ()


def sequence_lengths(cfg: TrainConfig) -> Lengths:
    """From the dataset's token lengths when a dataset and a tokenizer are available, else
    max_seq_length."""
    if cfg.dataset:
        try:
            from ..data.encode import encode_data, row_lengths
            from ..data.template import ChatFormat
            from ..models.loading import load_tokenizer, resolve_base_model

            tokenizer = load_tokenizer(resolve_base_model(cfg.base_model), cfg.trust_remote_code)
            lengths = row_lengths(encode_data(None, ChatFormat(tokenizer), cfg).train)
            source = f"longest row of {cfg.dataset}"
            return Lengths(max(lengths), sum(lengths) / len(lengths), len(lengths), source, tuple(lengths))
        except LorakitError as e:
            if "cannot load its tokenizer" not in str(e):
                raise
    return Lengths(cfg.max_seq_length, float(cfg.max_seq_length), None, "max_seq_length (no dataset given)")


def make_plan(cfg: PlanConfig, config=None, source: str = "", lengths=None) -> Plan:

    if config is None:
        config, source = load_model_config(cfg.base_model, cfg.trust_remote_code)
    from ..models.loading import torch_dtype

    # Planned for a GPU: the frozen weights and activations in the training half dtype; a 4/8-bit
    # base computes in --bnb_4bit_compute_dtype (auto: bf16 unless fp16 was asked for).
    precision = cfg.precision
    if cfg.load_in_4bit or cfg.load_in_8bit:
        auto = "fp16" if cfg.fp16 else "bf16"
        precision = cfg.bnb_4bit_compute_dtype if cfg.bnb_4bit_compute_dtype != "auto" else auto
    dtype = torch_dtype(precision)
    peak_len, mean_len, rows, len_source = Lengths(*(lengths or sequence_lengths(cfg)))[:4]
    full = _cached(("model", *_lora_key(config, cfg, dtype)), lambda: meta_peft_model(config, cfg, dtype))
    trainable, total = full.get_nb_trainable_parameters()
    weights, dequant_temp = _cached(
        (
            "weights",
            *_lora_key(config, cfg, dtype),
            cfg.load_in_4bit,
            cfg.load_in_8bit,
            cfg.bnb_4bit_use_double_quant,
        ),
        lambda: weight_bytes(full, cfg, DTYPE_BYTES[precision]),
    )
    micro = cfg.micro_batch_rows(peak_len)
    step = traced_peak(config, cfg, dtype, micro, peak_len)
    grads = trainable * 4
    vocab = config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size
    logits = micro * peak_len * vocab * (DTYPE_BYTES[precision] + 4)  # + their fp32 upcast
    memory = Memory(
        base_weights=weights,
        lora_weights=trainable * 4,
        optimizer_state=int(trainable * optimizer_state_bytes(cfg.optim)),
        step_peak=step,
        gradients=grads,
        logits=min(logits, step),
        dequant_temporary=dequant_temp,
    )
    memory = _sharding(cfg, memory, config.num_hidden_layers, DTYPE_BYTES[precision], total - trainable)
    memory.allocator_slack = int(ALLOCATOR_SLACK * memory.dynamic)
    label, budget_bytes, tflops = budget(cfg)

    # Throughput: frozen base -> no weight gradients. Per token: forward 2N, backward 2N (input
    # gradients only), LoRA 6 x its parameters, causal attention 2 x L x T x H x d_head forward and
    # twice that backward; gradient checkpointing repeats the forward.
    n_linear = _cached(("linear", *_lora_key(config, cfg, dtype)), lambda: linear_params(full))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    attention = 2 * text.num_hidden_layers * mean_len * heads * head_dim
    flops = 4 * n_linear + 6 * trainable + 3 * attention
    if cfg.gradient_checkpointing:
        flops += 2 * n_linear + attention
    tps = (cfg.utilization * tflops * 1e12 / flops) if tflops else 0.0
    epoch = rows * mean_len / tps if (tps and rows) else None
    name = cfg.base_model or "SmolLM2-135M-Instruct (embedded)"
    return Plan(
        name,
        source,
        precision,
        micro,
        peak_len,
        len_source,
        trainable,
        total,
        memory,
        tps,
        epoch,
        label,
        budget_bytes,
    )
