"""Causal-LM loss without the full [tokens, vocab] logits.

The usual path computes logits for every position (B x T x V, upcast to fp32 in the loss): for a
150k vocabulary that is the largest tensor of the step, and on instruction data most positions
are prompt or padding whose loss is thrown away. Here the LM head runs only on the positions that
have a label, in chunks, each chunk recomputed in backward (activation checkpointing) when there
is more than one, so at most one chunk of logits is alive. The loss is the same number: the mean over supervised tokens.

Written by hand because the libraries that do this (Liger's fused linear cross-entropy, Apple's
cut-cross-entropy) are GPU kernels; on a GPU with liger-kernel installed, `--use_liger_kernel`
hands the whole loss to Liger instead.
"""

from __future__ import annotations

import functools

from ..core.labels import IGNORE_INDEX


def _lm_head(head):
    """The LM head as a function of hidden states. Under autocast, a frozen fp32 `nn.Linear` head
    (typically the tied embedding of a base loaded in fp32 on a CPU) is cast to the autocast dtype
    once and kept: autocast casts it again at every call otherwise, as it caches only weights that
    require grad (SmolLM2's 49152 x 576 head: ~47 ms per micro-batch on 2 CPU cores). The matmul
    sees the same values. Kept while the weight is unchanged (same storage and version)."""
    import torch

    weight = getattr(head, "weight", None)
    if (
        type(head) is not torch.nn.Linear  # a PEFT-wrapped head has its own forward
        or head.bias is not None
        or weight.requires_grad
        or weight.dtype != torch.float32
        or not torch.is_autocast_enabled(weight.device.type)
    ):
        return head
    half = torch.get_autocast_dtype(weight.device.type)
    key = (weight.data_ptr(), weight._version, half)
    cached = head.__dict__.get("_lorakit_autocast_weight")
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(half))
        head.__dict__["_lorakit_autocast_weight"] = cached
    return functools.partial(torch.nn.functional.linear, weight=cached[1])


def _chunk_nll(head, softcap, hidden, targets):
    import torch.nn.functional as F

    logits = head(hidden).float()
    if softcap:
        import torch

        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_lm_loss(
    hidden, labels, head, num_items: int | None = None, chunk_size: int = 1024, softcap: float | None = None
):
    """Mean next-token cross-entropy over supervised positions, from final hidden states.

    hidden: [B, T, H] (after the final norm); labels: [B, T] with -100 where not supervised (HF
    convention: position t predicts labels[t + 1]); head: the LM head module; num_items: the
    divisor (the Trainer passes the supervised-token count of the whole accumulated batch).
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]  # [N, H]: only positions whose next token is supervised
    y = targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    head = _lm_head(head)
    # One chunk: its logits are the most that is ever alive either way, so it is not recomputed.
    recompute = torch.is_grad_enabled() and h.shape[0] > chunk_size
    for start in range(0, h.shape[0], chunk_size):
        part_h, part_y = h[start : start + chunk_size], y[start : start + chunk_size]
        if recompute:
            total = total + checkpoint(_chunk_nll, head, softcap, part_h, part_y, use_reentrant=False)
        else:
            total = total + _chunk_nll(head, softcap, part_h, part_y)
    divisor = num_items if num_items is not None else max(int(y.numel()), 1)
    if isinstance(divisor, torch.Tensor):
        divisor = divisor.to(total.device)
    return total / divisor


def causal_lm_loss(model, inputs: dict, num_items=None, chunk_size: int = 1024):
    """Run the decoder, then the chunked loss. `model` is the (PEFT-wrapped) causal LM."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal.get_decoder() if hasattr(causal, "get_decoder") else causal.model
    head = causal.get_output_embeddings()
    mask = inputs.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        # Right padding only: under a causal mask a real token attends to earlier positions,
        # all real, so the padding mask changes nothing the loss reads. Without it attention
        # runs causal (SDPA skips the blocks above the diagonal) instead of dense with a mask.
        mask = None
    out = decoder(
        input_ids=inputs["input_ids"],
        attention_mask=mask,
        position_ids=inputs.get("position_ids"),
        use_cache=False,
    )
    softcap = getattr(causal.config, "final_logit_softcapping", None)
    return chunked_lm_loss(out.last_hidden_state, inputs["labels"], head, num_items, chunk_size, softcap)
