"""The real CLI in subprocesses on the embedded SmolLM2-135M-Instruct model."""

import json
import subprocess
import sys

import pytest

from .conftest import write_jsonl


def lorakit(*args):
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_train_then_generate_on_embedded_model(tmp_path):
    rows = [
        {
            "instruction": "Assemble this 65816 instruction.",
            "input": f"LDA #${v:02X}",
            "output": f"A9 {v:02X}",
        }
        for v in range(0, 256, 32)
    ]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "adapter"
    r = lorakit(
        "train",
        "--dataset",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--batch_size",
        "4",
        "--gradient_accumulation_steps",
        "1",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--warmup_steps",
        "0",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trainable params: " in r.stdout
    assert (out / "adapter_model.safetensors").is_file() and (out / "lorakit.yaml").is_file()
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["steps"] == 2 and summary["trainable_params"] > 0
    g = lorakit(
        "generate",
        "--adapter",
        str(out),
        "--max_new_tokens",
        "8",
        "Assemble this 65816 instruction.\n\nLDA #$10",
    )
    assert g.returncode == 0, g.stderr[-3000:]
    assert g.stdout.strip()
