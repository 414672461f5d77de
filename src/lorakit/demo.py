"""The main job on the embedded default: train on the demo data, score held-out rows before and after."""

from __future__ import annotations

import dataclasses
import time
from importlib import resources
from pathlib import Path

from .config import DemoConfig, ExportConfig, TrainConfig, read_yaml
from .data import demo_path, read_jsonl, row_to_messages
from .evaluate import score
from .generate import generate_batch, load_for_inference
from .io import atomic_write_json


def demo_settings() -> dict:
    return read_yaml(Path(str(resources.files("lorakit") / "assets" / "demo.yaml")), DemoConfig)


def demo(cfg: DemoConfig) -> Path:
    import torch

    from .train import cpu_supports_bf16, train

    if not (cfg.fp16 or cfg.bf16) and (
        torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_supports_bf16()
    ):
        cfg = dataclasses.replace(cfg, bf16=True)
    rows = read_jsonl(cfg.eval_dataset or demo_path("test"))[: cfg.max_eval_rows]
    conversations = [row_to_messages(r, w, cfg.system_prompt)[:-1] for w, r in rows]
    references = [r["output"] for _, r in rows]

    t0 = time.perf_counter()
    model, tokenizer, chat = load_for_inference(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    before = generate_batch(model, tokenizer, chat, conversations, cfg.max_new_tokens)
    del model
    t1 = time.perf_counter()
    out = train(TrainConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}))
    t2 = time.perf_counter()
    model, tokenizer, chat = load_for_inference(cfg.base_model, str(out), cfg.trust_remote_code)
    after = generate_batch(model, tokenizer, chat, conversations, cfg.max_new_tokens)
    t3 = time.perf_counter()

    s_before = score([g.text for g in before], references)
    s_after = score([g.text for g in after], references)
    report_table(conversations, references, before, after, s_before, s_after)
    result = {
        "held_out_rows": len(rows),
        "base": s_before,
        "tuned": s_after,
        "seconds": {
            "base_eval": round(t1 - t0, 1),
            "train": round(t2 - t1, 1),
            "tuned_eval": round(t3 - t2, 1),
        },
        "examples": [
            {"prompt": c[-1]["content"], "reference": ref, "base": b.text, "tuned": a.text}
            for c, ref, b, a in zip(conversations, references, before, after)
        ],
    }
    atomic_write_json(out / "demo.json", result)
    print(f"lorakit: timings {result['seconds']}; details in {out / 'demo.json'}")
    from .export import export_ollama

    # Where the tuned model goes next: a GGUF for llama.cpp and a Modelfile for Ollama.
    export_ollama(
        ExportConfig(
            adapter=str(out),
            output_dir=str(out / "export"),
            quant="q8_0",
            overwrite=True,
            ollama_name="smollm2-snes",
        )
    )
    return out


def report_table(conversations, references, before, after, s_before, s_after, shown: int = 8) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Held-out prompts: base model vs fine-tuned adapter")
    for col in ("input", "reference", "base answer", "tuned answer"):
        table.add_column(col, overflow="fold")
    for c, ref, b, a in list(zip(conversations, references, before, after))[:shown]:
        table.add_row(c[-1]["content"].split("\n\n")[-1], ref, _one_line(b.text), _one_line(a.text))
    console = Console()
    console.print(table)
    scores = Table(title=f"Scores on {len(references)} held-out rows")
    for col in ("metric", "base", "tuned", "change"):
        scores.add_column(col)
    for k in s_before:
        scores.add_row(k, f"{s_before[k]:.1%}", f"{s_after[k]:.1%}", f"{s_after[k] - s_before[k]:+.1%}")
    console.print(scores)


def _one_line(text: str, width: int = 48) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
