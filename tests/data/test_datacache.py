"""The encoded-dataset cache: encode once, reuse everywhere; any changed input misses."""

from __future__ import annotations

import pytest

from lorakit.core.config import DataCheckConfig, SweepConfig
from lorakit.data import encode as data_module
from lorakit.data.encode import encode_data, load_samples
from lorakit.data.template import ChatFormat

from ..conftest import tiny_train_config, write_jsonl


@pytest.fixture
def cold_cache(tmp_path, monkeypatch, smol_dir):
    """An empty data cache (the converted SmolLM2 stays where it is: only the data cache moves)."""
    from lorakit.data import cache as datacache

    monkeypatch.setattr(datacache, "cache_dir", lambda: tmp_path / "data-cache")
    return tmp_path / "data-cache"


@pytest.fixture
def encoder_calls(monkeypatch):
    """How many times a dataset was encoded (its training and validation rows together)."""
    calls: list[str] = []
    for name in ("_encode_into_cache", "_encode_in_memory"):
        real = getattr(data_module, name)

        def counting(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(data_module, name, counting)
    return calls


@pytest.fixture
def rows(tmp_path):
    return write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": f"Assemble {i}.", "output": f"A9 {i:02X}"} for i in range(24)]
    )


def encode(cfg, tokenizer):
    return encode_data(None, ChatFormat(tokenizer), cfg)


def test_a_hit_returns_the_same_rows_report_and_digest(cold_cache, encoder_calls, rows, smol_tokenizer):
    cfg = DataCheckConfig(dataset=str(rows), val_size=4)
    first = encode(cfg, smol_tokenizer)
    second = encode(cfg, smol_tokenizer)
    assert encoder_calls == ["_encode_into_cache"]  # the first time only
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
    from lorakit.training.train import train
    from lorakit.workflows.sweep import sweep

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
    assert len(encoder_calls) == 1  # 4 trials: one encoding of the training and validation rows
    out = tmp_path / "run"
    train(tiny_train_config(tiny_llama, rows, out, max_steps=4, save_steps=2, val_size=4))
    (out / "adapter_config.json").unlink()  # as if stopped before the end
    train(tiny_train_config(tiny_llama, rows, out, max_steps=4, save_steps=2, val_size=4, resume=True))
    assert len(encoder_calls) == 1  # the run and its resume read the same cached encoding


def test_data_cache_command_lists_and_clears(cold_cache, rows, smol_tokenizer, capsys):
    from lorakit.cli import main

    encode(DataCheckConfig(dataset=str(rows)), smol_tokenizer)
    assert main(["data", "cache"]) == 0
    assert str(rows) in capsys.readouterr().out
    assert main(["data", "cache", "--clear"]) == 0
    assert "removed 1 cached encodings" in capsys.readouterr().out and not list(cold_cache.iterdir())


def _messy_rows(tmp_path):
    """Rows with everything the pipeline sorts out: duplicates, bad rows, long rows."""
    rows = [{"instruction": f"Assemble {i}.", "output": f"A9 {i:02X}"} for i in range(40)]
    rows[7] = dict(rows[3])  # an exact duplicate
    rows[11] = {"instruction": "no answer", "output": " "}  # a bad row
    rows[19] = {"instruction": "word " * 120, "output": "long"}  # over max_seq_length 64
    rows[23] = {"instruction": "Assemble 23.", "output": "A9 17 " * 40}  # long answer: truncated
    path = write_jsonl(tmp_path / "messy.jsonl", rows)
    with open(path, "a") as f:
        f.write("not json\n")
    return path


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize(
    "settings",
    [
        {"val_size": 0.2, "overlength": "truncate"},
        {"val_size": 0, "overlength": "drop", "train_on": "last_assistant"},
        {"val_dataset": "VAL", "overlength": "truncate"},
    ],
)
def test_the_streamed_encoding_equals_the_in_memory_one(
    cold_cache, monkeypatch, tmp_path, smol_tokenizer, settings, parallel
):
    """The streaming path (chunks, worker processes, split by place) gives exactly the rows,
    report and digest of encoding load_samples() in memory."""
    data = _messy_rows(tmp_path)
    if settings.get("val_dataset"):
        val = [{"instruction": f"Assemble {i}.", "output": f"A9 {i:02X}"} for i in (2, 5, 50, 51)]
        settings = {**settings, "val_dataset": str(write_jsonl(tmp_path / "val.jsonl", val))}
    cfg = DataCheckConfig(dataset=str(data), max_seq_length=64, skip_bad_rows=True, seed=3, **settings)
    monkeypatch.setattr(data_module, "ENCODE_CHUNK", 8)  # several chunks, and rows cut across them
    monkeypatch.setattr(data_module, "PARALLEL_MIN_BYTES", 0 if parallel else 1 << 40)
    chat = ChatFormat(smol_tokenizer)
    streamed = encode_data(None, chat, cfg)
    in_memory = encode_data(load_samples(cfg), chat, cfg, cache=False)
    assert type(streamed.train).__name__ == "EncodedRows" and isinstance(in_memory.train, list)
    assert list(streamed.train) == in_memory.train and list(streamed.val) == in_memory.val
    assert streamed.report == in_memory.report and streamed.digest == in_memory.digest
    report = streamed.report
    assert report.duplicates and report.skipped and (report.truncated or report.dropped_overlength)
    if settings.get("val_dataset"):
        assert report.val_leaks_removed == 2 and report.val_rows == 2


def test_a_bad_row_stops_the_stream_with_its_line(cold_cache, tmp_path, smol_tokenizer):
    from lorakit.core.errors import LorakitError

    data = _messy_rows(tmp_path)
    with pytest.raises(LorakitError, match=r"messy.jsonl:41: invalid JSON"):
        encode(DataCheckConfig(dataset=str(data)), smol_tokenizer)
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(LorakitError, match=r"messy.jsonl:12: key 'output' is empty.*--skip_bad_rows"):
        encode(DataCheckConfig(dataset=str(data), max_seq_length=64), smol_tokenizer)
    assert not list(cold_cache.glob("*"))  # nothing half-written left behind
