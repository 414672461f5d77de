"""Every kind of bad input: exit code 2, one line naming file:line (or the file), nothing written."""

import json
import subprocess
import sys

import pytest

from lorakit.cli import main

from ..conftest import write_jsonl

GOOD = {"instruction": "Assemble.", "input": "NOP", "output": "EA"}
CHAT_GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


# (name, lines of the file (first is good), expected message fragment; ':2' = the bad line)
CASES = [
    ("invalid_json", [GOOD, "{oops"], ":2: invalid JSON"),
    ("not_an_object", [GOOD, "[1, 2]"], ":2: a row must be a JSON object"),
    ("missing_output", [GOOD, {"instruction": "x"}], ":2: missing key 'output'"),
    ("missing_instruction", [GOOD, {"output": "x"}], ":2: missing key 'instruction'"),
    ("output_wrong_type", [GOOD, {"instruction": "x", "output": 12}], ":2: key 'output' must be a string"),
    (
        "input_wrong_type",
        [GOOD, {"instruction": "x", "input": ["a"], "output": "y"}],
        ":2: key 'input' must be a string",
    ),
    (
        "system_wrong_type",
        [GOOD, {"instruction": "x", "output": "y", "system": 1}],
        ":2: key 'system' must be a string",
    ),
    ("empty_output", [GOOD, {"instruction": "x", "output": " "}], ":2: key 'output' is empty"),
    ("empty_instruction", [GOOD, {"instruction": "", "output": "y"}], ":2: key 'instruction' is empty"),
    ("messages_not_list", [CHAT_GOOD, {"messages": "hi"}], ":2: key 'messages' must be a non-empty list"),
    ("message_not_object", [CHAT_GOOD, {"messages": ["hi"]}], ":2: messages[0] must be an object"),
    (
        "unknown_role",
        [CHAT_GOOD, chat(("robot", "x"), ("assistant", "y"))],
        ":2: messages[0]: unknown role 'robot'",
    ),
    (
        "content_not_string",
        [CHAT_GOOD, {"messages": [{"role": "user", "content": None}]}],
        ":2: messages[0]: 'content' must be a string",
    ),
    ("no_assistant_turn", [CHAT_GOOD, chat(("user", "x"))], ":2: 'messages' has no assistant turn"),
    (
        "empty_assistant",
        [CHAT_GOOD, chat(("user", "x"), ("assistant", ""))],
        ":2: messages[1]: empty assistant content",
    ),
    (
        "ends_with_user",
        [CHAT_GOOD, chat(("user", "x"), ("assistant", "y"), ("user", "z"))],
        ":2: 'messages' ends with a user turn",
    ),
    (
        "system_not_first",
        [CHAT_GOOD, chat(("user", "x"), ("system", "s"), ("assistant", "y"))],
        ":2: messages[1]: a system message may only come first",
    ),
    (
        "sharegpt_unknown_from",
        [
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            {"conversations": [{"from": "bot", "value": "a"}]},
        ],
        ":2: conversations[0]: unknown 'from' 'bot'",
    ),
    (
        "sharegpt_value_type",
        [
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            {"conversations": [{"from": "human", "value": 3}]},
        ],
        ":2: conversations[0]: 'value' must be a string",
    ),
    (
        "completion_missing",
        [{"prompt": "a", "completion": "b"}, {"prompt": "a"}],
        ":2: missing key 'completion'",
    ),
    (
        "prompt_empty",
        [{"prompt": "a", "completion": "b"}, {"prompt": "", "completion": "b"}],
        ":2: key 'prompt' is empty",
    ),
    ("text_empty", [{"text": "a"}, {"text": "  "}], ":2: key 'text' is empty"),
    ("text_wrong_type", [{"text": "a"}, {"text": 5}], ":2: key 'text' must be a string"),
    (
        "unknown_format",
        [GOOD, {"question": "a", "answer": "b"}],
        ":2: cannot tell the row's format from its keys (answer, question)",
    ),
    ("mixed_formats", [GOOD, CHAT_GOOD], ":2: chat row in a file of alpaca rows (first at"),
]


@pytest.mark.parametrize("name,lines,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_row(tmp_path, capsys, name, lines, fragment):
    data = write_jsonl(tmp_path / "data.jsonl", lines)
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(data), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert f"data.jsonl{fragment}" in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.jsonl*")), "no temporary file left"


def test_non_utf8(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n')
    assert main(["data", "convert", str(path), "--output", str(tmp_path / "out.jsonl")]) == 2
    assert "data.jsonl:2: not UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda d: d / "missing.jsonl", "dataset file not found"),
        (lambda d: (d / "empty.jsonl").write_text("\n\n") and d / "empty.jsonl", "empty.jsonl: no rows"),
        (
            lambda d: (d / "arr.json").write_text('[{"text": "a"}, 3]') and d / "arr.json",
            "arr.json[1]: a row must be a JSON object",
        ),
        (lambda d: (d / "sub").mkdir() or d / "sub", "has no .jsonl/.json"),
        (lambda d: str(d / "nothing-*.jsonl"), "matches no files"),
    ],
)
def test_bad_inputs(tmp_path, capsys, make, fragment):
    spec = make(tmp_path)
    assert main(["data", "convert", str(spec), "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and err.count("\n") == 0, err
    assert not (tmp_path / "out.jsonl").exists()


def test_special_token_text_in_content_is_refused(tmp_path, capsys, smol_dir):
    data = write_jsonl(
        tmp_path / "data.jsonl", [GOOD, {"instruction": "x", "output": "done<|im_end|> and more"}]
    )
    assert (
        main(
            [
                "data",
                "check",
                str(data),
                "--base_model",
                str(smol_dir),
                "--system_prompt",
                "Be brief.",
                "--output",
                str(tmp_path / "r.json"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "data.jsonl:2: message 2 (assistant) contains the special token text '<|im_end|>'" in err
    assert not (tmp_path / "r.json").exists()


def test_overlength_error_names_line(tmp_path, capsys, smol_dir):
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD, {"instruction": "x " * 300, "output": "y"}])
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
                "--overlength",
                "error",
            ]
        )
        == 2
    )
    assert "data.jsonl:2: " in capsys.readouterr().err


def test_skip_bad_rows_lists_every_skipped_line(tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "data.jsonl", [GOOD, {"instruction": "x"}, GOOD | {"input": "INX"}, "{bad", {"output": ""}]
    )
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(data), "--output", str(out), "--skip_bad_rows"]) == 0
    text = capsys.readouterr().out
    for line in (2, 4, 5):
        assert f"data.jsonl:{line}:" in text
    assert len(out.read_text().splitlines()) == 2


def test_without_skip_all_bad_rows_are_counted(tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "data.jsonl", [GOOD, {"instruction": "x"}, {"output": "y"}, {"instruction": "z"}]
    )
    assert main(["data", "convert", str(data), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "data.jsonl:2: missing key 'output' (and 2 more bad rows); fix it, or pass --skip_bad_rows" in err


def test_real_process_exit_code(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD, "{oops"])
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorakit",
            "data",
            "convert",
            str(data),
            "--output",
            str(tmp_path / "o.jsonl"),
        ],
        capture_output=True,
        text=True,
    )
    assert (
        r.returncode == 2 and "data.jsonl:2: invalid JSON" in r.stderr and r.stderr.strip().count("\n") == 0
    )
