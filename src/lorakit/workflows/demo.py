"""The main job on the embedded default: train on the demo data, evaluate base vs tuned, export."""

from __future__ import annotations

import dataclasses
import time
from importlib import resources
from pathlib import Path

from ..core.config import DemoConfig, EvalConfig, ExportConfig, TrainConfig
from ..core.fields import as_config, read_yaml
from ..core.files import say


def demo_settings() -> dict:
    return read_yaml(Path(str(resources.files("lorakit") / "assets" / "demo.yaml")), DemoConfig)


def demo(cfg: DemoConfig) -> Path:
    from ..export.targets import export_ollama
    from ..models.loading import hardware_supports_bf16
    from ..training.train import train
    from .evaluate import evaluate

    if not (cfg.fp16 or cfg.bf16) and hardware_supports_bf16():
        cfg = dataclasses.replace(cfg, bf16=True)
    t0 = time.perf_counter()
    out = train(as_config(cfg, TrainConfig))
    t1 = time.perf_counter()
    # Base vs tuned on held-out rows whose operands training never saw (greedy decoding).
    report = evaluate(
        EvalConfig(
            adapter=str(out),
            dataset=cfg.eval_dataset,
            max_rows=cfg.max_eval_rows,
            max_new_tokens=cfg.max_new_tokens,
            compare_base=True,
            output_dir=str(out / "eval"),
            base_model=cfg.base_model,
            system_prompt=cfg.system_prompt,
        )
    )
    t2 = time.perf_counter()
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
    t3 = time.perf_counter()
    base, tuned = report["base"], report["tuned"]
    say(
        f"lorakit: demo done: exact match {base['exact_match']:.1%} -> {tuned['exact_match']:.1%}, "
        f"token F1 {base['token_f1']:.1%} -> {tuned['token_f1']:.1%}, stop rate {base['stop_rate']:.0%} -> "
        f"{tuned['stop_rate']:.0%} (train {t1 - t0:.0f} s, eval {t2 - t1:.0f} s, export {t3 - t2:.0f} s)"
    )
    return out
