"""`lorakit sweep` on a tiny model: ranking, successive halving, resume, best.yaml."""

import json

import pytest

from lorakit.core.config import SweepConfig, TrainConfig
from lorakit.core.errors import LorakitError
from lorakit.core.fields import resolve
from lorakit.training.monitor import metrics_rows
from lorakit.workflows.sweep import default_space, parse_params, sweep

from ..conftest import assemble_rows, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "d.jsonl", assemble_rows(40))


def sweep_cfg(base, data, out, **kw):
    settings = dict(
        base_model=str(base),
        dataset=str(data),
        output_dir=str(out),
        batch_size=8,
        gradient_accumulation_steps=1,
        lora_r=8,
        lora_dropout=0.0,
        warmup_steps=0,
        val_size=8,
        logging_steps=1,
        budget_steps=12,
        lr_scheduler_type="constant_with_warmup",
        system_prompt="",
    )
    settings.update(kw)
    return SweepConfig(**settings)


def test_params_and_defaults():
    assert parse_params(["learning_rate=1e-4,2e-4", "lora_r=8,16"]) == {
        "learning_rate": [1e-4, 2e-4],
        "lora_r": [8, 16],
    }
    with pytest.raises(LorakitError, match="did you mean 'learning_rate'"):
        parse_params(["learning_rat=1"])
    with pytest.raises(LorakitError, match="must be int"):
        parse_params(["lora_r=8.5"])
    assert default_space(500, 0) == {
        "learning_rate": [1e-4, 2e-4, 5e-4, 1e-3],
        "lora_r": [8, 16],
        "num_epochs": [5.0, 10.0],
    }
    assert default_space(5000, 100)["lora_r"] == [32, 64] and "num_epochs" not in default_space(5000, 100)
    assert default_space(50000, 0)["num_epochs"] == [1.0, 3.0]
    cfg = resolve(SweepConfig, {"param": ["learning_rate=1e-3", "lora_r=4,8"]})
    assert cfg.param == ["learning_rate=1e-3", "lora_r=4,8"]


@pytest.mark.slow
def test_grid_ranks_the_clearly_best_learning_rate_first(tmp_path, tiny_llama, data):
    lrs = [1e-6, 1e-5, 1e-4, 3e-2]
    best = sweep(
        sweep_cfg(tiny_llama, data, tmp_path / "s", param=[f"learning_rate={','.join(map(str, lrs))}"])
    )
    result = json.loads((tmp_path / "s" / "sweep.json").read_text())
    order = [
        t["overrides"]["learning_rate"] for t in sorted(result["trials"], key=lambda t: t["best_eval_loss"])
    ]
    assert order == sorted(lrs, reverse=True)  # higher is better here, up to the clearly best 3e-2
    assert best.overrides["learning_rate"] == 3e-2
    for name in ("sweep.md", "sweep.png", "best.yaml"):
        assert (tmp_path / "s" / name).is_file()
    # best.yaml re-runs the best trial exactly (same seed): same validation losses.
    from lorakit.training.train import train

    again = train(resolve(TrainConfig, config_file=str(tmp_path / "s" / "best.yaml")))
    evals = [
        (r["step"], r["eval_loss"]) for r in metrics_rows(again) if "eval_loss" in r and not r.get("summary")
    ]
    assert [list(e) for e in evals] == [list(e) for e in best.evals]


@pytest.mark.slow
def test_halving_runs_the_configured_steps_per_rung(tmp_path, tiny_llama, data):
    cfg = sweep_cfg(
        tiny_llama,
        data,
        tmp_path / "h",
        strategy="halving",
        halving_rungs=3,
        budget_steps=8,
        param=["learning_rate=1e-6,1e-5,1e-4,3e-2"],
    )
    sweep(cfg)
    steps = sorted(max(r["step"] for r in metrics_rows(d)) for d in (tmp_path / "h" / "trials").iterdir())
    assert steps == [2, 2, 4, 8]  # 4 configs x 2 steps, the best 2 to 4 steps, the best 1 to 8
    result = json.loads((tmp_path / "h" / "sweep.json").read_text())
    assert result["best"]["overrides"]["learning_rate"] == 3e-2 and result["best"]["status"] == "finished"


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, tiny_llama, data, monkeypatch):
    import lorakit.training.train as lt

    real, calls = lt.train, []

    def counting(cfg, *a, **kw):
        calls.append(cfg.learning_rate)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the sweep is killed during its third trial
        return real(cfg, *a, **kw)

    monkeypatch.setattr(lt, "train", counting)
    cfg = sweep_cfg(tiny_llama, data, tmp_path / "k", param=["learning_rate=1e-5,1e-4,1e-3"], budget_steps=6)
    with pytest.raises(KeyboardInterrupt):
        sweep(cfg)
    calls.clear()
    sweep(cfg)
    assert calls == [1e-3]  # only the unfinished trial trains again
    result = json.loads((tmp_path / "k" / "sweep.json").read_text())
    assert sorted(t["status"] for t in result["trials"]) == ["finished"] * 3


@pytest.mark.slow
def test_optuna_strategy(tmp_path, tiny_llama, data):
    pytest.importorskip("optuna")
    sweep(
        sweep_cfg(
            tiny_llama,
            data,
            tmp_path / "o",
            strategy="optuna",
            n_trials=3,
            budget_steps=6,
            param=["learning_rate=1e-5,1e-3,3e-2", "lora_r=4,8"],
        )
    )
    result = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert (tmp_path / "o" / "optuna.db").is_file() and 1 <= len(result["trials"]) <= 3 and result["best"]
