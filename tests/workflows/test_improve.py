"""`lorakit synth` and `lorakit improve` against a real local HTTP teacher: the scripted
OpenAI-compatible server of scripts/demo_teacher.py (correct demo rows, or a protocol fault)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.core.config import SynthConfig
from lorakit.data.sources import demo_path
from lorakit.workflows.synth import group_failures, pattern, read_failures, run_synth
from lorakit.workflows.teacher import parse_samples

from ..conftest import tiny_train_config, write_jsonl

SCRIPTS = Path(__file__).resolve().parent.parent.parent / "scripts"
VERIFY = f"{sys.executable} {SCRIPTS / 'verify_demo_sample.py'}"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPTS))
    spec.loader.exec_module(module)
    return module


demo_teacher = _load_script("demo_teacher")


def demo_rows(split: str) -> list[dict]:
    return [json.loads(x) for x in demo_path(split).read_text().splitlines()]


def failures_file(path: Path, rows: list[dict]) -> Path:
    """A failures.jsonl as `lorakit eval` writes it, every answer wrong."""
    return write_jsonl(
        path,
        [
            {
                "messages": [
                    {"role": "system", "content": "You are an expert SNES developer."},
                    {"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"},
                    {"role": "assistant", "content": r["output"]},
                ],
                "generation": "00 00",
                "why": "low score",
                "source": f"demo_test.jsonl:{i + 1}",
                "stopped": True,
            }
            for i, r in enumerate(rows)
        ],
    )


@pytest.fixture
def teacher():
    """Start a scripted teacher: teacher(faults=[...]) -> (url, state)."""
    servers = []

    def start(**kwargs):
        server, state = demo_teacher.start(**kwargs)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", state

    yield start
    for s in servers:
        s.shutdown()


def synth_cfg(tmp_path: Path, url: str, **kw) -> SynthConfig:
    settings = dict(
        failures=str(failures_file(tmp_path / "failures.jsonl", demo_rows("test")[:12])),
        eval_dataset=str(demo_path("test")),
        dataset=str(demo_path("train")),
        teacher_url=url,
        teacher_model=demo_teacher.MODEL,
        teacher_backoff=0.0,
        teacher_timeout=5.0,
        verify=VERIFY,
        output_dir=str(tmp_path / "synth"),
        max_groups=4,
        samples_per_group=6,
    )
    settings.update(kw)
    return SynthConfig(**settings)


# ------------------------------------------------------------------------------------------------
# Pieces


def test_patterns_group_rows_asking_the_same_kind_of_thing():
    assert pattern("Assemble this.\n\nSTA $85") == pattern("Encode it.\n\nSTA $1F") == "STA $N"
    assert pattern("Encode it.\n\nLDA #$85") == "LDA #$N"
    assert pattern('What is 12 + 30.5 in "base ten"?') == 'What is N + N in "S"?'


def test_teacher_answers_are_read_leniently():
    rows = [{"instruction": "a", "input": "b", "output": "c"}] * 2
    text = json.dumps(rows)
    assert parse_samples(text) == (rows, None)
    assert parse_samples(f"Here you go:\n```json\n{text}\n```") == (rows, None)
    assert parse_samples(json.dumps({"samples": rows})) == (rows, None)
    assert parse_samples("\n".join(json.dumps(r) for r in rows)) == (rows, None)
    assert parse_samples(text[: len(text) - 5]) == (rows[:1], "partial")
    assert parse_samples("I'm sorry, but I can't help with that.") == ([], "refusal")
    assert parse_samples("LDA is a load.") == ([], "malformed")
    assert parse_samples("  ") == ([], "empty")


def test_failures_answered_right_are_not_taught(tmp_path):
    path = failures_file(tmp_path / "f.jsonl", demo_rows("test")[:3])
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[0]["generation"] = lines[0]["messages"][-1]["content"]  # listed for its loss only
    write_jsonl(path, lines)
    failures = read_failures(path)
    assert len(failures) == 2
    groups = group_failures(failures, 16)
    assert sum(len(g.rows) for g in groups) == 2 and all(g.id.startswith("g") for g in groups)


# ------------------------------------------------------------------------------------------------
# synth against the scripted teacher


def _jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact character n-gram Jaccard, written independently of lorakit's MinHash estimate."""
    ga = {a[i : i + n] for i in range(max(len(a) - n + 1, 1))}
    gb = {b[i : i + n] for i in range(max(len(b) - n + 1, 1))}
    return len(ga & gb) / len(ga | gb)


def test_kept_rows_are_checked_and_never_near_held_out_rows(tmp_path, teacher):
    url, state = teacher()  # it copies one shown (held-out) row into every answer
    result = run_synth(synth_cfg(tmp_path, url))
    out = result.output_dir
    kept = [json.loads(x) for x in (out / "synth.jsonl").read_text().splitlines()]
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(state.requests) == 4 and kept
    # Each copied held-out row was caught, by the held-out check.
    assert sum(r["reason"] == "duplicate_eval" for r in rejected) >= 4
    held_out = demo_rows("test")
    for row in kept:
        assert demo_teacher.demo_rows([row["input"]], 1, __import__("random").Random(0))
        for h in held_out:
            # The question differs, and so does what the row teaches (instruction templates aside).
            assert " ".join(row["input"].lower().split()) != " ".join(h["input"].lower().split())
            assert (
                _jaccard(f"{row['input']}\n{row['output']}".lower(), f"{h['input']}\n{h['output']}".lower())
                < 0.8
            )
    report = json.loads((out / "synth_report.json").read_text())
    assert report["kept"] == len(kept) and report["teacher_tokens"] > 0
    assert {g["status"] for g in report["groups"]} == {"answered"}
    md = (out / "synth_report.md").read_text()
    assert "| group | failing rows | asked | received | kept | rejected |" in md


def test_a_paraphrased_held_out_row_is_a_duplicate(tmp_path):
    from lorakit.workflows.synth import build_reference

    cfg = SynthConfig(
        failures="-", eval_dataset=str(demo_path("test")), dataset=str(demo_path("train")), near_duplicate=0.8
    )
    index, _ = build_reference(cfg, [])
    h = demo_rows("test")[0]
    other = next(i for i in demo_teacher.INSTRUCTIONS if i != h["instruction"])
    assert index.match(f"{other}\n\n{h['input']}", h["output"])[0] == "eval"  # another phrasing
    assert index.match(f"{h['instruction']}\n\n{h['input'].lower()}  ", h["output"])[0] == "eval"
    mnemonic, operand = h["input"].split()
    new = f"{operand[:-2]}{(int(operand[-2:], 16) + 1) % 256:02X}"
    assert index.match(f"{h['instruction']}\n\n{mnemonic} {new}", "?? ??") is None


@pytest.mark.parametrize(
    ("faults", "expect"),
    [
        (["garbage"], {"malformed": 1}),
        (["refusal"], {"refusal": 1}),
        (["not_json", "not_json"], {"not_json": 2}),
        (["timeout", "timeout"], {"timeout": 2}),
        (["429", "429"], {"rate_limited": 2}),
        (["500", "drop"], {"server_error": 1, "connection": 1}),
        (["partial_json"], {"partial": 1}),
        (["wrong"], {}),
    ],
    ids=lambda v: ",".join(v) if isinstance(v, list) else None,
)
def test_teacher_faults_never_sink_the_round(tmp_path, teacher, faults, expect):
    url, state = teacher(faults=faults, copy=False)
    cfg = synth_cfg(tmp_path, url, teacher_retries=1, teacher_timeout=0.5, max_groups=2)
    t0 = time.time()
    result = run_synth(cfg)
    assert time.time() - t0 < 30
    report = result.report
    first, second = report["groups"]
    assert Counter(first["faults"]) == Counter(expect)
    assert report["teacher_faults"] == expect
    assert second["status"] == "answered" and second["kept"] > 0  # the next group goes on
    if faults[0] in ("garbage", "refusal"):
        assert first["status"].startswith("failed") and first["tokens"] > 0
    if len(faults) == 2:  # every try failed: nothing paid, nothing saved, a later run asks again
        assert first["status"].startswith("failed") and first["tokens"] == 0
        assert not (result.output_dir / "teacher" / f"{first['id']}.json").exists()
    if faults == ["partial_json"]:
        assert 0 < first["received"] < cfg.samples_per_group and first["kept"] > 0
    if faults == ["wrong"]:
        assert first["kept"] == 0 and first["rejected"].get("verify", 0) > 0
        assert set(first["rejected"]) <= {"verify", "duplicate_train", "duplicate_eval", "duplicate_synth"}
    md = (result.output_dir / "synth_report.md").read_text()
    assert "Teacher faults: " + ("none" if not expect else "") in md


def test_token_budget_stops_asking(tmp_path, teacher):
    url, state = teacher(copy=False)
    result = run_synth(synth_cfg(tmp_path, url, max_teacher_tokens=900, teacher_max_tokens=300))
    statuses = [g["status"] for g in result.report["groups"]]
    assert "skipped: token budget" in statuses
    assert result.report["teacher_tokens"] <= 900 and len(state.requests) < 4


def test_synth_cli_errors_are_one_line(tmp_path, teacher, capsys):
    rc = main(["synth", "--failures", str(tmp_path / "none.jsonl"), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "--teacher_url" in err
    url, _ = teacher()
    rc = main(
        ["synth", "--failures", str(tmp_path / "none.jsonl"), "--teacher_url", url, "--teacher_model", "m"]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "none.jsonl" in err
    rc = main(["synth", "--teacher_url", url])
    assert rc == 2 and "--failures is required" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# improve: a tiny student, killed with SIGKILL twice, finishes without redoing or repaying


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_llama):
    from lorakit.training.train import train

    tmp = tmp_path_factory.mktemp("student")
    data = write_jsonl(tmp / "train.jsonl", demo_rows("train")[:24])
    return train(tiny_train_config(tiny_llama, data, tmp / "student", max_steps=30, save_steps=3))


def _run_until(argv: list[str], cwd: Path, ready, timeout: float = 240) -> subprocess.Popen:
    """Start `lorakit ARGV`; SIGKILL it as soon as `ready()` holds (or let it finish)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    end = time.time() + timeout
    while proc.poll() is None and time.time() < end:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    return proc


@pytest.mark.slow
def test_improve_resumes_after_sigkill_without_repaying_the_teacher(tmp_path, teacher, student):
    url, state = teacher(delay=0.7, copy=False)
    test_rows = write_jsonl(tmp_path / "test.jsonl", demo_rows("test")[:6])
    out = tmp_path / "improve"
    argv = ["improve", "--adapter", str(student), "--eval_dataset", str(test_rows), "--output_dir", str(out)]
    argv += ["--teacher_url", url, "--teacher_model", demo_teacher.MODEL, "--verify", VERIFY]
    argv += ["--max_new_tokens", "4", "--samples_per_group", "4", "--rounds", "1", "--retrain", "continue"]
    replies = out / "round-1" / "synth" / "teacher"

    # 1. Killed in synth, after two groups' replies were saved.
    first = _run_until(argv, tmp_path, lambda: len(list(replies.glob("g*.json"))) >= 2)
    assert first.returncode == -signal.SIGKILL, first.stdout.read()
    paid = {p.name for p in replies.glob("g*.json")}
    eval_marker = out / "round-0" / "eval.done.json"
    assert eval_marker.is_file() and not (out / "round-1" / "synth.done.json").exists()
    eval_stamp = eval_marker.stat().st_mtime_ns

    # 2. Killed in training, after a checkpoint.
    adapter = out / "round-1" / "adapter"
    second = _run_until(argv, tmp_path, lambda: any(adapter.glob("checkpoint-*/lorakit-checkpoint.json")))
    log = second.stdout.read()
    assert "round-0 eval: done before, skipped" in log
    assert f"starting from the weights of {student}" in log  # --retrain continue
    assert second.returncode == -signal.SIGKILL, log
    synth_stamp = (out / "round-1" / "synth.done.json").stat().st_mtime_ns
    asked = len(state.requests)

    # 3. Runs to the end: no step redone, no group asked twice, training resumed.
    third = _run_until(argv, tmp_path, lambda: False)
    log = third.stdout.read()
    assert third.returncode == 0, log
    assert "round-1 synth: done before, skipped" in log and "resuming from" in log
    assert eval_marker.stat().st_mtime_ns == eval_stamp
    assert (out / "round-1" / "synth.done.json").stat().st_mtime_ns == synth_stamp
    assert len(state.requests) == asked
    prompts = Counter(r["body"]["messages"][-1]["content"] for r in state.requests)
    assert max(prompts.values()) == 1, "a group was paid for twice"
    assert paid <= {p.name for p in replies.glob("g*.json")}
    summary = json.loads((out / "improve.json").read_text())
    assert summary["rounds"][0]["synth"]["kept"] > 0 and summary["rounds"][0]["after"] is not None
    md = (out / "improve.md").read_text()
    assert "| held-out metric | before | after | change |" in md
    report = (out / "round-1" / "report.md").read_text()
    assert "| group | failing rows |" in report and "exact_match" in report


def test_one_round_in_process_writes_its_report(tmp_path, teacher, student):
    """The rounds without processes of their own (the quick subset's view of improve)."""
    from lorakit.core.config import ImproveConfig
    from lorakit.workflows.improve import improve

    url, state = teacher(copy=False)
    out = improve(
        ImproveConfig(
            adapter=str(student),
            eval_dataset=str(write_jsonl(tmp_path / "test.jsonl", demo_rows("test")[:6])),
            output_dir=str(tmp_path / "improve"),
            teacher_url=url,
            teacher_model=demo_teacher.MODEL,
            teacher_backoff=0.0,
            verify=VERIFY,
            max_new_tokens=4,
            samples_per_group=4,
            rounds=1,
            retrain="continue",
        )
    )
    summary = json.loads((out / "improve.json").read_text())
    [first] = summary["rounds"]
    assert first["synth"]["kept"] > 0 and first["after"] is not None and state.requests
    assert (out / "round-1" / "adapter" / "adapter_model.safetensors").is_file()
    assert "| held-out metric | before | after | change |" in (out / "improve.md").read_text()
