"""Monitoring during training: metrics.jsonl, a rich progress line, training-health warnings,
the loss-curve PNG, and the stop-on-signal flag. All are transformers TrainerCallbacks."""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from ..core.errors import LorakitError
from ..core.files import is_main_process, say
from ..core.runfiles import METRICS, read_metrics

LOSS_CURVE_FILE = "loss_curve.png"


def metrics_rows(out: Path) -> list[dict]:
    """The rows of OUT/metrics.jsonl for a resume: a damaged line is an error (the run directory
    is damaged), except the last one, which a kill may have cut short."""
    path = out / METRICS
    found = read_metrics(path)
    for number, why in found.damaged:
        if number < found.lines:
            raise LorakitError(f"{path}:{number}: {why}; the run directory is damaged")
    return found.rows


class MetricsLog(TrainerCallback):
    """Appends every log line to metrics.jsonl, with real (non-pad) tokens per second.

    On resume, lines after the resumed step are dropped: those steps are trained again.
    """

    def __init__(self, out: Path):
        self.path = out / METRICS
        self.last = (time.perf_counter(), 0)

    def on_train_begin(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        kept = [
            r
            for r in metrics_rows(self.path.parent)
            if not r.get("summary") and r.get("step", 0) <= state.global_step
        ]
        if state.global_step == 0:
            kept = []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        now, seen = time.perf_counter(), state.num_input_tokens_seen
        row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
        if "eval_loss" in logs:
            row["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        if "loss" in logs and now > self.last[0]:
            row["tokens_per_second"] = round((seen - self.last[1]) / (now - self.last[0]), 1)
            self.last = (now, seen)
        self.append(row)

    def append(self, row: dict) -> None:
        if not is_main_process():
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class ProgressCallback(TrainerCallback):
    """A rich progress bar with loss, learning rate, tokens/s and ETA; one line per log when
    the output is not a terminal (CI logs, files)."""

    def __init__(self):
        from rich.console import Console

        self.console = Console()
        self.bar = None
        self.fields = {"loss": "-", "lr": "-", "tps": "-"}
        self.last = (time.perf_counter(), 0)
        self.began = (time.perf_counter(), 0)  # (time, step) when this process started training

    def on_train_begin(self, args, state, control, **kw):
        self.began = (time.perf_counter(), state.global_step)
        if not state.is_world_process_zero or not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.bar.add_task(
            "train", total=state.max_steps, completed=state.global_step, **self.fields
        )
        self.bar.start()

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            now, seen = time.perf_counter(), state.num_input_tokens_seen
            tps = (seen - self.last[1]) / max(now - self.last[0], 1e-9)
            self.last = (now, seen)
            self.fields = {
                "loss": f"{logs['loss']:.4f}",
                "lr": f"{logs.get('learning_rate', 0):.2e}",
                "tps": f"{tps:.0f}",
            }
            if self.bar is not None:
                self.bar.update(self.task, **self.fields)
            else:
                f = self.fields
                say(
                    f"step {state.global_step}/{state.max_steps}  loss {f['loss']}  lr {f['lr']}  {f['tps']} tok/s"
                    f"  eta {self.eta(state)}"
                )
        if "eval_loss" in logs:
            msg = f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f} (perplexity {math.exp(min(logs['eval_loss'], 50)):.2f})"
            (self.bar.console.print if self.bar is not None else print)(msg)

    def eta(self, state) -> str:
        """Time left at the run's average speed since this process started training (H:MM:SS)."""
        started, first = self.began
        done = state.global_step - first
        if done <= 0:
            return "-"
        left = (time.perf_counter() - started) / done * max(state.max_steps - state.global_step, 0)
        hours, rest = divmod(int(left), 3600)
        return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class HealthWatch(TrainerCallback):
    """Says out loud what the guide's "Common issues" section asks users to spot by eye:
    overfitting (train loss falling while validation loss rises) and a loss that does not fall."""

    def __init__(self, no_progress_steps: int):
        self.no_progress_steps = no_progress_steps
        self.train: list[tuple[int, float]] = []
        self.evals: list[float] = []
        self.warned: set[str] = set()
        self.messages: list[str] = []

    def warn(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.messages.append(message)
            if is_main_process():
                say(f"lorakit: warning: {message}", flush=True)

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs:
            return
        if "loss" in logs:
            self.train.append((state.global_step, logs["loss"]))
            n = self.no_progress_steps
            if n and state.global_step >= n and len(self.train) >= 4:
                k = max(1, len(self.train) // 4)
                first = sum(v for _, v in self.train[:k]) / k
                recent = sum(v for _, v in self.train[-k:]) / k
                if recent >= 0.98 * first:
                    self.warn(
                        "stall",
                        (
                            f"training loss has not fallen after {state.global_step} steps ({first:.4f} -> {recent:.4f}): "
                            "the learning rate may be too low (try 5e-4), or the data may be wrong: run `lorakit data check` "
                            "and look at the supervised fraction and the highlighted preview"
                        ),
                    )
        if "eval_loss" in logs:
            self.evals.append(logs["eval_loss"])
            if (
                len(self.evals) >= 3
                and self.evals[-1] > self.evals[-2] > self.evals[-3]
                and len(self.train) >= 2
            ):
                half = len(self.train) // 2
                early = sum(v for _, v in self.train[:half]) / max(half, 1)
                late = sum(v for _, v in self.train[half:]) / max(len(self.train) - half, 1)
                if late < early:
                    self.warn(
                        "overfit",
                        (
                            f"overfitting: validation loss rose for 2 evaluations ({self.evals[-3]:.4f} -> {self.evals[-1]:.4f}) "
                            "while training loss kept falling; use fewer epochs, --early_stopping_patience, "
                            "--lora_dropout 0.1, --weight_decay 0.05, or more data"
                        ),
                    )


class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM: finish the current optimizer step, save a checkpoint, stop cleanly."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        say(
            f"\nlorakit: {signal.Signals(signum).name} received: saving a checkpoint after this step",
            flush=True,
        )

    def on_step_end(self, args, state, control, **kw):
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


class LossCurve(TrainerCallback):
    """Redraws OUTPUT/loss_curve.png (train and validation loss) at every checkpoint."""

    def __init__(self, out: Path):
        self.out = out

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            plot_loss_curve(self.out)


def plot_loss_curve(out: Path) -> Path | None:
    if not is_main_process():
        return None
    rows = metrics_rows(out)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and not r.get("summary")]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and not r.get("summary")]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", color="#4477aa")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss", color="#cc3311")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (supervised tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / LOSS_CURVE_FILE
    tmp = out / f".{LOSS_CURVE_FILE}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
