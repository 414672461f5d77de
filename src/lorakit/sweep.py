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
from pathlib import Path

from .config import SweepConfig, TrainConfig, _coerce, to_yaml
from .errors import LorakitError
from .io import atomic_write_json, atomic_write_text

LR_LADDER = [1e-4, 2e-4, 5e-4, 1e-3]  # the guide's "try these in order"
SWEEPABLE = {f.name for f in dataclasses.fields(TrainConfig)} - {
    "output_dir",
    "overwrite",
    "resume",
    "resume_from_checkpoint",
    "resume_ignore_changes",
    "dataset",
    "val_dataset",
    "base_model",
    "val_size",
    "eval_steps",
    "save_steps",
    "logging_steps",
}


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
    if n_rows < 1000:
        ranks, epochs = [8, 16], [5, 10]
    elif n_rows <= 10000:
        ranks, epochs = [32, 64], [3, 5]
    else:
        ranks, epochs = [128, 256], [1, 3]
    space: dict[str, list] = {"learning_rate": LR_LADDER, "lora_r": ranks}
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
        base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
        if not cfg.val_size and not cfg.val_dataset:
            print("lorakit: sweep: no validation data given; holding out 10% (--val_size 0.1)", flush=True)
            base["val_size"] = 0.1
        self.base = TrainConfig(**base)
        from .data import load_samples

        train_rows, _, _ = load_samples(self.base)
        self.n_rows = len(train_rows)
        self.space = parse_params(cfg.param) if cfg.param else default_space(self.n_rows, cfg.budget_steps)
        self.results: dict[str, dict] = {}
        self.memory = self._memory_budget()

    # -- trials
    def _memory_budget(self) -> int | None:
        if self.cfg.gpu_memory:
            from .plan import parse_memory

            return parse_memory(self.cfg.gpu_memory)
        import torch

        return torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None

    def trial_config(self, overrides: dict, max_steps: int, eval_steps: int) -> TrainConfig:
        values = dict(overrides)
        if (
            "lora_r" in values and "lora_alpha" not in values
        ):  # keep the alpha / r ratio (the guide: alpha = 2r)
            values["lora_alpha"] = self.base.lora_alpha / self.base.lora_r * values["lora_r"]
        tdir = self.dir / "trials" / slug(overrides)
        cfg = dataclasses.replace(
            self.base,
            **values,
            output_dir=str(tdir),
            overwrite=False,
            max_steps=max_steps,
            eval_steps=eval_steps,
            save_steps=eval_steps,
            resume=False,
        )
        from .train import complete_checkpoints

        return dataclasses.replace(
            cfg, resume=bool(complete_checkpoints(tdir)) and not (tdir / "adapter_config.json").exists()
        )

    def fits(self, tcfg: TrainConfig) -> bool:
        if self.memory is None:
            return True
        from .config import PlanConfig
        from .plan import make_plan

        plan = make_plan(PlanConfig(**dataclasses.asdict(tcfg), gpu_memory=f"{self.memory / 1024**3:.3f}GiB"))
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
    ) -> dict:
        from .monitor import read_metrics
        from .train import train

        tcfg = self.trial_config(overrides, max_steps, eval_steps)
        key = slug(overrides)
        out = Path(tcfg.output_dir)
        record = {"overrides": overrides, "dir": str(out), "config": dataclasses.asdict(tcfg)}
        done = _finished(out)
        reached = _last_step(out)
        if not done and not (stop_at and reached >= stop_at):
            if not self.fits(tcfg):
                record.update(status="skipped: the planner says it does not fit")
                self.results[key] = record
                return record
            train(tcfg, callbacks=callbacks, stop_at_step=stop_at)
        evals = [
            (r["step"], r["eval_loss"])
            for r in read_metrics(out)
            if "eval_loss" in r and not r.get("summary")
        ]
        record.update(
            status="finished" if _finished(out) else "paused",
            steps=_last_step(out),
            evals=evals,
            best_eval_loss=min((v for _, v in evals), default=None),
            last_eval_loss=evals[-1][1] if evals else None,
        )
        self.results[key] = record
        self.save()
        return record

    # -- strategies
    def combos(self) -> list[dict]:
        names = sorted(self.space)
        return [dict(zip(names, values)) for values in itertools.product(*(self.space[n] for n in names))]

    def steps_budget(self) -> int:
        if self.cfg.budget_steps:
            return self.cfg.budget_steps
        from math import ceil

        per_epoch = ceil(ceil(self.n_rows / self.base.batch_size) / self.base.gradient_accumulation_steps)
        return (
            max(1, ceil(per_epoch * self.base.num_epochs)) if not self.base.max_steps else self.base.max_steps
        )

    def grid(self) -> None:
        steps = self.steps_budget()
        eval_steps = max(1, steps // 4)
        for overrides in self.combos():
            if self.over_budget():
                self.results.setdefault(
                    slug(overrides), {"overrides": overrides, "status": "skipped: time budget"}
                )
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
            scored = [o for o in alive if self.results.get(slug(o), {}).get("last_eval_loss") is not None]
            scored.sort(key=lambda o: self.results[slug(o)]["last_eval_loss"])
            for o in alive:
                if slug(o) in self.results:
                    self.results[slug(o)].setdefault("rungs", []).append(rung_steps)
            if k < rungs - 1:
                keep = max(1, math.ceil(len(scored) / 2))
                for o in scored[keep:]:
                    self.results[slug(o)]["status"] = f"stopped at rung {k + 1} ({rung_steps} steps)"
                alive = scored[:keep]
            self.save()

    def optuna(self) -> None:
        import optuna
        from transformers import TrainerCallback

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
        for stale in [
            t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING
        ]:  # a killed sweep
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(stale.params)  # same settings, same directory: it resumes from its checkpoint
        done = sum(
            t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            for t in study.trials
        )
        sweep = self

        def objective(trial):
            overrides = {
                name: trial.suggest_categorical(name, values) for name, values in sweep.space.items()
            }

            class Report(TrainerCallback):
                pruned = False

                def on_evaluate(self, args, state, control, metrics=None, **kw):
                    trial.report(metrics["eval_loss"], state.global_step)
                    if trial.should_prune():
                        Report.pruned = True
                        control.should_training_stop = True
                    return control

            record = sweep.run_trial(overrides, steps, eval_steps, callbacks=[Report()])
            if Report.pruned:
                record["status"] = "pruned"
                sweep.save()
                raise optuna.TrialPruned()
            if record.get("best_eval_loss") is None:
                raise optuna.TrialPruned()
            return record["best_eval_loss"]

        remaining = max(0, self.cfg.n_trials - done)
        timeout = 60 * self.cfg.budget_minutes if self.cfg.budget_minutes else None
        study.optimize(objective, n_trials=remaining, timeout=timeout, catch=())

    # -- results
    def ranked(self) -> list[dict]:
        ok = [r for r in self.results.values() if r.get("best_eval_loss") is not None]
        return sorted(ok, key=lambda r: r["best_eval_loss"])

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        ranked = self.ranked()
        atomic_write_json(
            self.dir / "sweep.json",
            {
                "strategy": self.cfg.strategy,
                "space": self.space,
                "rows": self.n_rows,
                "trials": list(self.results.values()),
                "ranking": [r["dir"] for r in ranked],
                "best": ranked[0] if ranked else None,
            },
        )

    def report(self) -> dict | None:
        ranked = self.ranked()
        self.save()
        if not ranked:
            raise LorakitError("no trial produced a validation loss (all skipped, pruned or over budget)")
        best = ranked[0]
        best_cfg = TrainConfig(**{**best["config"], "output_dir": str(self.dir / "best"), "resume": False})
        atomic_write_text(self.dir / "best.yaml", to_yaml(best_cfg))
        names = sorted(self.space)
        lines = [
            "| rank | " + " | ".join(names) + " | best val loss | last val loss | steps | status |",
            "|---|" + "---|" * len(names) + "---|---|---|---|",
        ]
        others = [r for r in self.results.values() if r not in ranked]
        for k, r in enumerate(ranked + others, start=1):
            vals = " | ".join(f"{r['overrides'].get(n)}" for n in names)
            bl = f"{r['best_eval_loss']:.4f}" if r.get("best_eval_loss") is not None else "-"
            ll = f"{r['last_eval_loss']:.4f}" if r.get("last_eval_loss") is not None else "-"
            lines.append(
                f"| {k if r in ranked else '-'} | {vals} | {bl} | {ll} | {r.get('steps', '-')} | {r.get('status')} |"
            )
        atomic_write_text(
            self.dir / "sweep.md", f"# Sweep ({self.cfg.strategy})\n\n" + "\n".join(lines) + "\n"
        )
        self._plot(ranked)
        self._print(ranked, others, names)
        return best

    def _plot(self, ranked: list[dict]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r in ranked:
            ax.plot(*zip(*r["evals"]), "o-", label=slug(r["overrides"])[:40])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        tmp = self.dir / ".sweep.png.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(self.dir / "sweep.png")

    def _print(self, ranked, others, names) -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"Sweep ({self.cfg.strategy}), ranked by validation loss")
        for col in ["rank", *names, "best val loss", "steps", "status"]:
            t.add_column(col)
        for k, r in enumerate(ranked, start=1):
            t.add_row(
                str(k),
                *(str(r["overrides"].get(n)) for n in names),
                f"{r['best_eval_loss']:.4f}",
                str(r.get("steps")),
                r.get("status", ""),
            )
        for r in others:
            t.add_row(
                "-",
                *(str(r["overrides"].get(n)) for n in names),
                "-",
                str(r.get("steps", "-")),
                r.get("status", ""),
            )
        Console().print(t)
        print(
            f"lorakit: best: {slug(ranked[0]['overrides'])}; run it with: lorakit train --config {self.dir / 'best.yaml'}"
        )


def _finished(out: Path) -> bool:
    from .monitor import read_metrics

    rows = read_metrics(out)
    return (out / "adapter_config.json").is_file() and bool(rows) and rows[-1].get("status") == "finished"


def _last_step(out: Path) -> int:
    from .monitor import read_metrics

    return max((r.get("step", 0) for r in read_metrics(out)), default=0)


def sweep(cfg: SweepConfig) -> dict:
    s = Sweep(cfg)
    print(f"lorakit: sweep over {json.dumps(s.space)} ({cfg.strategy}) in {s.dir}", flush=True)
    {"grid": s.grid, "halving": s.halving, "optuna": s.optuna}[cfg.strategy]()
    best = s.report()
    if cfg.train_best:
        from .train import train

        full = TrainConfig(
            **{
                **best["config"],
                "output_dir": str(s.dir / "best"),
                "max_steps": cfg.max_steps,
                "eval_steps": cfg.eval_steps,
                "save_steps": cfg.save_steps,
                "resume": False,
                "overwrite": True,
            }
        )
        train(full)
    return best
