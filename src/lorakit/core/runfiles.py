"""The names of the files in a run directory, written once: train, eval, data check, the dashboard
and the resume logic all read and write these, and the one reader of their JSON lines."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SETTINGS = "lorakit.yaml"  # the resolved config, beside every output
METRICS = "metrics.jsonl"  # one line per logged step, a summary line when a run stops
MANIFEST = "manifest.json"  # what a finished adapter was trained from, and its final numbers
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: its presence means the adapter is complete
TRAIN_LOG = "train.log"  # the output of a run started from the dashboard
EVAL = "eval.json"
FAILURES = "failures.jsonl"
DATA_CHECK = "data_check.json"  # `lorakit data check --output RUN/data_check.json`


@dataclass
class Metrics:
    """The JSON lines of a file (metrics.jsonl, failures.jsonl) read from a byte offset."""

    rows: list[dict]
    offset: int  # bytes read: the next read starts here (a half-written last line is left for it)
    notes: list[str] = field(default_factory=list)  # what a reader shows a person (the dashboard)
    damaged: list[tuple[int, str]] = field(default_factory=list)  # (line number from offset, why)
    lines: int = 0  # complete lines read


def read_metrics(path: Path, offset: int = 0) -> Metrics:
    """The complete lines of a JSON-lines file from byte `offset` on. A damaged line is kept aside
    (`damaged`, `notes`), never raised: the dashboard shows it beside the run, and resume decides
    for itself (training.monitor.metrics_rows). A last line without its newline is left unread: it
    is being written, or a kill cut it short."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return Metrics([], offset)
    except OSError as e:
        return Metrics([], offset, [f"{path.name}: unreadable ({e.strerror})"])
    end = data.rfind(b"\n") + 1
    found = Metrics([], offset + end)
    at = offset
    for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        start, at = at, at + len(line) + 1
        found.lines = number
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            found.damaged.append((number, f"not valid JSON ({getattr(e, 'msg', e)})"))
            found.notes.append(f"{path.name}: the line at byte {start} is not valid JSON (skipped)")
            continue
        if isinstance(row, dict):
            found.rows.append(row)
        else:
            found.damaged.append((number, "expected a JSON object"))
    if data[end:].strip():
        found.notes.append(
            f"{path.name}: the last line is incomplete (being written, or cut short by a kill)"
        )
    return found
