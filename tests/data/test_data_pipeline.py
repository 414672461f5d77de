import copy
import json

import pytest

from lorakit.cli import main
from lorakit.core.config import DataCheckConfig, DataConvertConfig, TrainConfig
from lorakit.core.labels import IGNORE_INDEX
from lorakit.data.doctor import check, convert, recommend
from lorakit.data.encode import encode_samples, load_samples
from lorakit.data.formats import to_samples
from lorakit.data.sources import load_rows
from lorakit.data.split import dedupe, split_validation
from lorakit.data.template import ChatFormat

from ..conftest import write_jsonl

ANSWER = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
SAME_ROW_IN_EACH_FORMAT = {
    "alpaca": {"instruction": "q", "output": "a"},
    "chat": {"messages": ANSWER},
    "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    "completion": {"prompt": "q", "completion": "a"},
}


@pytest.mark.parametrize("fmt", list(SAME_ROW_IN_EACH_FORMAT))
def test_every_chat_format_gives_the_same_messages(tmp_path, fmt):
    data = write_jsonl(tmp_path / "d.jsonl", [SAME_ROW_IN_EACH_FORMAT[fmt]])
    [sample], bad = to_samples(load_rows(str(data)), "auto", "sys")
    assert sample.format == fmt and not bad
    assert sample.messages == [{"role": "system", "content": "sys"}] + ANSWER


def test_row_system_overrides_default_and_chat_system_kept():
    [s1], _ = to_samples([("f:1", {"instruction": "q", "output": "a", "system": "own"})], "auto", "default")
    assert s1.messages[0] == {"role": "system", "content": "own"}
    msgs = [{"role": "system", "content": "own"}] + ANSWER
    [s2], _ = to_samples([("f:1", {"messages": msgs})], "auto", "default")
    assert s2.messages == msgs


def test_text_format_supervises_every_token_and_eos(smol_tokenizer):
    [s], _ = to_samples([("f:1", {"text": "LDA #$12 loads the accumulator."})], "auto", "sys")
    [ex] = encode_samples([s], ChatFormat(smol_tokenizer), 512)
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == smol_tokenizer.eos_token_id
    assert smol_tokenizer.decode(ex["input_ids"]) == "LDA #$12 loads the accumulator.<|im_end|>"


def test_forced_format(tmp_path):
    rows = [("f:1", {"text": "hello", "instruction": "ignored"})]
    [s], _ = to_samples(rows, "text", "")
    assert s.format == "text" and s.text == "hello"


def test_inputs_directory_glob_json_array(tmp_path):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", [{"instruction": "q1", "output": "a"}])
    write_jsonl(tmp_path / "d" / "b.jsonl", [{"messages": ANSWER}])  # another file may use another format
    (tmp_path / "d" / "c.json").write_text(
        json.dumps([{"prompt": "p", "completion": "c"}, {"prompt": "p2", "completion": "c"}])
    )
    rows = load_rows(str(tmp_path / "d"))
    assert len(rows) == 4 and rows[2][0].endswith("c.json[0]")
    samples, _ = to_samples(rows, "auto", "")
    assert [s.format for s in samples] == ["alpaca", "chat", "completion", "completion"]
    assert len(load_rows(str(tmp_path / "d" / "*.jsonl"))) == 2


def test_hf_datasets_folder_loads_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hfdata"
    folder.mkdir()
    datasets.Dataset.from_list(
        [{"instruction": "q", "output": "a"}, {"instruction": "q2", "output": "b"}]
    ).to_parquet(str(folder / "train.parquet"))
    rows = load_rows(str(folder))
    assert [r for _, r in rows] == [{"instruction": "q", "output": "a"}, {"instruction": "q2", "output": "b"}]
    assert rows[1][0].endswith("[train]:1")


def test_duplicates_dropped_and_counted(tmp_path):
    row = {"instruction": "q", "output": "a"}
    data = write_jsonl(tmp_path / "d.jsonl", [row, {"instruction": "q2", "output": "a"}, row, row])
    samples, _ = to_samples(load_rows(str(data)), "auto", "")
    kept, dropped = dedupe(samples)
    assert len(kept) == 2 and [d.rsplit(":", 1)[1] for d in dropped] == ["3", "4"]


def _rows(n):
    return [(f"f:{i}", {"instruction": f"q{i}", "output": "a"}) for i in range(n)]


def test_split_is_deterministic_and_sized():
    samples, _ = to_samples(_rows(50), "auto", "")
    t1, v1 = split_validation(samples, 0.2, seed=1)
    t2, v2 = split_validation(samples, 0.2, seed=1)
    t3, v3 = split_validation(samples, 0.2, seed=2)
    assert [s.where for s in v1] == [s.where for s in v2] and len(v1) == 10 and len(t1) == 40
    assert [s.where for s in v1] != [s.where for s in v3]
    assert not {s.where for s in t1} & {s.where for s in v1}
    _, v4 = split_validation(samples, 7, seed=1)
    assert len(v4) == 7


def test_split_never_leaks_duplicates(tmp_path):
    rows = [{"instruction": f"q{i % 10}", "output": "a"} for i in range(40)]  # every row 4 times
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    train, val, report = load_samples(DataCheckConfig(dataset=str(data), val_size=0.3, system_prompt=""))
    assert len(report.duplicates) == 30
    assert not {s.key() for s in train} & {s.key() for s in val} and len(val) == 3


def test_val_dataset_rows_seen_in_training_are_removed(tmp_path):
    train_file = write_jsonl(
        tmp_path / "t.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(5)]
    )
    val_file = write_jsonl(
        tmp_path / "v.jsonl", [{"instruction": "q1", "output": "a"}, {"instruction": "new", "output": "a"}]
    )
    train, val, report = load_samples(
        DataCheckConfig(dataset=str(train_file), val_dataset=str(val_file), system_prompt="Be brief.")
    )
    assert (
        len(train) == 5
        and [s.messages[1]["content"] for s in val] == ["new"]
        and report.val_leaks_removed == 1
    )


def test_convert_round_trips(tmp_path):
    src = write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [
            SAME_ROW_IN_EACH_FORMAT["sharegpt"],
            {
                "conversations": [
                    {"from": "system", "value": "own"},
                    {"from": "human", "value": "x"},
                    {"from": "gpt", "value": "y"},
                ]
            },
        ],
    )
    out = convert(
        DataConvertConfig(dataset=str(src), output=str(tmp_path / "out.jsonl"), system_prompt="sys")
    )
    before, _ = to_samples(load_rows(str(src)), "auto", "sys")
    after, _ = to_samples(load_rows(str(out)), "auto", "other default")  # system turns are explicit now
    assert [s.messages for s in after] == [s.messages for s in before]


def test_chatml_fallback_is_announced(smol_tokenizer, capsys):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    chat = ChatFormat(tok)
    assert chat.fallback and "no chat template; using ChatML" in capsys.readouterr().out
    ids, labels, _ = chat.encode_conversation(ANSWER)
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == "a<|im_end|>"


def test_recommendations_follow_the_guide():
    assert recommend(500, [100] * 10)["lora_r"] == "8-16" and recommend(500, [100])["num_epochs"] == "5-10"
    assert recommend(5000, [100])["lora_r"] == "32-64" and recommend(5000, [100])["num_epochs"] == "3-5"
    assert recommend(20000, [100])["lora_r"] == "128-256" and recommend(20000, [100])["num_epochs"] == "1-3"
    assert recommend(100, [100] * 99 + [120])["max_seq_length"] == 128
    assert (
        recommend(200, [100] * 199 + [900])["max_seq_length"] == 128
    )  # one outlier is dropped, not padded for


def test_check_on_demo_data(tmp_path, smol_dir, capsys):
    cfg = DataCheckConfig(
        base_model=str(smol_dir), output=str(tmp_path / "r.json"), plot=str(tmp_path / "len.png"), preview=1
    )
    result = check(cfg)
    assert result["rows"] == 192 and result["formats"] == {"alpaca": 192} and result["train_rows"] == 192
    assert 0.05 < result["supervised_fraction"] < 0.2
    assert (
        json.loads((tmp_path / "r.json").read_text())["length_percentiles"]["max"]
        == result["length_percentiles"]["max"]
    )
    assert (tmp_path / "len.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "recommended" in out and "--lora_r 8-16" in out and "token lengths:" in out


def test_check_cli_reports_dropped_rows(tmp_path, smol_dir, capsys):
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "q", "output": "a"},
            {"instruction": "q " * 200, "output": "a"},
            {"instruction": "q", "output": "a"},
        ],
    )
    assert (
        main(
            [
                "data",
                "check",
                str(data),
                "--base_model",
                str(smol_dir),
                "--max_seq_length",
                "64",
                "--output",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["over_max_seq_length"]["dropped"] == [f"{data}:2"] and report["duplicates_dropped"] == [
        f"{data}:3"
    ]


def test_train_with_validation_logs_eval_loss(tmp_path, tiny_llama):
    from lorakit.training.train import train

    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)])
    out = train(
        TrainConfig(
            base_model=str(tiny_llama),
            dataset=str(data),
            output_dir=str(tmp_path / "o"),
            val_size=0.25,
            max_steps=4,
            eval_steps=2,
            batch_size=4,
            gradient_accumulation_steps=1,
            lora_r=4,
            warmup_steps=0,
            logging_steps=1,
        )
    )
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval_loss" in x and not x.get("summary")]
    assert [x["step"] for x in evals] == [2, 4] and all(x["eval_perplexity"] > 1 for x in evals)
    assert lines[-1]["eval_loss"] == evals[-1]["eval_loss"]
