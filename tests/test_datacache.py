"""The encoded-dataset cache: encode once, reuse everywhere; any changed input misses."""

from __future__ import annotations

import pytest

from lorakit import data as data_module
from lorakit.config import DataCheckConfig, SweepConfig
from lorakit.data import ChatFormat, encode_data, load_samples

from .conftest import tiny_train_config, write_jsonl


@pytest.fixture
def cold_cache(tmp_path, monkeypatch, smol_dir):
    """An empty data cache (the converted SmolLM2 stays where it is: only the data cache moves)."""
    from lorakit import datacache

    monkeypatch.setattr(datacache, "cache_dir", lambda: tmp_path / "data-cache")
    return tmp_path / "data-cache"


@pytest.fixture
def encoder_calls(monkeypatch):
    """How many times rows were encoded (one call per split of a dataset)."""
    calls: list[int] = []
    real = data_module.encode_samples

    def counting(samples, *a, **kw):
        if samples:
            calls.append(len(samples))
        return real(samples, *a, **kw)

    monkeypatch.setattr(data_module, "encode_samples", counting)
    return calls


@pytest.fixture
def rows(tmp_path):
    return write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": f"Assemble {i}.", "output": f"A9 {i:02X}"} for i in range(24)]
    )


def encode(cfg, tokenizer):
    return encode_data(load_samples(cfg), ChatFormat(tokenizer), cfg)


def test_a_hit_returns_the_same_rows_report_and_digest(cold_cache, encoder_calls, rows, smol_tokenizer):
    cfg = DataCheckConfig(dataset=str(rows), val_size=4)
    first = encode(cfg, smol_tokenizer)
    second = encode(cfg, smol_tokenizer)
    assert len(encoder_calls) == 2  # the first time: training and validation rows, once each
    assert list(second.train) == list(first.train) and list(second.val) == list(first.val)
    assert second.digest == first.digest and second.report == first.report
    assert len(list(cold_cache.iterdir())) == 1


def test_every_input_that_changes_the_encoding_misses(
    cold_cache, encoder_calls, tmp_path, rows, smol_tokenizer
):
    import copy

    base = DataCheckConfig(dataset=str(rows))
    encode(base, smol_tokenizer)
    assert len(encoder_calls) == 1
    # Settings that do not change the encoding: hits.
    encode(DataCheckConfig(dataset=str(rows), preview=9, plot="x.png"), smol_tokenizer)
    assert len(encoder_calls) == 1
    # One byte of the data.
    text = rows.read_text()
    rows.write_text(text.replace("A9 00", "A9 01", 1))
    encode(base, smol_tokenizer)
    assert len(encoder_calls) == 2
    # The system prompt, the length limit, the turns trained on.
    for changed in ({"system_prompt": "Be brief."}, {"max_seq_length": 512}, {"train_on": "last_assistant"}):
        encode(DataCheckConfig(dataset=str(rows), **changed), smol_tokenizer)
    assert len(encoder_calls) == 5
    # The chat template.
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ", 1)
    encode(base, tok)
    assert len(encoder_calls) == 6
    # And everything again: all hits.
    encode(base, smol_tokenizer)
    encode(DataCheckConfig(dataset=str(rows), system_prompt="Be brief."), smol_tokenizer)
    assert len(encoder_calls) == 6


@pytest.mark.slow
def test_a_sweep_and_a_resume_encode_the_data_once(cold_cache, encoder_calls, tmp_path, rows, tiny_llama):
    from lorakit.sweep import sweep
    from lorakit.train import train

    sweep(
        SweepConfig(
            base_model=str(tiny_llama),
            dataset=str(rows),
            output_dir=str(tmp_path / "s"),
            batch_size=4,
            gradient_accumulation_steps=1,
            lora_r=4,
            val_size=4,
            budget_steps=2,
            param=["learning_rate=1e-4,2e-4,5e-4,1e-3"],
        )
    )
    assert len(encoder_calls) == 2  # 4 trials: one encoding of the training and validation rows
    out = tmp_path / "run"
    train(tiny_train_config(tiny_llama, rows, out, max_steps=4, save_steps=2, val_size=4))
    (out / "adapter_config.json").unlink()  # as if stopped before the end
    train(tiny_train_config(tiny_llama, rows, out, max_steps=4, save_steps=2, val_size=4, resume=True))
    assert len(encoder_calls) == 2  # the run and its resume read the same cached encoding


def test_data_cache_command_lists_and_clears(cold_cache, rows, smol_tokenizer, capsys):
    from lorakit.cli import main

    encode(DataCheckConfig(dataset=str(rows)), smol_tokenizer)
    assert main(["data", "cache"]) == 0
    assert str(rows) in capsys.readouterr().out
    assert main(["data", "cache", "--clear"]) == 0
    assert "removed 1 cached encodings" in capsys.readouterr().out and not list(cold_cache.iterdir())
