"""A run directory (what `lorakit train` writes), read as one object without loading a model.

Its settings (lorakit.yaml), manifest, metrics.jsonl, checkpoints and the reports other commands
left beside it (eval.json, failures.jsonl, a data check report, the sweep it belongs to). Every
reader here is tolerant: a run that is being written, or that a kill left half-written, is read
as far as it goes and what is missing or damaged becomes a note, never an exception, because
the dashboard shows runs while they train.

Status, from the files alone (the first rule that applies):
- running: metrics.jsonl has no summary line after its last rows (or does not exist yet) and the
  run's files changed within `stale_after` seconds; a `lorakit train` the dashboard started
  itself counts as running for as long as its process lives;
- finished, diverged, paused, interrupted: what the last summary line of metrics.jsonl says
  (`train` writes one when it stops: done, non-finite loss, a pause at --stop_at_step, a signal);
  a summary of "no steps" reads as failed;
- finished: an adapter (adapter_config.json) with no summary line (written by other tools);
- interrupted: anything else, i.e. a run whose process died without a summary (SIGKILL,
  out of memory, power loss); `lorakit train --resume` continues it from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..core.runfiles import (  # noqa: F401 (Metrics, read_metrics: the dashboard reads them from here)
    ADAPTER_CONFIG,
    DATA_CHECK,
    EVAL,
    FAILURES,
    MANIFEST,
    METRICS,
    SETTINGS,
    Metrics,
    read_metrics,
)

SWEEP = "sweep.json"
MARKERS = (SETTINGS, MANIFEST, METRICS, ADAPTER_CONFIG)
# Folders inside a tree of runs that never hold one: TensorBoard logs, exports, caches.
NOT_RUNS = {"runs", "merged", "export", "node_modules", "__pycache__"}
SEARCH_DEPTH = 4
# The settings shown beside each run in the list (all of them are in its detail and compare views).
KEY_SETTINGS = (
    "dataset",
    "lora_r",
    "lora_alpha",
    "learning_rate",
    "batch_size",
    "gradient_accumulation_steps",
    "num_epochs",
    "max_steps",
    "max_seq_length",
)
SUMMARY_STATUS = {"no steps": "failed"}


def _read_json(path: Path, notes: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        notes.append(f"{path.name}: unreadable ({getattr(e, 'strerror', None) or e})")
        return None


def _read_settings(path: Path, notes: list[str]) -> dict:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        notes.append(f"{path.name}: unreadable ({e.strerror})")
        return {}
    try:
        loaded = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        notes.append(f"{path.name}: not valid YAML ({getattr(e, 'problem', e)})")
        return {}
    return loaded if isinstance(loaded, dict) else {}


def is_run(path: Path, names: set[str]) -> bool:
    return bool(names & set(MARKERS)) or any(n.startswith("checkpoint-") for n in names)


def find_runs(root: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    """Run directories under `root` (root itself included); a run's own subfolders are not searched."""
    found: list[Path] = []

    def visit(d: Path, left: int) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        if is_run(d, {e.name for e in entries}):
            found.append(d)
            return
        if left == 0:
            return
        for e in sorted(entries, key=lambda e: e.name):
            if e.is_dir() and not e.name.startswith(".") and e.name not in NOT_RUNS:
                visit(Path(e.path), left - 1)

    visit(root, depth)
    return found


@dataclass
class RunSummary:
    """One line of the runs list."""

    id: str  # the path relative to the runs directory, with /
    name: str
    status: str
    notes: list[str]
    base_model: str
    settings: dict[str, Any]
    steps: int | None
    best_eval_loss: float | None
    last_loss: float | None
    tokens_per_second: float | None
    duration_s: float | None
    updated: float  # newest modification time of the run's files (Unix seconds)
    has_adapter: bool
    group: str  # the sweep (its directory, relative) this run is a trial of, or ""

    def to_json(self) -> dict:
        return asdict(self)


def _base_model(settings: dict, manifest: dict | None) -> str:
    recorded = (manifest or {}).get("base_model") or {}
    name = recorded.get("name") or settings.get("base_model") or ""
    return name or "SmolLM2-135M-Instruct (embedded)"


def _status(rows: list[dict], has_adapter: bool, fresh: bool, alive: bool) -> str:
    last = max((i for i, r in enumerate(rows) if r.get("summary")), default=None)
    after = last is None or any(not r.get("summary") for r in rows[last + 1 :])
    if alive or (after and fresh):
        return "running"
    if last is not None and not after:
        told = str(rows[last].get("status") or "finished")
        return SUMMARY_STATUS.get(told, told)
    return "finished" if has_adapter else "interrupted"


def _numbers(rows: list[dict]) -> dict:
    train = [r for r in rows if not r.get("summary")]
    evals = [r["eval_loss"] for r in train if isinstance(r.get("eval_loss"), (int, float))]
    losses = [r["loss"] for r in train if isinstance(r.get("loss"), (int, float))]
    speeds = [r["tokens_per_second"] for r in train if isinstance(r.get("tokens_per_second"), (int, float))]
    summary = next((r for r in reversed(rows) if r.get("summary")), {})
    runtime = next((r["train_runtime"] for r in reversed(train) if "train_runtime" in r), None)
    return {
        "steps": max((r["step"] for r in train if isinstance(r.get("step"), int)), default=None),
        "best_eval_loss": min(evals, default=None),
        "last_loss": losses[-1] if losses else None,
        "tokens_per_second": summary.get("tokens_per_second")
        or (sum(speeds[-5:]) / len(speeds[-5:]) if speeds else None),
        "duration_s": summary.get("train_runtime_s") or runtime,
    }


_cache: dict[Path, tuple[tuple, RunSummary]] = {}


def _stamp(path: Path) -> tuple[tuple, float]:
    """What changes when the run changes (names, sizes, times of its top-level files), and the newest time."""
    stamp, newest = [], 0.0
    try:
        for e in os.scandir(path):
            try:
                st = e.stat()
            except OSError:
                continue
            stamp.append((e.name, st.st_size, st.st_mtime_ns))
            newest = max(newest, st.st_mtime)
    except OSError:
        pass
    return tuple(sorted(stamp)), newest


def summarize(path: Path, root: Path, stale_after: float, alive: bool = False) -> RunSummary:
    """The run's line in the list; cached until one of its top-level files changes."""
    stamp, newest = _stamp(path)
    fresh = time.time() - newest < stale_after
    key = (stamp, fresh, alive)
    hit = _cache.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    notes: list[str] = []
    names = {name for name, _, _ in stamp}
    settings = _read_settings(path / SETTINGS, notes)
    manifest = _read_json(path / MANIFEST, notes) if MANIFEST in names else None
    if not settings and isinstance(manifest, dict):
        settings = manifest.get("config") or {}
    metrics = read_metrics(path / METRICS)
    notes += metrics.notes
    has_adapter = ADAPTER_CONFIG in names
    if SETTINGS not in names:
        notes.append(f"no {SETTINGS}: settings unknown")
    if has_adapter and MANIFEST not in names:
        notes.append(f"no {MANIFEST}: an adapter without lorakit's record of how it was made")
    if METRICS not in names:
        notes.append(f"no {METRICS} yet")
    numbers = _numbers(metrics.rows)
    if numbers["duration_s"] is None and SETTINGS in names and metrics.rows:
        # lorakit.yaml is written as training starts: until the summary, time since then.
        started = next(t for n, _, t in stamp if n == SETTINGS) / 1e9
        numbers["duration_s"] = round(max(newest - started, 0.0), 1)
    summary = RunSummary(
        id=path.relative_to(root).as_posix() if path != root else ".",
        name=path.name,
        status=_status(metrics.rows, has_adapter, fresh, alive),
        notes=notes,
        base_model=_base_model(settings, manifest if isinstance(manifest, dict) else None),
        settings={k: settings[k] for k in KEY_SETTINGS if k in settings},
        updated=newest,
        has_adapter=has_adapter,
        group=_sweep_of(path, root),
        **numbers,
    )
    _cache[path] = (key, summary)
    return summary


def _sweep_of(path: Path, root: Path) -> str:
    for parent in path.parents:
        if parent == root.parent or not parent.is_relative_to(root):
            break
        if (parent / SWEEP).is_file():
            return parent.relative_to(root).as_posix() if parent != root else "."
    return ""


def settings_of(path: Path) -> tuple[dict, list[str]]:
    """All the run's settings (lorakit.yaml, else the manifest's copy) and notes on what is missing."""
    notes: list[str] = []
    settings = _read_settings(path / SETTINGS, notes)
    if not settings:
        manifest = _read_json(path / MANIFEST, notes)
        settings = (manifest or {}).get("config") or {} if isinstance(manifest, dict) else {}
    return settings, notes


def eval_reports(path: Path) -> list[dict]:
    """eval.json reports in the run directory or one folder down (`lorakit eval --output_dir RUN/eval`),
    each with its failures.jsonl rows."""
    found = []
    for report_file in [path / EVAL, *sorted(path.glob(f"*/{EVAL}"))]:
        notes: list[str] = []
        report = _read_json(report_file, notes)
        if not isinstance(report, dict):
            if notes:
                found.append({"where": report_file.parent.relative_to(path).as_posix(), "notes": notes})
            continue
        report = {k: v for k, v in report.items() if k != "rows"}
        failures = read_metrics(report_file.parent / FAILURES)
        report["failures"] = [_failure(r) for r in failures.rows]
        report["where"] = report_file.parent.relative_to(path).as_posix()
        report["notes"] = notes + failures.notes
        found.append(report)
    return found


def _failure(row: dict) -> dict:
    """A failures.jsonl row as prompt, reference and answer."""
    messages = row.get("messages") or []
    reference = messages[-1].get("content", "") if messages and isinstance(messages[-1], dict) else ""
    prompt = next(
        (
            m.get("content", "")
            for m in reversed(messages[:-1])
            if isinstance(m, dict) and m.get("role") == "user"
        ),
        "",
    )
    return {
        "source": row.get("source", ""),
        "why": row.get("why", ""),
        "prompt": prompt,
        "reference": reference,
        "answer": row.get("generation", ""),
        "loss": row.get("loss"),
        "token_f1": row.get("token_f1"),
    }


def data_check(path: Path) -> dict | None:
    notes: list[str] = []
    report = _read_json(path / DATA_CHECK, notes)
    if isinstance(report, dict):
        return report
    return {"notes": notes} if notes else None


def sweep_of(path: Path, root: Path) -> dict | None:
    group = _sweep_of(path, root)
    if not group:
        return None
    notes: list[str] = []
    sweep = _read_json(root / group / SWEEP, notes)
    return {"where": group, "report": sweep, "notes": notes}


def config_diff(settings: list[dict], ignore: tuple[str, ...] = ("output_dir",)) -> dict[str, list]:
    """The keys whose values differ between runs (a key a run lacks counts as None), with each run's value."""
    keys = sorted({k for s in settings for k in s} - set(ignore))
    diff = {}
    for k in keys:
        values = [s.get(k) for s in settings]
        if any(v != values[0] for v in values[1:]):
            diff[k] = values
    return diff
