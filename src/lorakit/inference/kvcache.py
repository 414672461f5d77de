"""Keys and values: the batch's cache surgery (rows left-padded and joined, rows dropped), the
cache kept between requests (the prefix cache) and the linear layers packed for small decode batches.

A cache here is [(keys, values)] per layer, each [rows, kv_heads, columns, head_dim].
"""

from __future__ import annotations

import collections

from ..core.sequences import common_prefix


def dynamic_cache(layers: list | None = None):
    """A transformers DynamicCache holding `layers` (an empty one without)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers) if layers else DynamicCache()


def cache_layers(cache) -> list:
    """[(keys, values)] per layer of a DynamicCache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def slice_layers(layers: list, rows, columns) -> list:
    """The `rows` (a slice or an index tensor) and `columns` (a slice) of every layer."""
    return [(k[rows, :, columns], v[rows, :, columns]) for k, v in layers]


def left_pad_join(parts: list[tuple[list | None, int]], width: int) -> list:
    """Several caches stacked along the rows, each left-padded to `width` columns. A part is (its
    layers, how many columns they hold), or (None, 0) for one row with nothing cached (all padding)."""
    import torch
    import torch.nn.functional as F

    shape = next(kv for kv, _ in parts if kv is not None)
    layers = []
    for i, (k0, v0) in enumerate(shape):
        keys, values = [], []
        for kv, n in parts:
            if kv is None:
                keys.append(k0.new_zeros((1, k0.shape[1], width, k0.shape[-1])))
                values.append(v0.new_zeros((1, v0.shape[1], width, v0.shape[-1])))
            else:
                keys.append(F.pad(kv[i][0], (0, 0, width - n, 0)))
                values.append(F.pad(kv[i][1], (0, 0, width - n, 0)))
        layers.append((torch.cat(keys), torch.cat(values)))
    return layers


class BatchCache:
    """The running batch's keys and values: a DynamicCache whose rows are left-padded to one width,
    and its [rows, width] mask (1 = real token, 0 = padding) that hides the padding."""

    def __init__(self):
        self.cache = None  # None while the batch has no row
        self.mask = None

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def join(self, parts: list[tuple[list, int]], device) -> None:
        """Add rows after the batch's own: each part is a row's layers and its length."""
        import torch
        import torch.nn.functional as F

        width = self.width
        wide = max([width, *(n for _, n in parts)])
        old = [] if self.cache is None else [(cache_layers(self.cache), width)]
        masks = [] if self.mask is None else [F.pad(self.mask, (wide - width, 0))]
        masks += [F.pad(torch.ones((1, n), dtype=torch.long, device=device), (wide - n, 0)) for _, n in parts]
        self.cache, self.mask = dynamic_cache(left_pad_join(old + parts, wide)), torch.cat(masks)

    def grow(self) -> None:
        """One more real column in every row's mask: the token a decode step feeds in."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], 1)

    def select(self, keep: list[int]) -> None:
        """Keep the rows `keep` only; cut the columns that are padding in every row left."""
        import torch

        if not keep:
            self.clear()
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[index]
        first = int(mask.any(0).nonzero()[0])  # columns before it are padding in every row left
        columns = slice(first, None)
        self.cache = dynamic_cache(slice_layers(cache_layers(self.cache), index, columns))
        self.mask = mask[:, columns]

    def clear(self) -> None:
        self.cache = self.mask = None


class PrefixCache:
    """Keys and values of recent prompts, per adapter, least recently used first out.

    A key or value at position i depends only on tokens 0..i and the adapter (causal attention), so
    the first k positions of a cached prompt are exactly what a new prompt sharing its first k tokens
    would compute. Entries are [(keys, values)] per layer, each [1, kv_heads, tokens, head_dim].
    Written here because transformers keeps no cache across generate() calls and PEFT adapters
    change the keys, which prefix caches of serving stacks built on their own models don't key on.
    Adapters are fixed for the engine's life: an entry is never stale.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: collections.OrderedDict[tuple[str, tuple[int, ...]], list] = collections.OrderedDict()

    def _best(self, adapter: str, prompt: list[int]) -> tuple[tuple | None, int]:
        """The entry sharing the most leading tokens with `prompt`, and how many."""
        best, shared, ids = None, 0, tuple(prompt)  # keys hold tuples: compare tuple with tuple
        for key in self.entries:
            if key[0] == adapter:
                n = common_prefix(key[1], ids)
                if n > shared:
                    best, shared = key, n
        return best, shared

    def lookup(self, adapter: str, prompt: list[int]) -> tuple[list | None, int]:
        """(per-layer (keys, values) of the first n prompt tokens, n); n < len(prompt), so the last
        prompt token always runs and gives the logits of the first new token. (None, 0) on a miss."""
        key, shared = self._best(adapter, prompt)
        shared = min(shared, len(prompt) - 1)
        if key is None or shared <= 0:
            return None, 0
        self.entries.move_to_end(key)
        return [(k[:, :, :shared], v[:, :, :shared]) for k, v in self.entries[key]], shared

    def add(self, adapter: str, prompt: list[int], kv: list) -> None:
        """Keep a prompt's (keys, values) per layer, unless a kept prompt already starts with it."""
        if self._best(adapter, prompt)[1] == len(prompt):
            return
        size = sum(k.nbytes + v.nbytes for k, v in kv)
        if size > self.max_bytes:
            return
        self.entries[(adapter, tuple(prompt))] = [(k.clone(), v.clone()) for k, v in kv]
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= sum(k.nbytes + v.nbytes for k, v in old)


class PackedLinears:
    """The model's plain fp32 linear layers on CPU, their weights also kept in MKL's packed GEMM
    layout for `rows` input rows; decode steps of 2 to `rows` rows run on it, padded to `rows`.

    Why: for 2 or more rows MKL runs a GEMM that repacks the weight matrix on every call, one more
    pass over all the weights per decode step (0.5 GB for SmolLM2-135M in fp32), which one row's
    GEMV does not make. Packed once, an 8-row decode step took 98-100 ms instead of 113-115 ms
    (SmolLM2-135M with two LoRA adapters and the base mixed, 1 thread, AMD EPYC Zen 5, MKL 2024.2);
    resident memory grows by about 1.1x the packed weights. The packed GEMM gives the floats of MKL's
    own GEMM of `rows` rows, which for 4 or more rows are also those of every smaller GEMM (below 4
    rows MKL takes another path): padded to `rows`, a row gets the same floats in any batch of 2 or
    more. One-row steps, prefills and all calls outside the engine's steps (generate()) run the layers
    unchanged, so a request alone still gets generate()'s exact answer. LoRA's own small layers are
    left alone.
    """

    def __init__(self, model, rows: int, max_bytes: int):
        import torch

        self.rows, self.on, self.layers = rows, False, []
        mkl = getattr(torch.ops.mkl, "_mkl_linear", None) if torch.backends.mkl.is_available() else None
        if mkl is None or rows < 2:
            return
        layers = [
            m
            for name, m in model.named_modules()
            if type(m) is torch.nn.Linear
            and not any(part.startswith("lora_") for part in name.split("."))
            and m.weight.device.type == "cpu"
            and m.weight.dtype == torch.float32
        ]
        if not layers or sum(m.weight.nbytes for m in {id(m.weight): m for m in layers}.values()) > max_bytes:
            return
        if any("forward" in m.__dict__ for m in layers):
            return  # another engine (or something else) already replaced their forward
        for layer in layers:
            packed = torch.ops.mkl._mkl_reorder_linear_weight(layer.weight.detach().contiguous(), rows)
            layer.forward = self._forward_of(layer, packed)
            self.layers.append(layer)

    def _forward_of(self, layer, packed):
        import torch
        import torch.nn.functional as F

        def forward(x):
            if not self.on:
                return F.linear(x, layer.weight, layer.bias)  # what nn.Linear.forward does
            flat = x.reshape(-1, x.shape[-1])
            n = flat.shape[0]
            out = torch.ops.mkl._mkl_linear(
                F.pad(flat, (0, 0, 0, self.rows - n)), packed, layer.weight, layer.bias, self.rows
            )
            return out[:n].reshape(*x.shape[:-1], out.shape[-1])

        return forward

    def close(self) -> None:
        """Give the layers back their own forward (and free the packed weights)."""
        for layer in self.layers:
            del layer.forward
        self.layers = []
