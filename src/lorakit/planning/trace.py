"""Model configs without weights, and one training step traced on the meta device: its peak bytes."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from importlib import resources
from pathlib import Path

from ..core.config import TrainConfig
from ..core.errors import LorakitError

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
        from ..models.loading import convert_gguf

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

    from ..models.loading import add_lora

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
