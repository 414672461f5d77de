"""LoRA dropout that is cheap on a CPU.

PEFT puts an `nn.Dropout` in front of every LoRA A matrix. On a CPU its Bernoulli mask costs more
than the LoRA matmuls it guards: torch draws one 32-bit number per element with its Mersenne
twister, single-threaded (~3.8 ns per element on a Zen 4 core, against ~0.8 ns for bulk 64-bit
draws). With the guide's recipe (dropout 0.05 on seven projections, gradient checkpointing
drawing every mask twice) `aten::bernoulli_` was 17% of a training step on CPU.

This dropout draws 64 random bits at a time from torch's own generator and cuts them into four
16-bit uniforms, so a mask costs a quarter of the draws. An element is dropped with probability
k / 65536, k = round(p * 65536) (p = 0.05 becomes 0.0500031), and the kept ones are scaled by
65536 / (65536 - k), so the expectation is exact. The mask is kept as one byte per element for
the backward pass. Masks come from torch's default generator, so seeds reproduce them and
gradient checkpointing (which restores the RNG state before recomputing) redraws the same ones.

No library offers a CPU dropout with a cheaper generator; on CUDA (Philox, fused) and other
devices `torch.nn.functional.dropout` is used as it is.
"""

from __future__ import annotations

import torch

_LEVELS = 1 << 16
_LOW = -(1 << 63)


def _threshold(p: float) -> tuple[int, float]:
    """(signed 16-bit threshold under which an element is dropped, scale of the kept ones)."""
    k = min(_LEVELS - 1, max(1, round(p * _LEVELS)))
    return -(1 << 15) + k, _LEVELS / (_LEVELS - k)


def keep_mask(shape: torch.Size, p: float, device=None) -> tuple[torch.Tensor, float]:
    """A boolean mask of `shape` keeping each element with probability 1 - p (quantized to
    1/65536), and the scale for the kept elements."""
    n = 1
    for s in shape:
        n *= s
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(_LOW, (1 << 63) - 1)
    threshold, scale = _threshold(p)
    return words.view(torch.int16)[:n].view(shape) >= threshold, scale


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        keep, scale = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale, ctx.dtype = scale, x.dtype
        return _apply(x, keep, scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return _apply(grad, keep, ctx.scale).to(ctx.dtype), None


def _apply(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    # bool -> float conversion is a slow scalar loop on CPU, uint8 -> float a vectorized one
    # (0.24 vs 0.04 ms for 1.5M elements). The factor is fp32 (1/(1-p) is not a bf16 number):
    # a bf16 input gives an fp32 output, which the LoRA matmul's autocast rounds once.
    factor = keep.view(torch.uint8).to(torch.promote_types(x.dtype, torch.float32)).mul_(scale)
    return x * factor


class CPUDropout(torch.nn.Dropout):
    """`nn.Dropout` whose CPU masks are drawn four to a 64-bit random word (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return _MaskedScale.apply(x, self.p)


def use_cpu_dropout(model) -> int:
    """Replace the LoRA dropouts of a PEFT model (`lora_dropout` ModuleDicts) by CPUDropout;
    returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                dropouts[name] = CPUDropout(dropout.p)
                replaced += 1
    return replaced
