"""lorakit's trainer vs the guide's recipe: real-token throughput, peak memory, held-out loss.

Same model (a ~28M-parameter Llama, random init, SmolLM2 tokenizer), same long-tailed data
(lengths ~30-1000 tokens), same rows trained once, same supervised tokens (assistant-only labels
from lorakit's encoder in both), same LoRA (r=64 on the seven projections, the guide's recipe).

  guide     transformers Trainer + PEFT, every row padded to max_seq_length (1024), default
            collator, model loss over full [tokens, vocab] logits, fp32
  lorakit   `lorakit train` defaults (rows padded to the longest of their batch, batches grouped
            by length, chunked loss on supervised positions only), then each option added alone

Each configuration runs in its own process (peak RSS is per process). Prints real (non-pad)
tokens/s and peak memory with ratios to the guide, held-out assistant loss after training, and
useful FLOP/s as a fraction of this machine's matrix-multiply peak (measured here).

    python benchmarks/speed.py               # ~5 minutes on 2 CPU cores
    python benchmarks/speed.py --rows 32     # quicker, noisier
On a GPU the same script runs on CUDA (peak memory then from torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "guide (as written: + grad. checkpointing)": {"gradient_checkpointing": True},
    "guide without grad. checkpointing": {},
    "lorakit: padding to longest only": {"group_by_length": False, "chunked_loss": False},
    "lorakit: + length grouping": {"chunked_loss": False},
    "lorakit: + chunked loss (defaults)": {},
    "lorakit: + bf16 autocast": {"bf16": True},
    "lorakit: + bf16, lora_dropout 0": {"bf16": True, "lora_dropout": 0.0},
    "lorakit: defaults + padding_free": {"padding_free": True},
}


def make_data(path: Path, rows: int, seed: int, scale: float = 1.0) -> None:
    """Instruction rows with long-tailed lengths: log-normal word counts, which give rows of median
    ~205 tokens, 72 to ~800 (like the instruction data this tool targets); `scale` multiplies the
    median word counts (gpu_check.py's CPU smoke uses short rows)."""
    rng = random.Random(seed)
    syllables = [
        "ka",
        "lo",
        "mi",
        "ne",
        "ru",
        "sa",
        "to",
        "vi",
        "zu",
        "pe",
        "do",
        "ga",
        "hi",
        "ju",
        "wo",
        "ye",
    ]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)})

    def text(n_words: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n_words))

    with open(path, "w") as f:
        for _ in range(rows):
            prompt = int(min(450 * scale, max(8, rng.lognormvariate(math.log(30 * scale), 0.9))))
            answer = int(min(450 * scale, max(4, rng.lognormvariate(math.log(20 * scale), 0.9))))
            f.write(json.dumps({"instruction": text(prompt), "output": text(answer)}) + "\n")


def make_model(path: Path, tokenizer_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def matmul_peak() -> dict[str, float]:
    """GFLOP/s of a 2048^3 matrix multiply, fp32 and bf16 (best of 5)."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b
        best = min(_timed(lambda a=a, b=b: a @ b) for _ in range(5))
        out[name] = 2 * 2048**3 / best / 1e9
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _start_probe():
    """A callback that records the process memory when training starts (model and data loaded)."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        at_start = 0

        def on_train_begin(self, args, state, control, **kw):
            Probe.at_start = rss_bytes()

    return Probe()


def guide_recipe(model_dir: str, train_file: str, out_dir: str) -> dict:
    """The guide's settings as TrainConfig fields: LoRA r=64 on the seven projections, batch 4 x 4."""
    return dict(
        base_model=model_dir,
        dataset=train_file,
        output_dir=out_dir,
        lora_r=64,
        lora_alpha=128,
        lora_dropout=0.05,
        target_modules=SEVEN,
        batch_size=4,
        gradient_accumulation_steps=4,
        learning_rate=1e-3,
        num_epochs=1,
        warmup_steps=0,
        max_seq_length=1024,
        system_prompt="",
        seed=0,
        logging_steps=1,
        save_steps=10_000,
        lr_scheduler_type="constant_with_warmup",
    )


def child(name: str, model_dir: str, train_file: str, test_file: str, out_dir: str) -> dict:
    """One configuration in this process; returns its measurements."""
    import torch

    from lorakit.config import EvalConfig, TrainConfig
    from lorakit.data import ChatFormat, DataReport, encode_samples, load_samples
    from lorakit.evaluate import row_losses
    from lorakit.models import load_tokenizer, resolve_base_model

    recipe = guide_recipe(model_dir, train_file, out_dir)
    tokenizer = load_tokenizer(resolve_base_model(model_dir))
    chat = ChatFormat(tokenizer)
    train_samples, _, _ = load_samples(TrainConfig(**recipe))
    examples = encode_samples(train_samples, chat, 1024, report=DataReport())
    real_tokens = sum(len(e["input_ids"]) for e in examples)
    probe = _start_probe()
    if name.startswith("guide"):
        model, seconds = _guide({**recipe, **CONFIGS[name]}, examples, tokenizer, probe)
    else:
        from lorakit.train import train

        cfg = TrainConfig(**{**recipe, **CONFIGS[name]})
        out = train(cfg, callbacks=[probe])
        summary = json.loads(Path(out, "metrics.jsonl").read_text().splitlines()[-1])
        seconds = summary["train_runtime_s"]
        from lorakit.generate import load_for_inference

        model = load_for_inference(model_dir, str(out))[0]
    peak = (
        torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )  # training only, before the evaluation
    model.eval()
    test_samples, _, _ = load_samples(EvalConfig(dataset=test_file, system_prompt=""))
    test_examples = encode_samples(test_samples, chat, 1024, report=DataReport())
    losses = row_losses(model, test_examples, tokenizer.pad_token_id, 4)
    held_out = sum(x for x, _ in losses) / sum(n for _, n in losses)
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in n
    )
    return {
        "name": name,
        "real_tokens": real_tokens,
        "seconds": seconds,
        "peak_bytes": peak,
        "training_bytes": peak if torch.cuda.is_available() else peak - type(probe).at_start,
        "held_out_loss": held_out,
        "trainable": trainable,
        "linear_params": linear,
        "rows": len(examples),
    }


def _guide(recipe: dict, examples: list[dict], tokenizer, probe):
    """The guide's script: PEFT + Trainer, rows padded to max_seq_length, the model's own loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    pad, length = tokenizer.pad_token_id, recipe["max_seq_length"]
    rows = [
        {
            "input_ids": e["input_ids"] + [pad] * (length - len(e["input_ids"])),
            "attention_mask": [1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"])),
            "labels": e["labels"] + [-100] * (length - len(e["labels"])),
        }
        for e in examples
    ]
    torch.manual_seed(recipe["seed"])
    model = AutoModelForCausalLM.from_pretrained(recipe["base_model"])
    model = get_peft_model(
        model,
        LoraConfig(
            r=recipe["lora_r"],
            lora_alpha=recipe["lora_alpha"],
            lora_dropout=recipe["lora_dropout"],
            target_modules=SEVEN,
            task_type="CAUSAL_LM",
        ),
    )
    args = TrainingArguments(
        output_dir=recipe["output_dir"],
        per_device_train_batch_size=recipe["batch_size"],
        gradient_accumulation_steps=recipe["gradient_accumulation_steps"],
        learning_rate=recipe["learning_rate"],
        num_train_epochs=1,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=recipe["seed"],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        bf16=recipe.get("bf16", False),
        gradient_checkpointing=recipe.get("gradient_checkpointing", False),
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, data_collator=default_data_collator, callbacks=[probe]
    )
    result = trainer.train()
    return model, result.metrics["train_runtime"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--rows", type=int, default=64, help="training rows (trained once, 16 per optimizer step)"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        d = Path(args.dir)
        out = d / "runs" / "".join(c if c.isalnum() else "-" for c in args.child)
        result = child(args.child, str(d / "model"), str(d / "train.jsonl"), str(d / "test.jsonl"), str(out))
        print("RESULT " + json.dumps(result), flush=True)
        return

    from lorakit.models import resolve_base_model

    d = Path(tempfile.mkdtemp(prefix="lorakit-speed-"))
    make_data(d / "train.jsonl", args.rows, seed=1)
    make_data(d / "test.jsonl", 24, seed=2)
    make_model(d / "model", resolve_base_model("").path)
    peak = matmul_peak()
    print(
        f"matrix-multiply peak on this machine: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s",
        flush=True,
    )
    results = []
    for name in CONFIGS:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name, "--dir", str(d)], capture_output=True, text=True
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(line[len("RESULT ") :])
        results.append(r)
        print(f"  done: {name} ({r['seconds']:.1f} s)", flush=True)
    guide = results[0]
    print(
        f"\n{args.rows} rows, {guide['real_tokens']} real tokens, LoRA r=64 on 7 projections ({guide['trainable']:,} trainable), "
        f"batch 4 x 4"
    )
    print(
        f"{'configuration':<38} {'real tok/s':>10} {'x guide':>8} {'train MiB':>9} {'x guide':>8} {'RSS MiB':>8} "
        f"{'held-out loss':>14} {'FLOP/s % peak':>14}"
    )
    for r in results:
        tps = r["real_tokens"] / r["seconds"]
        flops = (4 * r["linear_params"] + 6 * r["trainable"]) * tps
        ref = peak["bf16"] if "bf16" in r["name"] else peak["fp32"]
        print(
            f"{r['name']:<38} {tps:>10.0f} {tps / (guide['real_tokens'] / guide['seconds']):>8.2f} "
            f"{r['training_bytes'] / 2**20:>9.0f} {r['training_bytes'] / guide['training_bytes']:>8.2f} "
            f"{r['peak_bytes'] / 2**20:>8.0f} {r['held_out_loss']:>14.4f} {100 * flops / (ref * 1e9):>13.1f}%"
        )
    print(
        "train MiB: the process's peak memory during training minus its memory when training started (model and "
        "data loaded): activations, logits, gradients, optimizer state. RSS MiB: the whole process's peak."
    )


if __name__ == "__main__":
    main()
