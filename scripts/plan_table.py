"""Generates the README's memory table: the fastest setting that fits, from `lorakit plan --fit`.

Guide's recipe: LoRA on q/k/v/o/gate/up/down, effective batch 16 (4 x 4), 1024-token rows, bf16.
    python scripts/plan_table.py
"""

from lorakit.core.config import PlanConfig
from lorakit.planning.memory import GIB
from lorakit.planning.plan import fit_to_gpu

MODELS = [("7B", "Qwen2.5-7B"), ("14B", "Qwen2.5-14B"), ("32B", "Qwen2.5-32B")]
BUDGETS = ["16GB", "24GB", "48GB", "80GB"]


def cell(model: str, r: int, memory: str) -> str:
    cfg = PlanConfig(
        base_model=model,
        lora_r=r,
        lora_alpha=2 * r,
        bf16=True,
        batch_size=4,
        gradient_accumulation_steps=4,
        max_seq_length=1024,
        gpu_memory=memory,
    )
    chosen, plan, _ = fit_to_gpu(cfg)
    if chosen is None:
        return "does not fit"
    parts = ["4-bit" if chosen.load_in_4bit else "8-bit" if chosen.load_in_8bit else "bf16"]
    if chosen.gradient_checkpointing:
        parts.append("GC")
    parts.append(f"{chosen.batch_size}x{chosen.gradient_accumulation_steps}")
    if chosen.lora_r != r:
        parts.append(f"r={chosen.lora_r}")
    if chosen.max_seq_length != 1024:
        parts.append(f"len {chosen.max_seq_length}")
    return f"{', '.join(parts)}: {plan.total_bytes / GIB:.1f} GiB"


def main() -> None:
    print("| model | LoRA r | trainable | " + " | ".join(BUDGETS) + " |")
    print("|---|---|---|" + "---|" * len(BUDGETS))
    for size, model in MODELS:
        for r in (32, 64):
            cells = [cell(model, r, m) for m in BUDGETS]
            import torch

            from lorakit.core.config import TrainConfig
            from lorakit.planning.trace import load_model_config, meta_peft_model

            config, _ = load_model_config(model)
            trainable, _ = meta_peft_model(
                config, TrainConfig(lora_r=r), torch.bfloat16
            ).get_nb_trainable_parameters()
            print(
                f"| {size} ({model}) | {r} | {trainable / 1e6:.0f}M | " + " | ".join(cells) + " |", flush=True
            )


if __name__ == "__main__":
    main()
