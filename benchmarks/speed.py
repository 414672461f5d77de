"""lorakit's trainer vs the guide's recipe: real-token throughput, peak memory, held-out loss.

Same model (a ~28M-parameter Llama, random init, SmolLM2 tokenizer), same long-tailed data
(lengths ~30-1000 tokens), same rows trained once, same supervised tokens (assistant-only labels
from lorakit's encoder in both), same LoRA (r=64 on the seven projections, the guide's recipe).

  guide     transformers Trainer + PEFT, every row padded to max_seq_length (1024), default
            collator, model loss over full [tokens, vocab] logits, fp32
  lorakit   `lorakit train` defaults (rows padded to the longest of their micro-batch, steps grouped
            by length and cut into micro-batches by padded size, chunked loss on supervised
            positions only), then each option added alone

Each configuration runs in its own process (peak RSS is per process). Prints real (non-pad)
tokens/s of the training loop and peak memory with ratios to the guide, the whole process's time
to the end of training (Python start, imports, data, model load included) with its ratio, held-out
assistant loss after training, and useful FLOP/s (lorakit.efficiency's count) as a fraction of
this machine's matrix-multiply peak, measured at the start of the same run.

A second part trains the embedded SmolLM2-135M-Instruct (bf16 autocast, LoRA r=16 on the seven
projections, batch 4 x 4, two epochs of the demo data): the settings before token budgets and the
CPU attention choice, today's defaults, and today's defaults with --max_tokens_per_batch; the
held-out loss is on the demo's 40 test rows.

    python benchmarks/speed.py                   # both parts, ~10 minutes on 2 CPU cores
    python benchmarks/speed.py --part guide      # the ~28M Llama vs the guide's recipe
    python benchmarks/speed.py --part smollm2    # the SmolLM2 line
    python benchmarks/speed.py --rows 32         # quicker, noisier
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
    "lorakit with the guide's exact flags": {"gradient_checkpointing": True},
    "guide without grad. checkpointing": {},
    "lorakit: padding to longest only": {"group_by_length": False, "chunked_loss": False},
    "lorakit: + length grouping": {"chunked_loss": False},
    "lorakit: + chunked loss": {"regroup_micro_batches": False},
    "lorakit: + regrouped micro-batches (defaults)": {},
    "lorakit: + bf16 autocast": {"bf16": True},
    "lorakit: + bf16, lora_dropout 0": {"bf16": True, "lora_dropout": 0.0},
    "lorakit: defaults + padding_free": {"padding_free": True},
}
# SmolLM2 on the demo data with the demo's settings (bf16, LoRA r=16, no LoRA dropout, lr 1e-3),
# but batch 4 x 4 (16 rows per optimizer step) so micro-batches can be cut two ways.
SMOL_RECIPE = dict(
    lora_dropout=0.0,
    lora_r=16,
    lora_alpha=32,
    batch_size=4,
    gradient_accumulation_steps=4,
    learning_rate=1e-3,
    num_epochs=2,
    warmup_steps=2,
    bf16=True,
    seed=0,
    logging_steps=1,
    save_steps=10_000,
    max_seq_length=256,
)
SMOL_CONFIGS = {
    "SmolLM2: before (SDPA, row micro-batches)": {
        "attn_implementation": "sdpa",
        "regroup_micro_batches": False,
    },
    "SmolLM2: defaults (eager attention, regrouped rows)": {},
    "SmolLM2: SDPA + max_tokens_per_batch 4096": {
        "attn_implementation": "sdpa",
        "max_tokens_per_batch": 4096,
    },
    "SmolLM2: defaults + max_tokens_per_batch 4096": {"max_tokens_per_batch": 4096},
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


def child(name: str, model_dir: str, train_file: str, test_file: str, out_dir: str, t0: float) -> dict:
    """One configuration in this process; returns its measurements. `t0`: when the parent started
    this process (the whole-process time runs from there to the end of training)."""
    import torch

    from lorakit.core.config import EvalConfig, TrainConfig
    from lorakit.data.encode import encode_samples, load_samples
    from lorakit.data.formats import DataReport
    from lorakit.data.template import ChatFormat
    from lorakit.models.loading import load_tokenizer, resolve_base_model
    from lorakit.workflows.evaluate import row_losses

    recipe = guide_recipe(model_dir, train_file, out_dir)
    probe = _start_probe()
    flops = None
    if name.startswith("guide"):
        tokenizer = load_tokenizer(resolve_base_model(model_dir))
        train_samples, _, _ = load_samples(TrainConfig(**recipe))
        examples = encode_samples(train_samples, ChatFormat(tokenizer), 1024, report=DataReport())
        real_tokens = sum(len(e["input_ids"]) for e in examples)
        model, seconds = _guide({**recipe, **CONFIGS[name]}, examples, tokenizer, probe)
        process_seconds = time.time() - t0
    else:
        from lorakit.training.train import train

        cfg = TrainConfig(**{**recipe, **CONFIGS[name]})
        out = train(cfg, callbacks=[probe])
        process_seconds = time.time() - t0
        summary = json.loads(Path(out, "metrics.jsonl").read_text().splitlines()[-1])
        seconds, real_tokens, flops = (
            summary["train_runtime_s"],
            summary["tokens_seen"],
            summary["useful_flops"],
        )
        from lorakit.inference.generate import load_for_inference

        model = load_for_inference(model_dir, str(out))[0]
        tokenizer = load_tokenizer(resolve_base_model(model_dir))
    peak = (
        torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )  # training only, before the evaluation
    model.eval()
    test_samples, _, _ = load_samples(EvalConfig(dataset=test_file, system_prompt=""))
    test_examples = encode_samples(test_samples, ChatFormat(tokenizer), 1024, report=DataReport())
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
        "process_seconds": process_seconds,
        "useful_flops": flops,
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


def smol_child(name: str, out_dir: str, t0: float) -> dict:
    """One SmolLM2 configuration in this process."""
    from importlib import resources

    from lorakit.core.config import EvalConfig, TrainConfig
    from lorakit.data.encode import encode_samples, load_samples
    from lorakit.data.formats import DataReport
    from lorakit.inference.generate import load_for_inference
    from lorakit.training.train import train
    from lorakit.workflows.demo import demo_settings
    from lorakit.workflows.evaluate import row_losses

    assets = resources.files("lorakit") / "assets"
    system = demo_settings()["system_prompt"]
    cfg = TrainConfig(
        dataset=str(assets / "demo_train.jsonl"),
        output_dir=out_dir,
        system_prompt=system,
        report_to=["none"],
        **{**SMOL_RECIPE, **SMOL_CONFIGS[name]},
    )
    out = train(cfg)
    process_seconds = time.time() - t0
    summary = json.loads(Path(out, "metrics.jsonl").read_text().splitlines()[-1])
    model, tokenizer, chat = load_for_inference("", str(out))
    model.eval()
    test, _, _ = load_samples(EvalConfig(dataset=str(assets / "demo_test.jsonl"), system_prompt=system))
    losses = row_losses(
        model, encode_samples(test, chat, 256, report=DataReport()), tokenizer.pad_token_id, 8
    )
    return {
        "name": name,
        "real_tokens": summary["tokens_seen"],
        "seconds": summary["train_runtime_s"],
        "useful_flops": summary["useful_flops"],
        "process_seconds": process_seconds,
        "held_out_loss": sum(x for x, _ in losses) / sum(n for _, n in losses),
    }


def run_children(names, d: Path, part: str) -> list[dict]:
    results = []
    for name in names:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                name,
                "--dir",
                str(d),
                "--part",
                part,
                "--t0",
                repr(time.time()),
            ],
            capture_output=True,
            text=True,
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(line[len("RESULT ") :])
        results.append(r)
        print(
            f"  done: {name} ({r['seconds']:.1f} s training, {r['process_seconds']:.1f} s process)",
            flush=True,
        )
    return results


def guide_part(rows: int, peak: dict) -> None:
    from lorakit.models.loading import resolve_base_model

    d = Path(tempfile.mkdtemp(prefix="lorakit-speed-"))
    make_data(d / "train.jsonl", rows, seed=1)
    make_data(d / "test.jsonl", 24, seed=2)
    make_model(d / "model", resolve_base_model("").path)
    results = run_children(CONFIGS, d, "guide")
    guide = results[0]
    # Every configuration trains the same rows: one useful-FLOPs count (lorakit's) serves all.
    flops = next(r["useful_flops"] for r in results if r["useful_flops"])
    print(
        f"\n{rows} rows, {guide['real_tokens']} real tokens, LoRA r=64 on 7 projections ({guide['trainable']:,} trainable), "
        f"batch 4 x 4, lora_dropout 0.05"
    )
    print(
        f"{'configuration':<40} {'real tok/s':>10} {'x guide':>8} {'process s':>9} {'x guide':>8} {'train MiB':>9} "
        f"{'x guide':>8} {'RSS MiB':>8} {'held-out loss':>14} {'FLOP/s % peak':>14}"
    )
    for r in results:
        tps = r["real_tokens"] / r["seconds"]
        ref = peak["bf16"] if "bf16" in r["name"] else peak["fp32"]
        print(
            f"{r['name']:<40} {tps:>10.0f} {tps / (guide['real_tokens'] / guide['seconds']):>8.2f} "
            f"{r['process_seconds']:>9.1f} {guide['process_seconds'] / r['process_seconds']:>8.2f} "
            f"{r['training_bytes'] / 2**20:>9.0f} {r['training_bytes'] / guide['training_bytes']:>8.2f} "
            f"{r['peak_bytes'] / 2**20:>8.0f} {r['held_out_loss']:>14.4f} {100 * flops / r['seconds'] / ref:>13.1f}%"
        )
    print(
        "process s: from the process's start to the end of training (imports, data, model load included); its "
        "x guide is the guide's process time over this one's. train MiB: the process's peak memory during training "
        "minus its memory when training started (model and data loaded): activations, logits, gradients, "
        "optimizer state. RSS MiB: the whole process's peak."
    )


def smol_part(peak: dict) -> None:
    d = Path(tempfile.mkdtemp(prefix="lorakit-speed-smol-"))
    results = run_children(SMOL_CONFIGS, d, "smollm2")
    before = results[0]
    print(
        f"\nSmolLM2-135M-Instruct, demo data (192 rows x {SMOL_RECIPE['num_epochs']} epochs, "
        f"{before['real_tokens']} real tokens), bf16 autocast, LoRA r=16 on 7 projections, batch 4 x 4"
    )
    print(
        f"{'configuration':<46} {'real tok/s':>10} {'x before':>8} {'useful GFLOP/s':>14} {'% bf16 peak':>11} "
        f"{'held-out loss':>13} {'vs before':>9}"
    )
    for r in results:
        rate = r["useful_flops"] / r["seconds"]
        print(
            f"{r['name']:<46} {r['real_tokens'] / r['seconds']:>10.0f} "
            f"{before['seconds'] / r['seconds']:>8.2f} {rate / 1e9:>14.1f} {100 * rate / peak['bf16']:>10.1f}% "
            f"{r['held_out_loss']:>13.4f} {100 * (r['held_out_loss'] / before['held_out_loss'] - 1):>+8.1f}%"
        )
    print(
        "% bf16 peak: useful FLOP/s of the training loop over the bf16 matrix-multiply peak measured above."
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--rows", type=int, default=64, help="training rows (trained once, 16 per optimizer step)"
    )
    ap.add_argument("--part", choices=("all", "guide", "smollm2"), default="all")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        d = Path(args.dir)
        out = str(d / "runs" / "".join(c if c.isalnum() else "-" for c in args.child))
        if args.part == "smollm2":
            result = smol_child(args.child, out, args.t0)
        else:
            result = child(
                args.child, str(d / "model"), str(d / "train.jsonl"), str(d / "test.jsonl"), out, args.t0
            )
        print("RESULT " + json.dumps(result), flush=True)
        return

    from lorakit.training.efficiency import measure_matmul_peak

    peak = measure_matmul_peak()  # measured in this run, not the per-machine cache
    print(
        f"matrix-multiply peak on this machine: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s",
        flush=True,
    )
    if args.part in ("all", "guide"):
        guide_part(args.rows, peak)
    if args.part in ("all", "smollm2"):
        smol_part(peak)


if __name__ == "__main__":
    main()
