"""The Ollama TEMPLATE rendered by Go's own text/template (the engine Ollama runs) equals the
chat template rendered by transformers' Jinja, minus the BOS that llama.cpp / Ollama add from the
GGUF's add_bos_token.

Needs `go` (apt-get install golang-go; `make test` installs it when missing). Set LORAKIT_ALLOW_NO_GO=1 to skip
these tests on a machine without it. Real model templates come from llama.cpp's
models/templates (LORAKIT_LLAMA_CPP): skipped without it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lorakit.data.template import ChatFormat
from lorakit.export.ollama import ollama_template

from ..conftest import GEMMA_STYLE_TEMPLATE, PHI_STYLE_TEMPLATE, llama_cpp_tree


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """render(template, conversations) -> prompts, through a Go program built once per session."""
    go = shutil.which("go")
    if go is None:
        if os.environ.get("LORAKIT_ALLOW_NO_GO"):
            pytest.skip("go is not installed (apt-get install golang-go) and LORAKIT_ALLOW_NO_GO is set")
        pytest.fail("go is not installed: apt-get install golang-go (or set LORAKIT_ALLOW_NO_GO=1 to skip)")
    tmp = tmp_path_factory.mktemp("go")
    binary = tmp / "gotemplate"
    env = dict(os.environ, GOCACHE=str(tmp / "cache"), GOPATH=str(tmp / "path"), GO111MODULE="off")
    source = Path(__file__).parent / "gotemplate" / "main.go"
    subprocess.run([go, "build", "-o", str(binary), str(source)], check=True, env=env)

    def render(template: str, conversations: list[list[dict]]) -> list[str]:
        requests = [{"template": template, "messages": c} for c in conversations]
        done = subprocess.run(
            [binary], input=json.dumps(requests), capture_output=True, text=True, check=True
        )
        return json.loads(done.stdout)

    return render


CONVERSATIONS = [
    [{"role": "user", "content": "LDA #$12?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "LDA #$12?"}],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c\n\nd {{ x }}"},
    ],
    [
        {"role": "system", "content": "sys {{ x }}\nline two"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "A9 12"},
        {"role": "user", "content": "c"},
    ],
]


def jinja_prompts(tok, conversations):
    """The chat template's prompts (generation prompt on) as training and inference render them
    (a system prompt in the first user turn where the template has no system role: Gemma 2),
    without the BOS the runtime adds."""
    chat = ChatFormat(tok)
    out = []
    for conversation in conversations:
        text = chat.render(conversation, add_generation_prompt=True)
        if chat.template_writes_bos and chat.prefix_ids:
            text = text.removeprefix(tok.bos_token)
        out.append((conversation, text))
    return out


def assert_go_equals_jinja(go_render, tok):
    expected = jinja_prompts(tok, CONVERSATIONS)
    assert len(expected) >= 2
    got = go_render(ollama_template(tok), [c for c, _ in expected])
    for (conversation, want), have in zip(expected, got):
        assert have == want, conversation


def with_template(tokenizer, template: str):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("fixture", ["smol_tokenizer", "llama3_tokenizer"])
def test_fixture_templates(go_render, request, fixture):
    assert_go_equals_jinja(go_render, request.getfixturevalue(fixture))


@pytest.mark.parametrize("template", [GEMMA_STYLE_TEMPLATE, PHI_STYLE_TEMPLATE], ids=["gemma", "phi"])
def test_family_style_templates(go_render, llama3_tokenizer, template):
    assert_go_equals_jinja(go_render, with_template(llama3_tokenizer, template))


# Real templates of the families lorakit exports (llama.cpp's models/templates). Not in that
# corpus: Gemma 3 and Phi-4 (Gemma 3's differs from Gemma 2's by folding the system message
# into the first user turn, the case "first" below; Phi-4's is ChatML-like).
REAL_TEMPLATES = [
    "meta-llama-Llama-3.1-8B-Instruct",
    "meta-llama-Llama-3.2-3B-Instruct",
    "meta-llama-Llama-3.3-70B-Instruct",
    "Qwen-Qwen2.5-7B-Instruct",
    "Qwen-Qwen3-0.6B",
    "mistralai-Mistral-Nemo-Instruct-2407",
    "Mistral-Small-3.2-24B-Instruct-2506",
    "google-gemma-2-2b-it",
    "microsoft-Phi-3.5-mini-instruct",
]


@pytest.mark.parametrize("name", REAL_TEMPLATES)
def test_real_templates(go_render, llama3_tokenizer, name):
    """On a tokenizer that adds BOS itself (as Llama 3, Mistral and Gemma ones do)."""
    path = llama_cpp_tree() / "models" / "templates" / f"{name}.jinja"
    assert_go_equals_jinja(go_render, with_template(llama3_tokenizer, path.read_text()))


def test_system_in_the_first_user_turn(go_render, llama3_tokenizer):
    """Gemma 3 and Llama 2 style: the system text opens the first user message."""
    template = (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
        "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
        "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (sys if loop.first else '') + m['content'] + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    )
    assert_go_equals_jinja(go_render, with_template(llama3_tokenizer, template))


def test_llama31_template_has_no_bos_and_keeps_the_default_system_block(go_render, llama3_tokenizer):
    """The two faults Ollama showed: BOS written in the TEMPLATE although the GGUF adds it (double
    BOS), and the "Cutting Knowledge Date" block lost when there is no system message."""
    path = llama_cpp_tree() / "models" / "templates" / "meta-llama-Llama-3.1-8B-Instruct.jinja"
    tok = with_template(llama3_tokenizer, path.read_text())
    template = ollama_template(tok)
    assert tok.bos_token not in template
    (prompt,) = go_render(template, [[{"role": "user", "content": "hi"}]])
    assert prompt.startswith(
        "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023"
    )
