"""`lorakit merge`: fold a LoRA adapter into its base, de-quantized, and check the result.

The base is loaded in the training dtype without quantization (merging into a 4-bit base rounds
the update away), PEFT merges the adapter in place (`merge_and_unload`), so the peak is about one
model copy plus the small LoRA tensors; logits on probe prompts are compared before and after.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..core.config import MergeConfig
from ..core.errors import LorakitError
from ..core.files import atomic_write_json, say, staging_dir
from ..models.adapter import Adapter

PROBES = [
    "Assemble this 65816 instruction.\n\nLDA #$12",
    "Write a haiku about the number 42.",
    "def fibonacci(n):",
]
# fp32: merged and unmerged logits agree to arithmetic noise. Half precision rounds the merged
# weights W + BA to 8 (bf16) or 11 (fp16) bits, so single logits move visibly; there the check is
# that the greedy next token agrees almost everywhere.
FP32_LOGIT_TOLERANCE = 1e-3
HALF_TOP1_AGREEMENT = 0.97


def _copy_sentencepiece_model(base: str, out: Path) -> None:
    """transformers 5 saves tokenizer.json only; GGUF files of SentencePiece families (Gemma,
    Phi-3, Llama 2) carry the piece scores that only the base's tokenizer.model holds."""
    import shutil

    source = Path(base) / "tokenizer.model"
    if not source.is_file() and not Path(base).exists():  # a hub id: its cached snapshot, no download
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base, "tokenizer.model")
        source = Path(cached) if isinstance(cached, str) else source
    if source.is_file():
        shutil.copyfile(source, out / "tokenizer.model")


def merge(cfg: MergeConfig) -> Path:
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from ..data.template import ChatFormat
    from ..inference.generate import user_messages
    from ..models.loading import load_model, load_tokenizer, torch_dtype

    if not cfg.adapter:
        raise LorakitError("merge needs --adapter DIR (a directory written by `lorakit train`)")
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise LorakitError(f"{out} is not empty: pass --overwrite or choose another --output_dir")
    adapter = Adapter.open(cfg.adapter)
    trained = adapter.settings
    base = adapter.resolve_base(cfg.base_model)
    dtype_name = cfg.dtype if cfg.dtype != "auto" else adapter.weight_dtype
    tokenizer = load_tokenizer(base, trained.trust_remote_code, cfg.adapter)  # the training chat template
    chat = ChatFormat(tokenizer)
    model = load_model(base, dtype=torch_dtype(dtype_name), trust_remote_code=trained.trust_remote_code)
    model = PeftModel.from_pretrained(model, cfg.adapter).eval()  # never quantized: see the docstring
    probes = [chat.encode_prompt(user_messages(adapter.system_prompt, p)) for p in PROBES]
    with torch.no_grad():
        before = [model(torch.tensor([ids])).logits.float() for ids in probes]
    merged = model.merge_and_unload()
    leftover = [n for n, m in merged.named_modules() if isinstance(m, LoraLayer) or "lora_" in n]
    if leftover:
        raise LorakitError(
            f"merge left LoRA modules behind ({leftover[:3]}); this PEFT version cannot merge this adapter"
        )
    with torch.no_grad():
        after = [merged(torch.tensor([ids])).logits.float() for ids in probes]
    diff = max((a - b).abs().max().item() for a, b in zip(after, before))
    agree = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(after, before)) / sum(
        a.shape[1] for a in after
    )
    finite = all(torch.isfinite(a).all() for a in after) and all(
        torch.isfinite(p).all() for p in merged.parameters()
    )
    if not finite:
        raise LorakitError(
            "the merged model has NaN/inf weights or logits; the adapter or the chosen --dtype overflowed"
        )
    if dtype_name == "fp32" and diff > FP32_LOGIT_TOLERANCE:
        raise LorakitError(
            f"merged logits differ from base+adapter by {diff:.3g} (> {FP32_LOGIT_TOLERANCE}): not written"
        )
    if dtype_name != "fp32" and agree < HALF_TOP1_AGREEMENT:
        raise LorakitError(
            f"merged model's greedy tokens agree with base+adapter at only {agree:.1%} of positions: not written"
        )

    # The end-of-turn token stops generation in every runtime that reads generation_config.json.
    generation = merged.generation_config
    generation.eos_token_id = chat.stop_ids() if len(chat.stop_ids()) > 1 else chat.stop_ids()[0]
    generation.pad_token_id = tokenizer.pad_token_id
    merged.config.use_cache = True
    with staging_dir(out) as tmp:
        merged.save_pretrained(tmp, max_shard_size=cfg.max_shard_size)
        tokenizer.save_pretrained(tmp)
        _copy_sentencepiece_model(base.path, tmp)
        atomic_write_json(
            tmp / "lorakit-merge.json",
            {
                "adapter": str(Path(cfg.adapter).resolve()),
                "adapter_sha256": adapter.weights_sha256(),
                "base_model": base.name or "embedded SmolLM2-135M-Instruct",
                "dtype": dtype_name,
                "max_abs_logit_difference": diff,
                "top1_agreement": agree,
                "probes": len(PROBES),
                "system_prompt": adapter.system_prompt,
                "training_config": dataclasses.asdict(trained),
            },
        )
        if out.exists():  # --overwrite: replace the old directory as a whole
            import shutil

            shutil.rmtree(out)
    say(
        f"lorakit: merged into {out} ({dtype_name}); max |logit difference| vs base+adapter: {diff:.2e}, "
        f"greedy-token agreement {agree:.1%}",
        flush=True,
    )
    return out
