"""`lorakit eval` metrics (golden values), the stop rate, reports and failures; `lorakit chat`."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from lorakit.core.config import EvalConfig, TrainConfig
from lorakit.data.formats import to_samples
from lorakit.data.sources import load_rows
from lorakit.workflows.evaluate import (
    METRIC_DEFINITIONS,
    chrf,
    corpus_chrf,
    evaluate,
    exact_match,
    rouge_l,
    score,
    token_f1,
)

from ..conftest import write_jsonl


def test_golden_metric_values():
    assert exact_match(" A9  12 ", "a9 12") == 1.0 and exact_match("A9 13", "A9 12") == 0.0
    assert token_f1("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert token_f1("A9 12", "A9 12") == 1.0 and token_f1("xx", "A9 12") == 0.0
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)  # LCS 3: P 1, R 1/2
    assert rouge_l("mat the on", "the cat sat on the mat") == pytest.approx(
        2 * (2 / 3) * (2 / 6) / (2 / 3 + 2 / 6)
    )
    assert chrf("LDA #$12", "LDA #$12") == pytest.approx(1.0) and chrf("zzz", "abc") == 0.0
    assert 0 < chrf("LDA #$13", "LDA #$12") < 1
    s = score(["A9 12", "xx"], ["A9 12", "A9 12"])
    assert s["exact_match"] == 0.5 and s["token_f1"] == 0.5


def test_exact_match_and_f1_use_squad_normalization():
    # lowercase, punctuation and the articles a/an/the removed, whitespace collapsed
    assert exact_match("The Cat!", "cat") == 1.0 and exact_match("an apple", "apple.") == 1.0
    assert exact_match("「東京」。", "東京") == 1.0  # Unicode punctuation too
    assert token_f1("a red apple.", "the red apples") == pytest.approx(0.5)  # [red apple] vs [red apples]
    assert token_f1("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)  # 2 of 2, 2 of 4
    assert token_f1("天气很好", "今天天气很好") == pytest.approx(0.8)  # a token per character: 4 of 4, 4 of 6
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("the", "a") == 1.0


def test_rouge_l_tokenizes_every_script():
    assert rouge_l("今天天气很好", "今天天气很好") == 1.0  # rouge-score's own tokenizer gives 0 here
    assert rouge_l("天气很好", "今天天气很好") == pytest.approx(0.8)  # LCS 4: P 4/4, R 4/6
    assert rouge_l("Привет, мир", "привет мир") == 1.0 and rouge_l("LDA 指令", "lda 指令") == 1.0
    assert rouge_l("the cat", "a dog") == 0.0


def test_chrf_is_corpus_level():
    # Hand-computed (character n-grams, whitespace ignored, beta 2). Row 1 "abcd"/"abcd": 1-grams
    # 4/4/4 (hyp/ref/match), 2-grams 3/3/3, 3-grams 2/2/2, 4-grams 1/1/1. Row 2 "ab"/"ac": 1-grams
    # 2/2/1, 2-grams 1/1/0. Summed: P = R = (5/6 + 3/4 + 1 + 1) / 4 = 43/48 for every order present.
    assert corpus_chrf(["abcd", "ab"], ["abcd", "ac"]) == pytest.approx(43 / 48)
    # Sentence scores: 1 and (1/2 + 0)/2 = 1/4; their mean 0.625 is not corpus chrF.
    assert chrf("abcd", "abcd") == pytest.approx(1.0) and chrf("ab", "ac") == pytest.approx(0.25)
    assert score(["abcd", "ab"], ["abcd", "ac"])["chrf"] == pytest.approx(43 / 48)
    assert set(METRIC_DEFINITIONS) == {"exact_match", "token_f1", "rouge_l", "chrf"}


def constant_model(tmp_path, tiny_llama, eos: str):
    """A model whose logits are all zero (final norm weight 0), so greedy decoding always picks
    token 0 (<|endoftext|>). With eos set to that token it stops at once; otherwise never."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path / f"const-{eos.strip('<|>')}"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.eos_token = eos
    tok.save_pretrained(d)
    return d


@pytest.fixture
def test_rows(tmp_path):
    return write_jsonl(
        tmp_path / "test.jsonl",
        [{"instruction": f"Assemble {i}.", "output": f"A9 {i:02X}"} for i in range(6)],
    )


def test_stop_rate_of_a_model_that_never_stops_and_one_that_always_does(tmp_path, tiny_llama, test_rows):
    never = constant_model(tmp_path, tiny_llama, "<|im_end|>")
    r = evaluate(
        EvalConfig(
            model=str(never), dataset=str(test_rows), max_new_tokens=5, output_dir=str(tmp_path / "e1")
        )
    )
    assert r["tuned"]["stop_rate"] == 0.0 and r["tuned"]["mean_generated_tokens"] == 5
    always = constant_model(tmp_path, tiny_llama, "<|endoftext|>")
    r = evaluate(
        EvalConfig(
            model=str(always), dataset=str(test_rows), max_new_tokens=5, output_dir=str(tmp_path / "e2")
        )
    )
    assert r["tuned"]["stop_rate"] == 1.0 and r["tuned"]["mean_generated_tokens"] == 0


def test_eval_adapter_against_base_writes_reports(tmp_path, tiny_llama, test_rows):
    from lorakit.training.train import train

    data = write_jsonl(
        tmp_path / "train.jsonl",
        [{"instruction": f"Assemble {i}.", "output": f"A9 {i:02X}"} for i in range(32)],
    )
    adapter = train(
        TrainConfig(
            base_model=str(tiny_llama),
            dataset=str(data),
            output_dir=str(tmp_path / "a"),
            max_steps=8,
            lora_r=8,
            learning_rate=1e-2,  # 5e-2 oscillates on this random tiny model: a coin toss, not a test
            batch_size=8,
            gradient_accumulation_steps=1,
            warmup_steps=0,
        )
    )
    out = tmp_path / "eval"
    report = evaluate(
        EvalConfig(
            adapter=str(adapter),
            dataset=str(test_rows),
            compare_base=True,
            max_new_tokens=4,
            output_dir=str(out),
            failures=3,
        )
    )
    assert set(report) >= {"base", "tuned", "delta", "rows"}
    assert report["tuned"]["loss"] < report["base"]["loss"]  # trained on the same kind of rows
    assert report["delta"]["loss"] == pytest.approx(report["tuned"]["loss"] - report["base"]["loss"])
    assert report["tuned"]["perplexity"] == pytest.approx(2.718281828 ** report["tuned"]["loss"], rel=1e-6)
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "eval.md").read_text()
    assert "| loss |" in md and all(text in md for text in METRIC_DEFINITIONS.values())
    failures = load_rows(str(out / "failures.jsonl"))
    assert 3 <= len(failures) <= 6
    samples, bad = to_samples(failures, "auto", "")
    assert not bad and all(
        s.messages[-1]["role"] == "assistant" for s in samples
    )  # ready to fix and train on
    assert all("generation" in row and "why" in row for _, row in failures)
    assert json.loads((out / "eval.json").read_text())["rows"][0]["source"].endswith("test.jsonl:1")


def test_chat_session(tmp_path, tiny_llama):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    script = "hello there\n/system Be brief.\nand again\n/reset\n/exit\n"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorakit",
            "chat",
            "--base_model",
            str(base),
            "--max_new_tokens",
            "4",
            "--temperature",
            "0",
        ],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(system prompt set: Be brief.; conversation cleared)" in r.stdout
    assert "(conversation cleared)" in r.stdout and r.stdout.count(">>> ") == 5
