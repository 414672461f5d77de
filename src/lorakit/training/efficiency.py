"""How close a training run came to the hardware's limit.

Useful FLOPs are the arithmetic a LoRA step needs on the real (non-pad) tokens, whatever the
implementation spends besides (padding, recomputation under gradient checkpointing, logits of
positions without a label):

  per real token     4 x (frozen linear weights of the decoder layers)   forward + input gradients
                   + 6 x (LoRA weights)                                  forward + input + weight grads
  per row of L       6 x layers x attention width x L^2               QK^T and AV on the causal half,
                                                                         forward + backward
  per label          4 x vocabulary x hidden                           LM head, forward + input grads

Dense decoder-only models only (a mixture-of-experts layer is counted as if every expert ran).
The peak it is compared with: on a CPU a matrix multiply timed once per machine and cached
(`$LORAKIT_HOME/machine.json`); on a GPU the card's datasheet dense bf16/fp16 figure.

Written by hand: transformers' `floating_point_ops` is 6 x parameters x tokens (the full-training
figure, with a weight gradient for every frozen weight), and torch's FlopCounterMode counts what
runs, padding and recomputation included, which is what this figure must not count.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass

from ..core.labels import IGNORE_INDEX

MATMUL_SIZE = 2048  # a 2048^3 product: large enough to reach a CPU's steady rate, ~0.1 s each


@dataclass(frozen=True)
class Shape:
    """What the FLOP count needs of a model, read from its config."""

    layers: int
    hidden: int
    attention_width: int  # heads x head dim of the queries
    linear: int  # weights of the decoder layers' linear projections (no embedding, no LM head)
    vocab: int

    @classmethod
    def of(cls, config) -> Shape:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden, layers = config.hidden_size, config.num_hidden_layers
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        inter = config.intermediate_size
        attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2  # q, o, k, v
        mlp = 3 * hidden * inter  # gate, up, down (the families lorakit supports are gated)
        return cls(layers, hidden, heads * head_dim, layers * (attention + mlp), config.vocab_size)


def useful_flops(shape: Shape, lora_params: int, tokens: int, squared_lengths: int, labels: int) -> float:
    """Useful FLOPs of training on rows with `tokens` real tokens in all, the sum of their squared
    lengths and `labels` supervised positions (see the module docstring)."""
    per_token = 4 * shape.linear + 6 * lora_params
    attention = 6 * shape.layers * shape.attention_width * squared_lengths
    return float(per_token * tokens + attention + 4 * shape.vocab * shape.hidden * labels)


class Counter:
    """Totals of what the training steps processed; the trainer adds each micro-batch."""

    def __init__(self):
        self.tokens = self.squared = self.labels = 0
        self._pending: list = []  # device tensors, read at the end (no sync per step on a GPU)
        self.seconds = 0.0
        self._started: float | None = None

    def add(self, inputs: dict) -> None:
        import torch

        labels = inputs["labels"]
        if "attention_mask" in inputs and inputs["attention_mask"] is not None:
            lengths = inputs["attention_mask"].sum(dim=1)
        else:  # packed rows: a row starts where the position ids restart at 0
            positions = inputs["position_ids"].flatten()
            starts = torch.nonzero(positions == 0).flatten()
            ends = torch.cat([starts[1:], starts.new_tensor([positions.numel()])])
            lengths = ends - starts
        supervised = (labels[:, 1:] != IGNORE_INDEX).sum()
        self._pending.append(torch.stack([lengths.sum(), (lengths * lengths).sum(), supervised]).detach())

    def settle(self) -> None:
        if self._pending:
            import torch

            totals = torch.stack(self._pending).sum(dim=0).tolist()
            self.tokens += int(totals[0])
            self.squared += int(totals[1])
            self.labels += int(totals[2])
            self._pending.clear()

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None


def device_peak(precision: str) -> tuple[float | None, str]:
    """(FLOP/s, where the figure comes from) of the device training runs on, for its precision."""
    import torch

    if torch.cuda.is_available():
        from ..planning.memory import GPUS, gpu_key

        name = torch.cuda.get_device_name(0)
        key = gpu_key(name)
        if key is None:
            return None, f"no datasheet figure for {name}"
        label, _, tflops = GPUS[key]
        scale = 1.0 if precision in ("bf16", "fp16") else 0.5  # TF32 tensor cores: half the rate
        return tflops * 1e12 * scale, f"datasheet dense {'bf16/fp16' if scale == 1 else 'tf32'}, {label}"
    dtype = "bf16" if precision == "bf16" else "fp32"
    return cpu_matmul_peak()[dtype], f"measured {dtype} matmul, {torch.get_num_threads()} threads"


def cpu_matmul_peak() -> dict[str, float]:
    """FLOP/s of a 2048^3 fp32 and bf16 matrix multiply on this CPU with torch's thread count (best
    of 5), measured once per machine, thread count and torch version, then read from the cache."""
    import torch

    from ..core.files import atomic_write_json
    from ..models.loading import lorakit_home

    key = f"{_cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    path = lorakit_home() / "machine.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return cached[key]
    peaks = measure_matmul_peak()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**cached, key: peaks})
    return peaks


def measure_matmul_peak() -> dict[str, float]:
    """FLOP/s of a 2048^3 fp32 and bf16 matrix multiply here and now (best of 5)."""
    import torch

    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=dtype)
        b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        peaks[name] = 2 * MATMUL_SIZE**3 / best
    return peaks


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or f"cpu x{os.cpu_count()}"


def report(counter: Counter, shape: Shape, lora_params: int, precision: str) -> dict:
    """The run's efficiency record: useful FLOP/s and the fraction of the device's peak."""
    counter.settle()
    flops = useful_flops(shape, lora_params, counter.tokens, counter.squared, counter.labels)
    rate = flops / counter.seconds if counter.seconds > 0 else 0.0
    peak, source = device_peak(precision)
    return {
        "useful_flops": flops,
        "useful_flops_per_second": round(rate, 1),
        "peak_flops_per_second": round(peak, 1) if peak else None,
        "peak_source": source,
        "fraction_of_peak": round(rate / peak, 4) if peak else None,
    }
