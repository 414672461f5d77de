"""Resumable checkpoints: the completion marker, the run's fingerprint, and finding what to resume.

A checkpoint directory counts only once its marker file exists; the marker is written last, so a
directory left by a killed process is never resumed from. The marker carries the fingerprint of
the run (data, chat template, base model, settings), and a resume with a different one is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ..core.config import TrainConfig
from ..core.errors import LorakitError
from ..core.fields import field_names
from ..core.runfiles import ADAPTER_CONFIG

CHECKPOINT_MARKER = "lorakit-checkpoint.json"


def fingerprint(cfg: TrainConfig, data_digest: str, chat_template: str, base_identity: str) -> dict:
    """What a resume must find unchanged: the encoded rows, the template, the base, the settings."""
    resumable = field_names(TrainConfig, resumable=True)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in resumable}
    settings["effective_batch_size"] = cfg.batch_size * cfg.gradient_accumulation_steps
    return {
        "data_sha256": data_digest,
        "chat_template_sha256": hashlib.sha256((chat_template or "").encode()).hexdigest(),
        "base_model": base_identity,
        "settings": settings,
    }


def fingerprint_changes(saved: dict, now: dict, base_model: str = "") -> list[str]:
    changes = []
    if saved.get("data_sha256") != now["data_sha256"]:
        changes.append("the dataset (its rows or their tokenization) changed")
    if saved.get("chat_template_sha256") != now["chat_template_sha256"]:
        changes.append("the chat template changed")
    if saved.get("base_model", now["base_model"]) != now["base_model"]:
        changes.append(
            f"the base model changed (--base_model {base_model or 'the embedded default'} has other weights)"
        )
    old, new = saved.get("settings", {}), now["settings"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changes.append(f"'{key}' changed from {old.get(key)!r} to {new.get(key)!r}")
    return changes


def checkpoint_step(d: Path) -> int:
    return int(d.name.split("-")[-1])


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoints with the marker written last; a partial or foreign directory is never listed."""
    found = []
    for d in out.glob("checkpoint-*"):
        if d.is_dir() and (d / CHECKPOINT_MARKER).is_file() and d.name.split("-")[-1].isdigit():
            found.append(d)
    return sorted(found, key=checkpoint_step)


def find_resume_checkpoint(cfg: TrainConfig, out: Path) -> Path | None:
    if cfg.resume_from_checkpoint:
        ckpt = Path(cfg.resume_from_checkpoint).expanduser()
        if not (ckpt / CHECKPOINT_MARKER).is_file():
            raise LorakitError(
                f"--resume_from_checkpoint {ckpt}: not a complete lorakit checkpoint (no {CHECKPOINT_MARKER})"
            )
        return ckpt
    if cfg.resume:
        found = complete_checkpoints(out)
        if not found:
            raise LorakitError(f"--resume: no complete checkpoint in {out}; start without --resume")
        return found[-1]
    return None


def check_resume(checkpoint: Path, fp: dict, cfg: TrainConfig) -> None:
    """Refuse to resume a checkpoint whose fingerprint differs, unless told to."""
    try:
        saved = json.loads((checkpoint / CHECKPOINT_MARKER).read_text())
    except (OSError, ValueError) as e:
        raise LorakitError(f"{checkpoint / CHECKPOINT_MARKER}: unreadable checkpoint marker ({e})") from None
    changes = fingerprint_changes(saved.get("fingerprint", {}), fp, cfg.base_model)
    if changes and not cfg.resume_ignore_changes:
        raise LorakitError(
            f"cannot resume from {checkpoint}: {'; '.join(changes)} (pass --resume_ignore_changes to resume anyway)"
        )


def guard_output_dir(cfg: TrainConfig, out: Path) -> None:
    """A new run never silently replaces an adapter or an unfinished run in output_dir."""
    if cfg.resume or cfg.resume_from_checkpoint or cfg.overwrite:
        return
    if (out / ADAPTER_CONFIG).exists():
        raise LorakitError(f"{out} already holds an adapter: pass --overwrite or choose another --output_dir")
    if complete_checkpoints(out):
        raise LorakitError(
            f"{out} holds checkpoints of an unfinished run: pass --resume to continue it, or --overwrite"
        )
