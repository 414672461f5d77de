"""`lorakit sweep`: short trainings ranked by validation loss, within a step or time budget.

Every trial is an ordinary lorakit run directory (checkpoints, manifest, metrics) named after its
settings, so a killed sweep resumes: finished trials are read back, unfinished ones resume from
their last checkpoint. Successive halving pauses trials at each rung with the learning-rate
schedule of the full budget, so a continued trial is the same run as one that never paused.
Optuna's TPE sampler and median pruner drive `--strategy optuna` (its study lives in a SQLite file
in the sweep folder).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import PlanConfig, SweepConfig, TrainConfig, size_band
from ..core.errors import LorakitError
from ..core.fields import _coerce, as_config, field_names, to_yaml
from ..core.files import atomic_write_json, atomic_write_text, say
from ..core.runfiles import ADAPTER_CONFIG

LR_LADDER = [1e-4, 2e-4, 5e-4, 1e-3]  # the guide's "try these in order"
SWEEPABLE = field_names(TrainConfig, sweepable=True)


@dataclass
class Trial:
    """One trial of a sweep: its settings, its run directory and what it reached."""

    overrides: dict[str, Any]
    dir: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"
    steps: int = 0
    evals: list[tuple[int, float]] = field(default_factory=list)
    best_eval_loss: float | None = None
    last_eval_loss: float | None = None
    rungs: list[int] = field(default_factory=list)


def parse_params(specs: list[str]) -> dict[str, list]:
    space: dict[str, list] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or not values:
            raise LorakitError(f"--param {spec!r}: write NAME=V1,V2,...")
        if name not in SWEEPABLE:
            close = difflib.get_close_matches(name, sorted(SWEEPABLE), n=1)
            raise LorakitError(
                f"--param {name}: not a sweepable setting"
                + (f"; did you mean '{close[0]}'?" if close else "")
            )
        space[name] = [
            _coerce(TrainConfig, name, v.strip(), f"--param {name}") for v in values.split(",") if v.strip()
        ]
    return space


def default_space(n_rows: int, budget_steps: int) -> dict[str, list]:
    """The guide's learning-rate ladder and its rank (and epoch) band for the dataset's size."""
    ranks, epochs = size_band(n_rows)
    space: dict[str, list] = {"learning_rate": LR_LADDER, "lora_r": list(ranks)}
    if not budget_steps:
        space["num_epochs"] = [float(e) for e in epochs]
    return space


def slug(overrides: dict) -> str:
    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(overrides.items())]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "_".join(parts))[:120] or "defaults"


class Sweep:
    def __init__(self, cfg: SweepConfig):
        self.cfg = cfg
        self.dir = Path(cfg.output_dir)
        self.started = time.monotonic()
        base = as_config(cfg, TrainConfig)
        if not cfg.val_size and not cfg.val_dataset:
            say("lorakit: sweep: no validation data given; holding out 10% (--val_size 0.1)")
            base = dataclasses.replace(base, val_size=0.1)
        self.base = base
        from ..data.encode import count_samples

        self.n_rows = count_samples(self.base)
        self.space = parse_params(cfg.param) if cfg.param else default_space(self.n_rows, cfg.budget_steps)
        self.results: dict[str, Trial] = {}
        self.memory = self._memory_budget()

    # -- trials
    def _memory_budget(self) -> int | None:
        if self.cfg.gpu_memory:
            from ..planning.memory import parse_memory

            return parse_memory(self.cfg.gpu_memory)
        import torch

        return torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None

    def trial_config(self, overrides: dict, max_steps: int, eval_steps: int) -> TrainConfig:
        values = dict(overrides)
        if "lora_r" in values and "lora_alpha" not in values:  # keep alpha / r (the guide: alpha = 2r)
            values["lora_alpha"] = self.base.lora_alpha / self.base.lora_r * values["lora_r"]
        tdir = self.dir / "trials" / slug(overrides)
        from ..training.checkpoints import complete_checkpoints

        unfinished = bool(complete_checkpoints(tdir)) and not (tdir / ADAPTER_CONFIG).exists()
        return dataclasses.replace(
            self.base,
            **values,
            output_dir=str(tdir),
            overwrite=False,
            max_steps=max_steps,
            eval_steps=eval_steps,
            save_steps=eval_steps,
            resume=unfinished,
        )

    def fits(self, tcfg: TrainConfig) -> bool:
        if self.memory is None:
            return True
        from ..planning.memory import make_plan

        plan = make_plan(as_config(tcfg, PlanConfig, gpu_memory=f"{self.memory / 1024**3:.3f}GiB"))
        return bool(plan.fits)

    def over_budget(self) -> bool:
        return (
            bool(self.cfg.budget_minutes) and time.monotonic() - self.started > 60 * self.cfg.budget_minutes
        )

    def run_trial(
        self,
        overrides: dict,
        max_steps: int,
        eval_steps: int,
        stop_at: int | None = None,
        callbacks: list | None = None,
    ) -> Trial:
        from ..training.monitor import metrics_rows
        from ..training.train import train

        tcfg = self.trial_config(overrides, max_steps, eval_steps)
        out = Path(tcfg.output_dir)
        trial = self.results.get(slug(overrides)) or Trial(overrides)
        trial.dir, trial.config = str(out), dataclasses.asdict(tcfg)
        self.results[slug(overrides)] = trial
        if not _finished(out) and not (stop_at and _last_step(out) >= stop_at):
            if not self.fits(tcfg):
                trial.status = "skipped: the planner says it does not fit"
                return trial
            train(tcfg, callbacks=callbacks, stop_at_step=stop_at)
        trial.evals = [
            (r["step"], r["eval_loss"])
            for r in metrics_rows(out)
            if "eval_loss" in r and not r.get("summary")
        ]
        trial.status = "finished" if _finished(out) else "paused"
        trial.steps = _last_step(out)
        trial.best_eval_loss = min((v for _, v in trial.evals), default=None)
        trial.last_eval_loss = trial.evals[-1][1] if trial.evals else None
        self.save()
        return trial

    # -- strategies
    def combos(self) -> list[dict]:
        names = sorted(self.space)
        return [dict(zip(names, values)) for values in itertools.product(*(self.space[n] for n in names))]

    def steps_budget(self) -> int:
        return self.cfg.budget_steps or self.base.total_steps(self.n_rows)

    def grid(self) -> None:
        steps = self.steps_budget()
        eval_steps = max(1, steps // 4)
        for overrides in self.combos():
            if self.over_budget():
                self.results.setdefault(slug(overrides), Trial(overrides, status="skipped: time budget"))
                continue
            self.run_trial(overrides, steps, eval_steps)

    def halving(self) -> None:
        rungs = max(1, self.cfg.halving_rungs)
        first = max(1, self.steps_budget() // 2 ** (rungs - 1))
        total = first * 2 ** (rungs - 1)  # every rung boundary is a multiple of the first rung
        alive = self.combos()
        for k in range(rungs):
            rung_steps = first * 2**k
            for overrides in alive:
                if self.over_budget():
                    break
                self.run_trial(overrides, total, first, stop_at=rung_steps if rung_steps < total else None)
            trials = [self.results[slug(o)] for o in alive if slug(o) in self.results]
            for t in trials:
                t.rungs.append(rung_steps)
            scored = sorted(
                (t for t in trials if t.last_eval_loss is not None), key=lambda t: t.last_eval_loss
            )
            if k < rungs - 1:
                keep = max(1, math.ceil(len(scored) / 2))
                for t in scored[keep:]:
                    t.status = f"stopped at rung {k + 1} ({rung_steps} steps)"
                alive = [t.overrides for t in scored[:keep]]
            self.save()

    def optuna(self) -> None:
        import optuna

        from ..training.trainer import OptunaPruning

        steps = self.steps_budget()
        eval_steps = max(1, steps // 4)
        self.dir.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            study_name="lorakit",
            storage=f"sqlite:///{self.dir / 'optuna.db'}",
            load_if_exists=True,
            direction="minimize",
            sampler=optuna.samplers.TPESampler(seed=self.cfg.seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2),
        )
        running = optuna.trial.TrialState.RUNNING
        for stale in [t for t in study.trials if t.state == running]:  # a killed sweep
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(stale.params)  # same settings, same directory: it resumes from its checkpoint
        ended = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        done = sum(t.state in ended for t in study.trials)

        def objective(study_trial):
            overrides = {
                name: study_trial.suggest_categorical(name, values) for name, values in self.space.items()
            }
            pruning = OptunaPruning(study_trial)
            trial = self.run_trial(overrides, steps, eval_steps, callbacks=[pruning])
            if pruning.pruned:
                trial.status = "pruned"
                self.save()
                raise optuna.TrialPruned()
            if trial.best_eval_loss is None:
                raise optuna.TrialPruned()
            return trial.best_eval_loss

        remaining = max(0, self.cfg.n_trials - done)
        timeout = 60 * self.cfg.budget_minutes if self.cfg.budget_minutes else None
        study.optimize(objective, n_trials=remaining, timeout=timeout, catch=())

    # -- results
    def ranked(self) -> list[Trial]:
        ok = [t for t in self.results.values() if t.best_eval_loss is not None]
        return sorted(ok, key=lambda t: t.best_eval_loss)

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        ranked = self.ranked()
        atomic_write_json(
            self.dir / "sweep.json",
            {
                "strategy": self.cfg.strategy,
                "space": self.space,
                "rows": self.n_rows,
                "trials": [dataclasses.asdict(t) for t in self.results.values()],
                "ranking": [t.dir for t in ranked],
                "best": dataclasses.asdict(ranked[0]) if ranked else None,
            },
        )

    def full_run_config(self, trial: Trial) -> TrainConfig:
        """The best trial's settings for a full run: the sweep's own schedule (num_epochs or
        max_steps, not the trial budget), validated as often as the trials were unless
        --eval_steps says otherwise."""
        cfg = self.cfg
        return TrainConfig(
            **{
                **trial.config,
                "output_dir": str(self.dir / "best"),
                "max_steps": cfg.max_steps,
                "eval_steps": cfg.eval_steps or trial.config["eval_steps"],
                "save_steps": cfg.save_steps,
                "resume": False,
                "overwrite": True,
            }
        )

    def report(self) -> Trial:
        ranked = self.ranked()
        self.save()
        if not ranked:
            raise LorakitError("no trial produced a validation loss (all skipped, pruned or over budget)")
        best = ranked[0]
        atomic_write_text(self.dir / "best.yaml", to_yaml(self.full_run_config(best)))
        names = sorted(self.space)
        others = [t for t in self.results.values() if t not in ranked]
        atomic_write_text(self.dir / "sweep.md", _markdown(self.cfg.strategy, names, ranked, others))
        self._plot(ranked)
        self._print(ranked, others, names)
        return best

    def _plot(self, ranked: list[Trial]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for t in ranked:
            ax.plot(*zip(*t.evals), "o-", label=slug(t.overrides)[:40])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        tmp = self.dir / ".sweep.png.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(self.dir / "sweep.png")

    def _print(self, ranked: list[Trial], others: list[Trial], names: list[str]) -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"Sweep ({self.cfg.strategy}), ranked by validation loss")
        for col in ["rank", *names, "best val loss", "steps", "status"]:
            t.add_column(col)
        for k, trial in enumerate(ranked + others, start=1):
            loss = f"{trial.best_eval_loss:.4f}" if trial.best_eval_loss is not None else "-"
            t.add_row(
                str(k) if trial in ranked else "-",
                *(str(trial.overrides.get(n)) for n in names),
                loss,
                str(trial.steps or "-"),
                trial.status,
            )
        Console().print(t)
        say(
            f"lorakit: best: {slug(ranked[0].overrides)}; train it in full with: "
            f"lorakit train --config {self.dir / 'best.yaml'}"
        )


def _markdown(strategy: str, names: list[str], ranked: list[Trial], others: list[Trial]) -> str:
    lines = [
        "| rank | " + " | ".join(names) + " | best val loss | last val loss | steps | status |",
        "|---|" + "---|" * len(names) + "---|---|---|---|",
    ]
    for k, t in enumerate(ranked + others, start=1):
        vals = " | ".join(f"{t.overrides.get(n)}" for n in names)
        best = f"{t.best_eval_loss:.4f}" if t.best_eval_loss is not None else "-"
        last = f"{t.last_eval_loss:.4f}" if t.last_eval_loss is not None else "-"
        lines.append(
            f"| {k if t in ranked else '-'} | {vals} | {best} | {last} | {t.steps or '-'} | {t.status} |"
        )
    return f"# Sweep ({strategy})\n\n" + "\n".join(lines) + "\n"


def _finished(out: Path) -> bool:
    from ..training.monitor import metrics_rows

    rows = metrics_rows(out)
    return (out / ADAPTER_CONFIG).is_file() and bool(rows) and rows[-1].get("status") == "finished"


def _last_step(out: Path) -> int:
    from ..training.monitor import metrics_rows

    return max((r.get("step", 0) for r in metrics_rows(out)), default=0)


def sweep(cfg: SweepConfig) -> Trial:
    s = Sweep(cfg)
    say(f"lorakit: sweep over {json.dumps(s.space)} ({cfg.strategy}) in {s.dir}")
    {"grid": s.grid, "halving": s.halving, "optuna": s.optuna}[cfg.strategy]()
    best = s.report()
    if cfg.train_best:
        from ..training.train import train

        train(s.full_run_config(best))
    return best
