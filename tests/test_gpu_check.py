"""benchmarks/gpu_check.py cannot rot: its --cpu-smoke mode runs the GPU mode's code paths (models of
the bundled shapes saved and loaded through lorakit, LoRA and 4-bit QLoRA, the planner, both
measured steps, lorakit train / the guide's recipe / TRL padding-free) on tiny shapes on CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_cpu_smoke_writes_every_row(tmp_path):
    out_json, out_md = tmp_path / "result.json", tmp_path / "table.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--cpu-smoke",
            "--out",
            str(tmp_path / "out"),
            "--json",
            str(out_json),
            "--markdown",
            str(out_md),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert report["mode"] == "cpu-smoke"

    memory = report["memory"]
    assert len(memory) == 4
    assert {r["method"] for r in memory} == {"LoRA", "QLoRA (NF4)"}
    assert {r["gradient_checkpointing"] for r in memory} == {True, False}
    for r in memory:
        assert r["status"] == "ok", r
        for key in (
            "predicted_mib",
            "measured_mib",
            "measured_lorakit_mib",
            "predicted_step_mib",
            "measured_step_mib",
            "predicted_static_mib",
            "measured_static_mib",
        ):
            assert positive(r[key]), (key, r)
        assert math.isfinite(r["error_pct"]) and math.isfinite(r["lorakit_error_pct"])
        assert r["cut"] and r["layers"] < r["layers_full"]  # cut configs are reported as cut
        # The planner and the counter see the same step: on CPU they agree to well under 1%.
        assert abs(r["error_pct"]) < 1, r

    speed = {r["recipe"]: r for r in report["throughput"]}
    assert set(speed) == {"lorakit", "guide", "trl"}
    trl_installed = importlib.util.find_spec("trl") is not None
    for name, r in speed.items():
        if name == "trl" and not trl_installed:
            assert "trl is not installed" in r["status"]
            continue
        assert r["status"] == "ok", r
        assert (
            positive(r["tokens_per_second"]) and positive(r["real_tokens"]) and positive(r["train_seconds"])
        )
    # lorakit encoded the data file itself and counted the same real tokens as the rows given to the
    # guide and TRL: every recipe trained the same rows.
    assert speed["lorakit"]["tokens_seen"] == speed["lorakit"]["real_tokens"]
    assert len({r["real_tokens"] for r in speed.values() if r["status"] == "ok"}) == 1

    table = out_md.read_text()
    assert "| model | layers | method |" in table and "| model | recipe |" in table
    assert table.count("\n| SmolLM2-135M |") >= 5
    assert "## Throughput" in proc.stdout  # the table is printed too
