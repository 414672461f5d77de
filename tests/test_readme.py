"""README claims under test: every fenced shell and Python block runs, and every default it states
is the code's.

Blocks run as written in a workspace holding the files they name (train.jsonl, test.jsonl,
sharegpt.jsonl, run.yaml), with the substitutions in SUBSTITUTIONS only: hub ids become tiny
random-weight models of the same family (no network here), and step budgets shrink. A block that
needs hardware or a network this machine does not have is listed in SKIPPED with the reason. A new
block that is in neither list fails the test, so the README cannot grow a command nobody ran.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lorakit.core.config import (
    ChatConfig,
    DataArgs,
    ExportConfig,
    GenerateConfig,
    PlanConfig,
    PromptArgs,
    ServeConfig,
    SynthArgs,
    TrainConfig,
)

from .conftest import write_jsonl

README = Path(__file__).resolve().parent.parent / "README.md"

# Blocks not run here, each by a phrase it contains, with the reason.
SKIPPED = {
    "make demo   #": "the set-up commands themselves: `make test` runs this test, `make demo` runs in CI's demo job",
    "make test          #": "development commands: the suite and linter run them",
    "--num_processes 4": "4 processes want 4 GPUs (test_distributed runs the same launch path with 2 CPU processes)",
    "--num_machines 2": "two machines on a network",
    "scripts/improve_demo.py": "minutes of SmolLM2 training; tests/workflows/test_improve.py runs the same loop on a tiny model",
}


def blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(bash|python)\n(.*?)```", README.read_text(), flags=re.S)


def commands(block: str) -> list[str]:
    """Shell lines of a block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line for line in (_strip_comment(x).strip() for x in joined.splitlines()) if line]


def _strip_comment(line: str) -> str:
    """The line without a shell comment: a # at a word start, outside quotes."""
    quote, escaped = "", False
    for i, c in enumerate(line):
        if escaped:
            escaped = False
        elif c == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama):
    from lorakit.data.sources import demo_path

    ws = tmp_path_factory.mktemp("readme")
    train_rows = [json.loads(x) for x in demo_path("train").read_text().splitlines()][:32]
    test_rows = [json.loads(x) for x in demo_path("test").read_text().splitlines()][:4]
    write_jsonl(ws / "train.jsonl", train_rows)
    write_jsonl(ws / "test.jsonl", test_rows)
    write_jsonl(
        ws / "sharegpt.jsonl",
        [
            {"conversations": [{"from": "human", "value": r["input"]}, {"from": "gpt", "value": r["output"]}]}
            for r in test_rows
        ],
    )
    (ws / "run.yaml").write_text(
        f"base_model: {tiny_llama}\ndataset: train.jsonl\nbatch_size: 4\ngradient_accumulation_steps: 1\n"
        "max_steps: 4\nlora_dropout: 0.0\nwarmup_steps: 0\nlogging_steps: 1\n"
    )
    return ws


@pytest.fixture(scope="module")
def substitutions(tiny_llama, tiny_qwen2):
    return {
        "Qwen/Qwen2.5-0.5B-Instruct": str(tiny_qwen2),  # a hub id: a tiny Qwen2 here
        "--budget_steps 200": "--budget_steps 8",  # 12 configurations x 200 steps: minutes, not seconds
        'TrainConfig(dataset="train.jsonl", output_dir="out/my-adapter"': (  # the embedded default: tiny here
            f'TrainConfig(base_model={str(tiny_llama)!r}, max_steps=4, dataset="train.jsonl", output_dir="out/api-adapter"'
        ),
    }


def run(command: str | list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A shell line (or an argv list) in the workspace, with lorakit on PATH; it must succeed."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        command,
        shell=isinstance(command, str),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=900,
    )
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def apply(text: str, subs: dict[str, str]) -> str:
    for old, new in subs.items():
        text = text.replace(old, new)
    return text


def test_every_block_is_run_or_skipped_with_a_reason():
    """Each block is one this test runs (below) or one in SKIPPED; never both, never neither."""
    runnable = [body for lang, body in blocks() if not any(key in body for key in SKIPPED)]
    assert len(runnable) >= 9
    for key in SKIPPED:
        assert sum(key in body for _, body in blocks()) == 1, f"SKIPPED key {key!r} matches no single block"


@pytest.mark.slow
def test_readme_blocks_run(workspace, substitutions, tiny_llama):
    port = free_port()
    subs = {**substitutions, "8000": str(port)}
    todo = [(lang, apply(body, subs)) for lang, body in blocks() if not any(key in body for key in SKIPPED)]
    server = None
    try:
        for lang, body in todo:
            if lang == "python":
                run([sys.executable, "-c", body], workspace)
                continue
            for line in commands(body):
                if line.startswith("lorakit train --config sweeps/first/best.yaml"):
                    assert (workspace / "sweeps/first/best.yaml").is_file()
                if line.startswith("lorakit serve"):  # on a free port instead of the default 8000
                    server = _start_server(f"{line} --port {port}", workspace)
                    continue
                if line.startswith("lorakit dashboard"):
                    dashboard_port = free_port()
                    _check_dashboard(f"{line} --port {dashboard_port}", dashboard_port, workspace)
                    continue
                if line.startswith("lorakit chat"):
                    out = run(line, workspace)  # stdin is closed: the REPL starts and exits
                    assert "lorakit chat" in out.stdout
                    continue
                run(line, workspace)
            if "lorakit data check" in body:
                assert (workspace / "lengths.png").is_file() and (workspace / "report.json").is_file()
            if "lorakit export all" in body:
                for name in ("merged", "Modelfile", "vllm.sh", "README.md", "model-q8_0.gguf"):
                    assert (workspace / "out/export" / name).exists(), name
        assert server is not None, "the serve block was not run"
        assert (workspace / "out/api-adapter/adapter_config.json").is_file()
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def _check_dashboard(line: str, port: int, cwd: Path) -> None:
    """The dashboard lists the adapter trained above as finished, then stops."""
    proc = _start_server(line, cwd, ready="dashboard of")
    try:
        url = proc.ready_line.split("open ", 1)[1].split()[0]
        assert url.startswith(f"http://127.0.0.1:{port}/?token=")
        token = url.split("token=", 1)[1]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/runs", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            runs = {run["id"]: run["status"] for run in json.loads(r.read())["runs"]}
        assert runs.get("my-adapter") == "finished", runs
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _start_server(line: str, cwd: Path, ready: str = "serving") -> subprocess.Popen:
    """The serve command in the background (its adapters must exist); returns once it listens."""
    if "out/other" in line and not (cwd / "out/other").exists():
        shutil.copytree(cwd / "out/my-adapter", cwd / "out/other")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        line,
        shell=True,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    end = time.time() + 300
    while time.time() < end:
        text = proc.stdout.readline()
        if ready in text:
            proc.ready_line = text  # the line it printed (the dashboard's holds its URL and token)
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"{line} exited: {proc.stdout.read()}")
    raise AssertionError(f"{line} did not start listening")


# ------------------------------------------------------------------------------------------------
# Defaults the README states, read from the code


def _readme_text() -> str:
    return " ".join(README.read_text().split())


def find(pattern: str) -> str:
    m = re.search(pattern, _readme_text())
    assert m, f"README no longer says: {pattern}"
    return m.group(1)


def test_defaults_stated_in_the_readme_are_the_codes():
    t = TrainConfig()
    assert int(find(r"Defaults follow the guide: r=(\d+)")) == t.lora_r
    assert float(find(r"Defaults follow the guide: r=\d+, alpha=(\d+)")) == t.lora_alpha
    assert float(find(r"alpha=\d+, dropout ([0-9.]+) on")) == t.lora_dropout
    assert find(r"dropout [0-9.]+ on ([\w/]+)") == "/".join(m.removesuffix("_proj") for m in t.target_modules)
    assert find(r"batch (\d+) x accumulation \d+") == str(t.batch_size)
    assert find(r"batch \d+ x accumulation (\d+)") == str(t.gradient_accumulation_steps)
    assert float(find(r"learning rate ([0-9.e-]+) \(")) == t.learning_rate
    assert find(r"learning rate [0-9.e-]+ \((\w+)\)") == t.lr_scheduler_type
    assert float(find(r"\), (\d+) epochs")) == t.num_epochs
    assert int(find(r"(\d+) warmup steps")) == t.warmup_steps
    assert float(find(r"weight decay ([0-9]+\.?[0-9]*)")) == t.weight_decay
    assert find(r"`--overlength (\w+)`, the default") == DataArgs().overlength
    assert "`--auto_batch_size`, on by default" in _readme_text() and t.auto_batch_size
    assert "`--system_prompt` (default: none" in _readme_text() and PromptArgs().system_prompt is None
    for cls in (GenerateConfig, ChatConfig):
        c = cls()
        assert float(find(r"Greedy by default \(`--temperature (\d+)`\)")) == c.temperature
        assert float(find(r"`--top_p` \(default ([0-9.]+)\)")) == c.top_p
        assert int(find(r"`--top_k` \(default (\d+)\)")) == c.top_k
    e = ExportConfig()
    assert float(find(r"the guide's `temperature ([0-9.]+)`")) == e.temperature
    assert float(find(r"`temperature [0-9.]+`, `top_p ([0-9.]+)`")) == e.top_p
    assert int(find(r"`top_p [0-9.]+`, `top_k (\d+)`")) == e.top_k
    assert "`FROM` the GGUF (default)" in _readme_text() and e.ollama_from == "gguf"
    assert float(find(r"at an assumed (\d+)% of the GPU's peak")) / 100 == PlanConfig().utilization
    from lorakit.planning.memory import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, GIB

    assert float(find(r"constants: ([0-9.]+) GiB for the CUDA context")) == round(CUDA_CONTEXT_BYTES / GIB, 2)
    assert float(find(r"and (\d+)% of the dynamic peak for allocator slack")) / 100 == ALLOCATOR_SLACK
    assert find(r"(\d+\.\d+\.\d+\.\d+) unless `--host` says otherwise") == ServeConfig().host
    v = ServeConfig()
    assert (
        float(find(r"the exported Modelfile has: `temperature ([0-9.]+)`")) == v.temperature == e.temperature
    )
    assert float(find(r"Modelfile has: `temperature [0-9.]+`, `top_p ([0-9.]+)`")) == v.top_p == e.top_p
    assert (
        int(find(r"Modelfile has: `temperature [0-9.]+`, `top_p [0-9.]+`, `top_k (\d+)`"))
        == v.top_k
        == e.top_k
    )
    synth = SynthArgs()
    assert float(find(r"`--near_duplicate` \(([0-9.]+)\)")) == synth.near_duplicate
    assert (
        int(find(r"`--max_teacher_tokens` \(default ([0-9,]+),").replace(",", "")) == synth.max_teacher_tokens
    )
    assert find(r"variable `--teacher_api_key_env` names \(default `(\w+)`\)") == synth.teacher_api_key_env
