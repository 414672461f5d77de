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

import copy
import dataclasses
import json
import re
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from .config import PlanConfig, TrainConfig, narrow
from .errors import LorakitError

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
    import re

    return next((key for pattern, key in DEVICE_NAMES if re.search(pattern, device_name)), None)


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# --------------------------------------------------------------------------------------------
# Configs without weights


def bundled_configs() -> dict[str, Path]:
    folder = Path(str(resources.files("lorakit") / "assets" / "configs"))
    return {p.stem: p for p in sorted(folder.glob("*.json"))}


def _normalise(name: str) -> str:
    name = name.split("/")[-1].lower()
    name = re.sub(r"^meta-", "", name)
    return re.sub(r"-(instruct|it|chat)(?=-|$)", "", name)


def find_bundled(name: str) -> Path | None:
    key = _normalise(name)
    for stem, path in bundled_configs().items():
        if _normalise(stem) == key:
            return path
    return None


def load_model_config(base_model: str, trust_remote_code: bool = False):
    """(transformers config, where it came from) for a base model, without loading weights."""
    from transformers import AutoConfig

    if not base_model:
        base_model = "SmolLM2-135M"  # the embedded default's architecture
    p = Path(base_model).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code), str(p / "config.json")
    if base_model.lower().endswith(".gguf") and p.is_file():
        from .models import convert_gguf

        folder = convert_gguf(p)
        return AutoConfig.from_pretrained(folder), str(folder / "config.json")
    bundled = find_bundled(base_model)
    if bundled is not None:
        data = json.loads(bundled.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data), f"bundled {bundled.name}"
    try:
        return AutoConfig.from_pretrained(
            base_model, trust_remote_code=trust_remote_code
        ), f"hub {base_model}"
    except (OSError, ValueError) as e:
        names = ", ".join(bundled_configs())
        raise LorakitError(
            f"--base_model {base_model}: no local config.json, no bundled config and the hub is unreachable "
            f"({str(e).splitlines()[0][:120]}); bundled: {names}"
        ) from None


def _truncate_layers(config, layers: int):
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    for attr in ("layer_types",):
        if getattr(config, attr, None):
            setattr(config, attr, list(getattr(config, attr))[:layers])
    if getattr(config, "max_window_layers", None):
        config.max_window_layers = min(config.max_window_layers, layers)
    return config


def meta_peft_model(config, cfg: TrainConfig, dtype, layers: int | None = None):
    """The real model class with LoRA applied by PEFT, on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from .models import add_lora

    config = _truncate_layers(config, layers) if layers else copy.deepcopy(config)
    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain = dataclasses.replace(cfg, load_in_4bit=False, load_in_8bit=False)
    return add_lora(plain, model)


# --------------------------------------------------------------------------------------------
# Tracing one training step


def live_bytes_counter():
    """A TorchDispatchMode counting the bytes of live storages created under it; `.peak` is the max.

    An output that shares its storage with an input (a view, an in-place update, a weight's
    transpose) allocates nothing and is not counted. Hand-written because no library exposes
    this for meta tensors: torch.profiler and torch.cuda memory statistics need real allocations.
    """
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    def storages(tree):
        return [
            t.untyped_storage() for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)
        ]

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: dict[int, tuple] = {}
            self.current = 0
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {StorageWeakRef(st).cdata for st in storages((args, kwargs))}
            for st in storages(out):
                ref = StorageWeakRef(st)
                if ref.cdata in self.live or ref.cdata in inputs:
                    continue
                self.live[ref.cdata] = (ref, st.nbytes())
                self.current += st.nbytes()
            self.peak = max(self.peak, self.current)
            for key in [k for k, (r, _) in self.live.items() if r.expired()]:
                self.current -= self.live.pop(key)[1]
            return out

    return LiveBytes()


def _flash_like_sdpa():
    """On meta tensors, scaled_dot_product_attention has only the math path, which materialises
    the T x T attention matrix; GPUs (and this CPU) train with a fused kernel that keeps the
    output and a log-sum-exp row. This stand-in allocates what the fused kernel does."""
    import torch
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    class FlashLike(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, _, _ = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if q.device.type != "meta":
            return real(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        return FlashLike.apply(q, k, v)

    return real, sdpa


class _TracePatches:
    """Data-dependent checks in transformers' mask code (is the mask all ones? are the rows
    packed?) cannot run on meta tensors; a training batch grouped by length is treated as
    unpadded (the mask costs B x T x T bits when it is materialised, noise at this scale)."""

    def __enter__(self):
        import torch.nn.functional as F
        import transformers.masking_utils as mu

        self.saved = (
            mu._ignore_causal_mask_sdpa,
            mu.find_packed_sequence_indices,
            F.scaled_dot_product_attention,
        )
        mu._ignore_causal_mask_sdpa = lambda *a, **k: True
        mu.find_packed_sequence_indices = lambda *a, **k: None
        F.scaled_dot_product_attention = _flash_like_sdpa()[1]
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F
        import transformers.masking_utils as mu

        mu._ignore_causal_mask_sdpa, mu.find_packed_sequence_indices, F.scaled_dot_product_attention = (
            self.saved
        )


def step_peak_bytes(model, batch_size: int, seq_len: int) -> int:
    """Peak bytes allocated during one steady-state training step of `model` (meta or real).

    A first step runs uncounted so AdamW's moment buffers exist, as in every later step; the
    counted step then sees activations, logits and loss buffers, gradients and temporaries.
    """
    import torch

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)  # foreach: what the Trainer uses on GPU
    ids = torch.zeros((batch_size, seq_len), dtype=torch.long, device=device)
    model.train()

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with _TracePatches():
        step()
        counter = live_bytes_counter()
        with counter:
            step()
    return counter.peak


_CACHE: dict[tuple, object] = {}


def _cached(key: tuple, compute):
    """Memoise within a process: --fit and the GPU table evaluate many plans of one model."""
    if key not in _CACHE:
        _CACHE[key] = compute()
    return _CACHE[key]


def _lora_key(config, cfg: TrainConfig, dtype) -> tuple:
    return (
        config.to_json_string(),
        cfg.lora_r,
        tuple(cfg.target_modules),
        cfg.use_dora,
        tuple(cfg.modules_to_save),
        cfg.gradient_checkpointing,
        str(dtype),
    )


def traced_peak(config, cfg: TrainConfig, dtype, batch_size: int, seq_len: int) -> int:
    """Step peak for the full depth, from traces at 1 and 2 layers (exactly linear in depth)."""
    return _cached(
        ("trace", *_lora_key(config, cfg, dtype), batch_size, seq_len),
        lambda: _traced_peak(config, cfg, dtype, batch_size, seq_len),
    )


def _traced_peak(config, cfg: TrainConfig, dtype, batch_size: int, seq_len: int) -> int:
    layers = config.num_hidden_layers
    p1 = step_peak_bytes(meta_peft_model(config, cfg, dtype, 1), batch_size, seq_len)
    if layers == 1:
        return p1
    p2 = step_peak_bytes(meta_peft_model(config, cfg, dtype, 2), batch_size, seq_len)
    return p1 + (layers - 1) * (p2 - p1)


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
    m = re.fullmatch(r"\s*([0-9.]+)\s*(gib|gb|g|mib|mb|m)?\s*", text.lower())
    if not m:
        raise LorakitError(f"--gpu_memory {text!r}: write a size such as 16GB or 24GiB")
    value, unit = float(m.group(1)), m.group(2) or "gb"
    # GPU memory is sold in binary gigabytes ("16 GB" cards have 16 GiB): GB is read as GiB.
    return int(value * (GIB if unit.startswith("g") else 1024**2))


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
            from .data import ChatFormat, encode_data, row_lengths
            from .models import load_tokenizer, resolve_base_model

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
    from .models import torch_dtype

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


# --------------------------------------------------------------------------------------------
# --fit


def fit(cfg: PlanConfig) -> tuple[PlanConfig | None, Plan | None, list[tuple[str, Plan]]]:
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


def train_command(cfg: TrainConfig) -> str:
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
        chosen, result, tried = fit(cfg)
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
        console.print(train_command(narrow(chosen, TrainConfig)), soft_wrap=True)
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
    from .io import say

    try:
        plan_cfg = narrow(cfg, PlanConfig, gpu_memory=f"{gpu_bytes / GIB:.2f}GiB")
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
