"""Predicted (meta-device trace) vs measured peak memory of one LoRA training step.

On CPU the measurement is the same live-storage counter run on real tensors; on a GPU it is also
torch.cuda.max_memory_allocated() around the step. Also times `lorakit plan` for a 14B config.

    python benchmarks/plan_vs_measured.py            # CPU grid
    python benchmarks/plan_vs_measured.py --cuda     # GPU: adds max_memory_allocated
"""

import argparse
import time

import torch

from lorakit.core.config import PlanConfig, TrainConfig
from lorakit.models.loading import add_lora
from lorakit.planning.memory import GIB, make_plan
from lorakit.planning.trace import _truncate_layers, load_model_config, step_peak_bytes, traced_peak

GRID = [  # (bundled config, layers, batch, seq, gradient checkpointing, targets)
    ("SmolLM2-135M", 4, 2, 128, False, "qkvo"),
    ("SmolLM2-135M", 4, 4, 256, True, "all"),
    ("Qwen2.5-0.5B", 2, 2, 128, False, "all"),
    ("Qwen2.5-0.5B", 2, 1, 512, True, "qkvo"),
    ("Llama-3.2-1B", 2, 1, 256, False, "all"),
]
TARGETS = {
    "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda", action="store_true")
    args = ap.parse_args()
    device = "cuda" if args.cuda else "cpu"
    dtype = torch.bfloat16 if args.cuda else torch.float32
    print(f"device {device}, dtype {dtype}")
    print(
        f"{'config':<14} {'L':>2} {'BxT':>8} {'gc':>3} {'tgt':>4} {'predicted MiB':>14} {'counted MiB':>12} {'ratio':>6}"
        + (f" {'cuda max MiB':>13} {'ratio':>6}" if args.cuda else "")
    )
    from transformers import AutoModelForCausalLM

    for name, layers, b, t, gc, tg in GRID:
        config, _ = load_model_config(name)
        small = _truncate_layers(config, layers)
        small.use_cache = False
        cfg = TrainConfig(lora_r=16, target_modules=TARGETS[tg], lora_dropout=0.0, gradient_checkpointing=gc)
        predicted = traced_peak(small, cfg, dtype, b, t)
        torch.manual_seed(0)
        model = add_lora(cfg, AutoModelForCausalLM.from_config(small, dtype=dtype).to(device))
        counted = step_peak_bytes(model, b, t)
        line = (
            f"{name:<14} {layers:>2} {f'{b}x{t}':>8} {'y' if gc else 'n':>3} {tg:>4} {predicted / 2**20:>14.1f} "
            f"{counted / 2**20:>12.1f} {predicted / counted:>6.3f}"
        )
        if args.cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step_peak_bytes(model, b, t)
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated() - base
            line += f" {measured / 2**20:>13.1f} {predicted / measured:>6.3f}"
        print(line, flush=True)
        del model
    start = time.perf_counter()
    p = make_plan(
        PlanConfig(
            base_model="Qwen/Qwen2.5-14B-Instruct",
            lora_r=64,
            fp16=True,
            gradient_checkpointing=True,
            batch_size=2,
            gpu="rtx4070tisuper",
        )
    )
    print(
        f"lorakit plan, Qwen2.5-14B r=64 fp16: {p.total_bytes / GIB:.1f} GiB, planned in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
