"""`lorakit improve`: the guide's loop, run and measured. Evaluate the student on held-out rows,
then for each round: new rows for its failures from a teacher (`synth`) -> retrain on the
training data plus every round's new rows (from the base, or from the last adapter) -> evaluate
on the same held-out rows -> report; until --rounds, or a round that gains nothing.

Layout of the output directory (every step's result is kept):

    round-0/eval/            the student's eval (eval.json, eval.md, failures.jsonl)
    round-N/synth/           synth.jsonl, rejected.jsonl, synth_report.md, teacher/ (one reply per group)
    round-N/data/            the round's training data: links to the student's files and each round's synth.jsonl
    round-N/adapter/         the retrained adapter (checkpoints while it trains)
    round-N/eval/            its eval on the same held-out rows
    round-N/report.md        the round: per-group table, before/after metrics
    improve.json, improve.md the whole run

Each finished step leaves a marker (`round-N/STEP.done.json`, written atomically, holding its
result); a run started again after a kill skips marked steps, resumes training from its newest
checkpoint, and synth reuses every teacher reply already saved: nothing is paid twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..core.config import EvalConfig, ImproveConfig, SynthConfig, TrainConfig
from ..core.errors import LorakitError
from ..core.fields import as_config, write_yaml
from ..core.files import atomic_write_json, atomic_write_text, say
from ..core.runfiles import FAILURES

SHOWN = ("exact_match", "token_f1", "stop_rate", "loss")


class OutOfTime(Exception):
    """--max_minutes reached before a step could start."""


class RoundSteps:
    """Finished steps and their results (markers on disk), and the time budget they spent."""

    def __init__(self, out: Path, max_minutes: float):
        self.out, self.started = out, time.time()
        spent = sum(json.loads(p.read_text())["seconds"] for p in out.glob("round-*/*.done.json"))
        self.deadline = self.started + max_minutes * 60 - spent if max_minutes else None

    def marker(self, round_dir: Path, name: str) -> Path:
        return round_dir / f"{name}.done.json"

    def run(self, round_dir: Path, name: str, fn: Callable[[], dict]) -> dict:
        marker = self.marker(round_dir, name)
        if marker.is_file():
            say(f"lorakit: improve: {round_dir.name} {name}: done before, skipped")
            return json.loads(marker.read_text())["result"]
        if self.deadline is not None and time.time() >= self.deadline:
            raise OutOfTime(f"{round_dir.name} {name}")
        t0 = time.time()
        result = fn()
        atomic_write_json(marker, {"result": result, "seconds": round(time.time() - t0, 2)})
        return result


def improve(cfg: ImproveConfig) -> Path:
    """Run the rounds; returns the output directory (improve.json, improve.md, round-*/)."""
    from ..data.sources import demo_path
    from ..models.adapter import Adapter

    student = Adapter.open(cfg.adapter)
    cfg = dataclasses.replace(
        cfg,
        dataset=cfg.dataset or student.settings.dataset or str(demo_path("train")),
        eval_dataset=cfg.eval_dataset or str(demo_path("test")),
    )
    from .teacher import Teacher

    Teacher(cfg)  # the teacher flags, checked before any work
    out = Path(cfg.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(cfg, out)
    steps = RoundSteps(out, cfg.max_minutes)
    rounds: list[dict] = []
    try:
        before = steps.run(out / "round-0", "eval", lambda: _eval(cfg, cfg.adapter, out / "round-0" / "eval"))
    except OutOfTime:
        raise LorakitError(
            f"--max_minutes {cfg.max_minutes:g}: spent by earlier runs in {out} before the student's eval; "
            "raise it or choose another --output_dir"
        ) from None
    say(
        f"lorakit: improve: student exact match {before['exact_match']:.1%} on {before['rows']} held-out rows"
    )
    adapter, stop = cfg.adapter, f"--rounds {cfg.rounds} done"
    try:
        for k in range(1, cfg.rounds + 1):
            result = _round(cfg, steps, out, k, adapter, before, rounds)
            rounds.append(result)
            _write_round(out / f"round-{k}", result)
            if result["stop"]:
                stop = result["stop"]
                break
            adapter, before = result["adapter"], result["after"]
    except OutOfTime as e:
        stop = f"--max_minutes {cfg.max_minutes:g} reached before {e}"
    return _finish(cfg, out, steps, rounds, stop)


def _round(
    cfg: ImproveConfig, steps: RoundSteps, out: Path, k: int, adapter: str, before: dict, rounds: list
) -> dict:
    rd = out / f"round-{k}"
    result = {"round": k, "before": before, "after": None, "adapter": None, "stop": ""}
    tokens_before = sum(r["synth"]["teacher_tokens"] for r in rounds)
    failures = out / f"round-{k - 1}" / "eval" / FAILURES
    # Rows of earlier rounds are training data now: new rows must not repeat them either.
    trained_on = str(out / f"round-{k - 1}" / "data") if k > 1 else cfg.dataset
    result["synth"] = steps.run(
        rd, "synth", lambda: _synth(cfg, steps, failures, rd / "synth", tokens_before, trained_on)
    )
    say(
        f"lorakit: improve: round {k}: {result['synth']['kept']} new rows from {len(result['synth']['groups'])} "
        f"groups, teacher tokens {result['synth']['teacher_tokens']}"
    )
    if not result["synth"]["groups"]:
        result["stop"] = "no failures left to learn from"
        return result
    if result["synth"]["kept"] == 0:
        result["stop"] = "the teacher gave no row that passed the checks"
        return result
    data = steps.run(rd, "data", lambda: _data(cfg, out, k))
    result["adapter"] = steps.run(rd, "train", lambda: _train(cfg, rd, data["dataset"], adapter))["adapter"]
    result["after"] = steps.run(rd, "eval", lambda: _eval(cfg, result["adapter"], rd / "eval"))
    gain = result["after"]["exact_match"] - before["exact_match"]
    say(
        f"lorakit: improve: round {k}: held-out exact match {before['exact_match']:.1%} -> "
        f"{result['after']['exact_match']:.1%} ({gain:+.1%})"
    )
    if gain <= cfg.min_gain:
        result["stop"] = f"round {k} gained {gain:+.1%} exact match (--min_gain {cfg.min_gain:g})"
    return result


def _synth_fields(cfg: ImproveConfig) -> dict:
    names = {f.name for f in dataclasses.fields(SynthConfig)} - {"failures", "output_dir"}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in names}


def _synth(
    cfg: ImproveConfig, steps: RoundSteps, failures: Path, out: Path, tokens_before: int, dataset: str
) -> dict:
    from .synth import run_synth

    fields = {**_synth_fields(cfg), "dataset": dataset}
    synth_cfg = SynthConfig(**fields, failures=str(failures), output_dir=str(out))
    result = run_synth(synth_cfg, deadline=steps.deadline, tokens_before=tokens_before)
    if any(g.status == "skipped: time budget" for g in result.groups):
        raise OutOfTime("every teacher request was made")  # the rows kept so far are on disk
    return {
        k: result.report[k]
        for k in ("groups", "asked", "received", "kept", "rejected", "teacher_faults", "teacher_tokens")
    }


def _data(cfg: ImproveConfig, out: Path, k: int) -> dict:
    """round-k/data/: links to the student's data files and to the synth.jsonl of rounds 1..k
    (one format per file, so the alpaca rows stay in files of their own)."""
    from ..data.sources import resolve_sources

    sources = resolve_sources(cfg.dataset)
    if isinstance(sources, str):
        raise LorakitError(
            f"--dataset {cfg.dataset}: improve needs the training data as local JSONL/JSON files "
            "(save the datasets id to a file first)"
        )
    data = out / f"round-{k}" / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = [(f"student-{i:03d}-{p.name}", p) for i, p in enumerate(sources)]
    files += [
        (f"synth-round-{j}.jsonl", out / f"round-{j}" / "synth" / "synth.jsonl") for j in range(1, k + 1)
    ]
    for name, target in files:
        link = data / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(target.resolve(), data), link)
    return {"dataset": str(data), "files": [name for name, _ in files]}


def _train(cfg: ImproveConfig, rd: Path, dataset: str, adapter: str) -> dict:
    from ..models.adapter import Adapter
    from ..training.checkpoints import complete_checkpoints
    from ..training.train import train
    from ..training.trainer import StartFromAdapter

    settings = Adapter.open(cfg.adapter).settings
    target = rd / "adapter"
    resuming = bool(complete_checkpoints(target))
    train_cfg = dataclasses.replace(
        settings,
        dataset=dataset,
        output_dir=str(target),
        overwrite=not resuming,
        resume=resuming,
        resume_from_checkpoint="",
        num_epochs=cfg.num_epochs or settings.num_epochs,
        num_processes=1,
    )
    start = [StartFromAdapter(adapter)] if cfg.retrain == "continue" and not resuming else []
    say(f"lorakit: improve: {rd.name}: training on {dataset} ({'resuming' if resuming else cfg.retrain})")
    return {"adapter": str(train(as_config(train_cfg, TrainConfig), callbacks=start))}


def _eval(cfg: ImproveConfig, adapter: str, out: Path) -> dict:
    from .evaluate import evaluate

    report = evaluate(
        EvalConfig(
            adapter=adapter,
            dataset=cfg.eval_dataset,
            output_dir=str(out),
            max_rows=cfg.max_eval_rows,
            max_new_tokens=cfg.max_new_tokens,
            eval_batch_size=cfg.eval_batch_size,
            failures=1_000_000,  # every row it got wrong is a candidate for synth
        )
    )
    return {k: report["tuned"][k] for k in ("rows", *SHOWN)}


# ---------------------------------------------------------------------------------------------
# Reports


def _metrics_table(before: dict, after: dict | None) -> list[str]:
    lines = ["| held-out metric | before | after | change |", "|---|---:|---:|---:|"]
    for k in SHOWN:
        b = before[k]
        a = after[k] if after else None
        fmt = (lambda v: f"{v:.4f}") if k == "loss" else (lambda v: f"{v:.1%}")
        lines.append(
            f"| {k} | {fmt(b)} | {fmt(a) if a is not None else '-'} | "
            f"{(f'{a - b:+.4f}' if k == 'loss' else f'{a - b:+.1%}') if a is not None else '-'} |"
        )
    return lines


def round_markdown(result: dict) -> str:
    from .synth import counts_text, group_table

    s = result["synth"]
    rejected, faults = counts_text(s["rejected"]), counts_text(s["teacher_faults"])
    return "\n".join(
        [
            f"# Round {result['round']}",
            "",
            f"Teacher: {s['kept']} rows kept of {s['received']} received ({s['asked']} asked), "
            f"rejected: {rejected}; teacher faults: {faults}; teacher tokens: {s['teacher_tokens']}.",
            "",
            *group_table(s["groups"]),
            "",
            *_metrics_table(result["before"], result["after"]),
            "",
            f"Adapter: `{result['adapter'] or '-'}`."
            + (f" Stopped: {result['stop']}." if result["stop"] else ""),
            "",
        ]
    )


def _write_round(rd: Path, result: dict) -> None:
    atomic_write_json(rd / "report.json", result)
    atomic_write_text(rd / "report.md", round_markdown(result))


def _finish(cfg: ImproveConfig, out: Path, steps: RoundSteps, rounds: list[dict], stop: str) -> Path:
    from .synth import counts_text

    start = json.loads(steps.marker(out / "round-0", "eval").read_text())["result"]
    evaluated = [r for r in rounds if r["after"]]
    best = max(evaluated, key=lambda r: r["after"]["exact_match"], default=None)
    if best is not None and best["after"]["exact_match"] <= start["exact_match"]:
        best = None
    seconds = sum(json.loads(p.read_text())["seconds"] for p in out.glob("round-*/*.done.json"))
    summary = {
        "student": cfg.adapter,
        "eval_dataset": cfg.eval_dataset,
        "before": start,
        "after": best["after"] if best else start,
        "best_adapter": best["adapter"] if best else cfg.adapter,
        "rounds": rounds,
        "stopped": stop,
        "teacher_tokens": sum(r["synth"]["teacher_tokens"] for r in rounds),
        "step_seconds": round(seconds, 1),
    }
    atomic_write_json(out / "improve.json", summary)
    lines = [
        f"# lorakit improve: `{cfg.adapter}`",
        "",
        f"Held-out rows: `{cfg.eval_dataset}` ({start['rows']} rows). Teacher: `{cfg.teacher_model}` at "
        f"{cfg.teacher_url}. Retraining: {cfg.retrain}. Stopped: {stop}.",
        "",
        *_metrics_table(start, summary["after"]),
        "",
        "| round | new rows | teacher tokens | teacher faults | exact match after |",
        "|---:|---:|---:|---|---:|",
    ]
    for r in rounds:
        faults = counts_text(r["synth"]["teacher_faults"], "-")
        after = f"{r['after']['exact_match']:.1%}" if r["after"] else "-"
        lines.append(
            f"| {r['round']} | {r['synth']['kept']} | {r['synth']['teacher_tokens']} | {faults} | {after} |"
        )
    lines += ["", f"Best adapter: `{summary['best_adapter']}`. RoundSteps took {seconds:.0f} s in all.", ""]
    lines += [f"Round reports: `round-{r['round']}/report.md`." for r in rounds[:1]]
    atomic_write_text(out / "improve.md", "\n".join(lines) + "\n")
    say(
        f"lorakit: improve: held-out exact match {start['exact_match']:.1%} -> {summary['after']['exact_match']:.1%}; "
        f"stopped: {stop}; report in {out / 'improve.md'}"
    )
    return out
