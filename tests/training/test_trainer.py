"""The trainer for unattended runs: exact resume, signals, checkpoints, early stopping, NaN guard,
out-of-memory backoff, QLoRA, monitoring outputs."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lorakit.core.errors import LorakitError
from lorakit.training.checkpoints import CHECKPOINT_MARKER, complete_checkpoints
from lorakit.training.train import train

from ..conftest import assemble_rows, inject_oom, write_jsonl
from ..conftest import tiny_train_config as base_cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", assemble_rows(64))


def run_args(base, data, out, *extra):
    return [
        "--base_model",
        str(base),
        "--dataset",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        "40",
        "--save_steps",
        "5",
        "--batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--lora_dropout",
        "0.1",
        "--logging_steps",
        "1",
        "--warmup_steps",
        "0",
        "--lora_r",
        "4",
        "--learning_rate",
        "1e-3",
        *extra,
    ]


def lorakit(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "lorakit", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def wait_for(path, proc, timeout=120):
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.01)
    return False


def adapters_equal(a, b):
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, tiny_llama, data):
    """Bit-identical on CPU: same data order (sampler state), RNG states (LoRA dropout is on),
    optimizer and scheduler state are all restored from the checkpoint."""
    full = lorakit(*run_args(tiny_llama, data, tmp_path / "full"))
    assert full.wait(300) == 0, full.stdout.read()[-2000:]
    killed = lorakit(*run_args(tiny_llama, data, tmp_path / "killed"))
    assert wait_for(tmp_path / "killed" / "checkpoint-10" / CHECKPOINT_MARKER, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists(), "killed before the end"
    resumed = lorakit(*run_args(tiny_llama, data, tmp_path / "killed", "--resume"))
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log[-2000:]
    assert "resuming from" in log
    assert adapters_equal(tmp_path / "full", tmp_path / "killed")
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in x and '"summary"' not in x
    ]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) == 40  # no duplicated or missing steps


@pytest.mark.slow
def test_sigterm_leaves_loadable_checkpoint(tmp_path, tiny_llama, data):
    proc = lorakit(
        *run_args(tiny_llama, data, tmp_path / "o", "--save_steps", "1000", "--max_steps", "100000")
    )
    assert wait_for(tmp_path / "o" / "metrics.jsonl", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, log[-2000:]
    assert "Traceback" not in log and "--resume" in log
    [ckpt] = complete_checkpoints(tmp_path / "o")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(ckpt))
    assert any("lora_" in n for n, _ in model.named_parameters())
    assert json.loads((ckpt / CHECKPOINT_MARKER).read_text())["step"] == int(ckpt.name.split("-")[1])


def test_partial_checkpoint_is_never_resumed(tmp_path, tiny_llama, data):
    out = train(base_cfg(tiny_llama, data, tmp_path / "o", max_steps=8))
    good = complete_checkpoints(out)[-1]
    # A newer checkpoint directory cut short by a crash: no marker written.
    partial = out / "checkpoint-999"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    assert complete_checkpoints(out)[-1] == good
    # No temporary checkpoint directories are left after a normal run.
    assert not list(out.glob(".checkpoint-*"))


def test_resume_refuses_changed_settings_and_data(tmp_path, tiny_llama, data):
    out = tmp_path / "o"
    cfg = base_cfg(tiny_llama, data, out, max_steps=4)
    train(cfg)
    with pytest.raises(LorakitError, match=r"'lora_r' changed from 4 to 8.*--resume_ignore_changes"):
        train(base_cfg(tiny_llama, data, out, max_steps=8, lora_r=8, resume=True))
    other = write_jsonl(
        tmp_path / "other.jsonl",
        [{"instruction": "x", "output": "y"}] * 1 + [{"instruction": "z", "output": "w"}],
    )
    with pytest.raises(LorakitError, match="the dataset .* changed"):
        train(base_cfg(tiny_llama, other, out, max_steps=4, resume=True))
    with pytest.raises(LorakitError, match="'system_prompt' changed"):
        train(base_cfg(tiny_llama, data, out, max_steps=4, resume=True, system_prompt="Another."))


def test_unfinished_run_needs_resume_or_overwrite(tmp_path, tiny_llama, data):
    out = tmp_path / "o"
    train(base_cfg(tiny_llama, data, out, max_steps=4))
    (out / "adapter_config.json").unlink()  # as if the run had stopped before the end
    with pytest.raises(LorakitError, match="unfinished run: pass --resume"):
        train(base_cfg(tiny_llama, data, out, max_steps=4))


def test_early_stopping_restores_best_checkpoint(tmp_path, tiny_llama, data):
    # A learning rate far too high makes validation loss rise after the first evaluations.
    out = train(
        base_cfg(
            tiny_llama,
            data,
            tmp_path / "o",
            max_steps=60,
            learning_rate=0.3,
            val_size=0.25,
            eval_steps=2,
            early_stopping_patience=2,
            save_total_limit=10,
        )
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and not r.get("summary")]
    summary = rows[-1]
    best_step, best = min(evals, key=lambda e: e[1])
    assert summary["steps"] < 60, "stopped early"
    assert summary["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    # The final adapter is the best checkpoint's, not the last step's.
    assert adapters_equal(out, out / f"checkpoint-{best_step}")
    assert evals[-1][1] > best


def poison_embeddings(monkeypatch, when):
    """Make the model's own forward produce NaN on the training calls `when(call_number, model)` selects."""
    import lorakit.training.train as lt

    real = lt.add_lora
    calls = {"n": 0}

    def add_lora(cfg, model):
        model = real(cfg, model)

        def hook(module, args, output):
            if module.training:
                calls["n"] += 1
                if when(calls["n"]):
                    return output * float("nan")
            return output

        model.get_input_embeddings().register_forward_hook(hook)
        return model

    monkeypatch.setattr(lt, "add_lora", add_lora)


def test_nan_guard_skips_the_step_and_names_rows(tmp_path, tiny_llama, data, monkeypatch):
    poison_embeddings(monkeypatch, lambda n: n == 3)  # the third micro-batch = optimizer step 3
    out = train(base_cfg(tiny_llama, data, tmp_path / "o", max_steps=6))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = rows[-1]
    [event] = summary["nonfinite_steps"]
    assert event["step"] == 3 and event["kind"] == "loss"
    assert len(event["rows"]) == 4 and all(r.startswith(str(data) + ":") for r in event["rows"])  # file:line
    assert summary["steps"] == 6 and summary["status"] == "finished"
    adapter = load_file(out / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in adapter.values())


def test_nan_guard_step_changes_nothing(tmp_path, tiny_llama, data, monkeypatch):
    """A skipped step leaves the weights exactly as they were (AdamW skips params without grads)."""
    poison_embeddings(monkeypatch, lambda n: n == 5)
    out = train(base_cfg(tiny_llama, data, tmp_path / "o", max_steps=5, save_steps=1, save_total_limit=10))
    assert adapters_equal(out / "checkpoint-4", out / "checkpoint-5")
    assert not adapters_equal(out / "checkpoint-3", out / "checkpoint-4")


def test_nan_guard_stops_after_consecutive_hits(tmp_path, tiny_llama, data, monkeypatch):
    poison_embeddings(monkeypatch, lambda n: n > 4)
    # Steps 5, 6 and 7 are poisoned: each is skipped, the run stops after the third; the checkpoint
    # at step 6 holds the weights of step 4 (skipped steps change nothing) and none is written at 7.
    with pytest.raises(
        LorakitError, match="training diverged: 3 consecutive steps.*last good checkpoint: .*checkpoint-6"
    ):
        train(base_cfg(tiny_llama, data, tmp_path / "o", max_steps=20, save_steps=2, save_total_limit=10))
    [*_, before, last] = complete_checkpoints(tmp_path / "o")
    assert (before.name, last.name) == ("checkpoint-4", "checkpoint-6")
    assert adapters_equal(before, last)
    assert all(torch.isfinite(v).all() for v in load_file(last / "adapter_model.safetensors").values())
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_oom_backoff_keeps_effective_batch_and_finishes(tmp_path, tiny_llama, data, monkeypatch):
    seen = inject_oom(
        monkeypatch, lambda state, args, seen: state.global_step == 3 and args.per_device_train_batch_size > 1
    )
    out = train(
        base_cfg(
            tiny_llama,
            data,
            tmp_path / "o",
            max_steps=8,
            batch_size=4,
            gradient_accumulation_steps=2,
            regroup_micro_batches=False,  # the Trainer itself sees the row micro-batches
        )
    )
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["steps"] == 8 and summary["status"] == "finished"
    assert [(b["batch_size"], b["gradient_accumulation_steps"]) for b in summary["oom_backoffs"]] == [
        (2, 4),
        (1, 8),
    ]
    assert all(bs * ga == 8 for _, bs, ga in seen)  # the effective batch never changed
    assert seen[-1][1:] == (1, 8) and min(s for s, bs, _ in seen if bs == 1) == 3  # continued from step 3


def test_oom_backoff_with_regrouped_rows_halves_the_row_cut(tmp_path, tiny_llama, data, monkeypatch):
    import lorakit.training.batching as lkdata

    seen = inject_oom(  # the first start of step 3 only
        monkeypatch,
        lambda state, args, seen: state.global_step == 3 and [s for s, _, _ in seen].count(3) == 1,
    )
    budgets = []
    real_init = lkdata.Collator.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        budgets.append(self.regroup_rows)

    monkeypatch.setattr(lkdata.Collator, "__init__", init)
    out = train(
        base_cfg(tiny_llama, data, tmp_path / "o", max_steps=8, batch_size=4, gradient_accumulation_steps=2)
    )
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["steps"] == 8 and summary["status"] == "finished"
    assert [(b["batch_size"], b["gradient_accumulation_steps"]) for b in summary["oom_backoffs"]] == [(2, 4)]
    assert {(bs, ga) for _, bs, ga in seen} == {
        (8, 1)
    }  # the Trainer gets whole steps; the collator cuts them
    assert budgets[:2] == [4, 2]  # rows of the cut's budget: batch_size x the step's longest row
    assert "batch_size: 2" in (out / "lorakit.yaml").read_text()


def test_oom_at_batch_one_gives_advice(tmp_path, tiny_llama, data, monkeypatch):
    inject_oom(monkeypatch, lambda state, args, seen: True)
    with pytest.raises(
        LorakitError,
        match="out of memory at step 0 with batch_size 1, gradient_accumulation_steps 2: use --gradient_checkpointing",
    ):
        train(base_cfg(tiny_llama, data, tmp_path / "o", batch_size=2))


def test_tensorboard_events_have_train_and_eval_loss(tmp_path, tiny_llama, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train(base_cfg(tiny_llama, data, tmp_path / "o", max_steps=4, val_size=8, eval_steps=2))
    [run] = list((out / "runs").iterdir())
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" in tags
    assert len(acc.Scalars("eval/loss")) == 2
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((out / "manifest.json").read_text())
    for key in (
        "config",
        "versions",
        "hardware",
        "data_sha256",
        "chat_template_sha256",
        "seed",
        "started",
        "ended",
        "final_metrics",
    ):
        assert key in manifest
    assert manifest["versions"]["torch"] == torch.__version__.split("+")[0] or manifest["versions"][
        "torch"
    ].startswith("2.")


def test_rslora_and_dora_switches(tmp_path, tiny_llama, data):
    out = train(base_cfg(tiny_llama, data, tmp_path / "o", max_steps=2, use_rslora=True, use_dora=True))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["use_dora"]
    assert any("lora_magnitude_vector" in k for k in load_file(out / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "flag,bf16", [("load_in_4bit", False), ("load_in_8bit", False), ("load_in_4bit", True)]
)
def test_quantized_base_trains_on_this_machine(tmp_path, tiny_llama, data, flag, bf16, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import lorakit.training.train as lt

    real, layers = lt.load_training_model, []

    def spy(cfg, base, precision, attention=None):
        model = real(cfg, base, precision, attention)
        layers.extend(
            type(m) for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
        )
        # A bf16 run keeps the embedding (tied to the LM head here) in bf16; otherwise PEFT's fp32.
        assert model.get_input_embeddings().weight.dtype == (torch.bfloat16 if bf16 else torch.float32)
        return model

    monkeypatch.setattr(lt, "load_training_model", spy)
    out = train(base_cfg(tiny_llama, data, tmp_path / "o", max_steps=3, bf16=bf16, **{flag: True}))
    assert len(layers) == 14  # 7 projections x 2 layers really are quantized
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    # The adapter trained on a quantized base loads onto the plain base.
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(out))


class _State:
    def __init__(self, step):
        self.global_step = step


def test_health_warnings(capsys):
    from lorakit.training.monitor import HealthWatch

    flat = HealthWatch(no_progress_steps=10)
    for step in range(1, 13):
        flat.on_log(None, _State(step), None, logs={"loss": 2.0 + 0.01 * (step % 2)})
    assert (
        "has not fallen after 10 steps" in capsys.readouterr().out
        and "lorakit data check" in flat.messages[0]
    )

    falling = HealthWatch(no_progress_steps=10)
    for step in range(1, 13):
        falling.on_log(None, _State(step), None, logs={"loss": 2.0 / step})
    assert not falling.messages

    over = HealthWatch(no_progress_steps=0)
    for step, (train_loss, val) in enumerate([(2.0, 1.9), (1.5, 1.6), (1.0, 1.7), (0.5, 1.8)], start=1):
        over.on_log(None, _State(step), None, logs={"loss": train_loss})
        over.on_log(None, _State(step), None, logs={"eval_loss": val})
    assert len(over.messages) == 1 and over.messages[0].startswith("overfitting: validation loss rose")


def test_resume_refuses_changed_chat_template(tmp_path, tiny_llama, data):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    out = tmp_path / "o"
    train(base_cfg(base, data, out, max_steps=4))
    template = (base / "chat_template.jinja").read_text()
    (base / "chat_template.jinja").write_text(template.replace("<|im_start|>", "<|im_start|> "))
    with pytest.raises(LorakitError, match="the chat template changed"):
        train(base_cfg(base, data, out, max_steps=4, resume=True))


def test_optimizer_trackers_and_run_name_reach_the_trainer(tmp_path):
    from lorakit.core.config import TrainConfig
    from lorakit.core.errors import LorakitError
    from lorakit.planning.memory import optimizer_state_bytes
    from lorakit.training.trainer import training_arguments

    cfg = TrainConfig(optim="paged_adamw_8bit", report_to=["none"], run_name="trial-3")
    args = training_arguments(cfg, tmp_path / "out", "no", 10, False)
    assert args.optim == "paged_adamw_8bit" and args.report_to == [] and args.run_name == "trial-3"
    args = training_arguments(TrainConfig(), tmp_path / "run-a", "no", 10, False)
    # auto: fused AdamW only where CUDA runs it
    assert args.optim == ("adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch")
    assert args.report_to == ["tensorboard"] and args.run_name == "run-a"
    with pytest.raises(LorakitError, match="--optim 'adam_w': must be auto or an optimizer name"):
        TrainConfig(optim="adam_w")
    with pytest.raises(LorakitError, match="--report_to"):
        TrainConfig(report_to=["none", "wandb"])
    assert optimizer_state_bytes("paged_adamw_8bit") * 4 == optimizer_state_bytes("adamw_torch")
