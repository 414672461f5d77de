"""Fixtures: tiny random-initialised models (2 layers, hidden 32) with the SmolLM2 tokenizer.

The tokenizer comes from the embedded SmolLM2 GGUF (converted once into LORAKIT_HOME), so the
tests run offline and exercise the real chat template.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from lorakit.models.loading import resolve_base_model

    return Path(resolve_base_model("").path)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


def _save_tiny(path: Path, config, tokenizer) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _tiny_shape(tok) -> dict:
    """2 layers, hidden 32, 4 heads (2 KV), the tokenizer's vocabulary and special ids."""
    return dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smol_tokenizer) -> Path:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        **_tiny_shape(smol_tokenizer), bos_token_id=smol_tokenizer.bos_token_id, tie_word_embeddings=True
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), cfg, smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, smol_tokenizer) -> Path:
    from transformers import Qwen2Config

    return _save_tiny(
        tmp_path_factory.mktemp("tiny-qwen2"), Qwen2Config(**_tiny_shape(smol_tokenizer)), smol_tokenizer
    )


def assemble_rows(n: int) -> list[dict]:
    """n alpaca rows of the demo's task: `LDA #$NN` -> `A9 NN`."""
    return [
        {"instruction": f"Assemble {i}.", "input": f"LDA #${i:02X}", "output": f"A9 {i:02X}"}
        for i in range(n)
    ]


def tiny_train_config(base, data, out, **kw):
    """A short training run of a tiny model: 12 steps of 4 rows, LoRA r=4, a checkpoint every 4."""
    from lorakit.core.config import TrainConfig

    settings = dict(
        base_model=str(base),
        dataset=str(data),
        output_dir=str(out),
        max_steps=12,
        save_steps=4,
        batch_size=4,
        gradient_accumulation_steps=1,
        lora_r=4,
        lora_dropout=0.0,
        warmup_steps=0,
        logging_steps=1,
        learning_rate=1e-3,
    )
    settings.update(kw)
    return TrainConfig(**settings)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    rows = [
        {
            "instruction": "Assemble this 65816 instruction.",
            "input": f"LDA #${v:02X}",
            "output": f"A9 {v:02X}",
        }
        for v in range(0, 256, 16)
    ]
    return write_jsonl(tmp_path / "train.jsonl", rows)


LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<issue_start>' + m['role'] + '<issue_comment>\n\n' + m['content'] | trim + '<file_sep>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<issue_start>assistant<issue_comment>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def llama3_tokenizer(smol_tokenizer):
    """A Llama-3-style tokenizer built locally: it adds BOS itself, its template writes BOS too,
    headers are special tokens, content is trimmed and turns end with a special end-of-turn token."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(smol_tokenizer)
    tok.bos_token, tok.eos_token = "<repo_name>", "<file_sep>"
    bos = tok.convert_tokens_to_ids("<repo_name>")
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<repo_name> $A", pair="<repo_name> $A <repo_name> $B", special_tokens=[("<repo_name>", bos)]
    )
    tok.chat_template = LLAMA3_STYLE_TEMPLATE
    assert tok("a")["input_ids"][0] == bos
    return tok


# ---------------------------------------------------------------- one tiny model per family
#
# Random weights, 2 layers: enough for GGUF parity with llama.cpp's converter, merge maths and a
# few training steps. Gemma-2 and Phi-3 use a SentencePiece vocabulary (their real tokenizers do,
# and llama.cpp's converter reads tokenizer.model for them); the others the SmolLM2 BPE one.

GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI_STYLE_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
SPM_SYMBOLS = ["<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> Path:
    """A 400-piece SentencePiece BPE model with byte fallback, trained on the demo task's text."""
    import io

    spm = pytest.importorskip("sentencepiece", reason="pip install sentencepiece (the dev extra has it)")
    rows = assemble_rows(256)
    text = [f"{r['instruction']} {r['input']} -> {r['output']}. The quick brown fox." for r in rows]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=SPM_SYMBOLS,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        add_dummy_prefix=False,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def _spm_tokenizer(spm_model: Path, tmp: Path, tokenizer_class: str, template: str, **special):
    import shutil

    from transformers import AutoTokenizer

    shutil.copy(spm_model, tmp / "tokenizer.model")
    (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class, **special}))
    tok = AutoTokenizer.from_pretrained(tmp)
    tok.chat_template = template
    return tok


def _save_family(path: Path, config, tokenizer, spm_model: Path | None = None) -> Path:
    _save_tiny(path, config, tokenizer)
    if spm_model is not None:  # transformers 5 saves tokenizer.json only; llama.cpp reads this one
        (path / "tokenizer.model").write_bytes(spm_model.read_bytes())
    return path


# Llama 3.1's published RoPE scaling (rope_type llama3).
LLAMA31_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
# What `lorakit export all --quant q8_0` writes.
EXPORT_ALL_FILES = (
    "merged/config.json",
    "model-q8_0.gguf",
    "adapter.gguf",
    "Modelfile",
    "vllm.sh",
    "README.md",
)


def conversations_of(text):
    """Hypothesis: conversations of 1-3 user/assistant turns, with or without a system prompt,
    their contents drawn from the `text` strategy."""
    from hypothesis import strategies as st

    @st.composite
    def conversations(draw):
        msgs = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
        for _ in range(draw(st.integers(1, 3))):
            msgs += [{"role": "user", "content": draw(text)}, {"role": "assistant", "content": draw(text)}]
        return msgs

    return conversations()


@pytest.fixture(scope="session")
def tiny_llama31(tmp_path_factory, smol_tokenizer) -> Path:
    """Llama 3.1-style RoPE scaling (rope_type llama3): llama.cpp needs the rope_freqs tensor."""
    from transformers import LlamaConfig

    shape = _tiny_shape(smol_tokenizer) | dict(hidden_size=64, num_attention_heads=4)  # head_dim 16
    cfg = LlamaConfig(**shape, rope_parameters=dict(LLAMA31_ROPE), bos_token_id=smol_tokenizer.bos_token_id)
    return _save_family(tmp_path_factory.mktemp("tiny-llama31"), cfg, smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory, smol_tokenizer) -> Path:
    from transformers import MistralConfig

    cfg = MistralConfig(**_tiny_shape(smol_tokenizer), head_dim=8, sliding_window=None)
    return _save_family(tmp_path_factory.mktemp("tiny-mistral"), cfg, smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, smol_tokenizer) -> Path:
    from transformers import Qwen3Config

    cfg = Qwen3Config(**_tiny_shape(smol_tokenizer), head_dim=16, tie_word_embeddings=True)
    return _save_family(tmp_path_factory.mktemp("tiny-qwen3"), cfg, smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_gemma2(tmp_path_factory, spm_model) -> Path:
    from transformers import Gemma2Config

    path = tmp_path_factory.mktemp("tiny-gemma2")
    tok = _spm_tokenizer(spm_model, path, "GemmaTokenizer", GEMMA_STYLE_TEMPLATE)
    shape = _tiny_shape(tok) | dict(bos_token_id=tok.bos_token_id)
    cfg = Gemma2Config(**shape, head_dim=16, query_pre_attn_scalar=16, sliding_window=64)
    return _save_family(path, cfg, tok, spm_model)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory, smol_tokenizer) -> Path:
    """Gemma 3 text-only (Gemma3ForCausalLM): 5 sliding-window layers to 1 global, two RoPE bases."""
    from transformers import Gemma3TextConfig

    shape = _tiny_shape(smol_tokenizer) | dict(num_hidden_layers=6)
    cfg = Gemma3TextConfig(**shape, head_dim=16, query_pre_attn_scalar=16, sliding_window=64)
    cfg.architectures = ["Gemma3ForCausalLM"]
    return _save_family(tmp_path_factory.mktemp("tiny-gemma3"), cfg, smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory, spm_model) -> Path:
    """Phi-3.5-style: fused qkv and gate_up projections, LongRoPE factors."""
    from transformers import Phi3Config

    path = tmp_path_factory.mktemp("tiny-phi3")
    tok = _spm_tokenizer(spm_model, path, "LlamaTokenizer", PHI_STYLE_TEMPLATE, eos_token="<|end|>")
    shape = _tiny_shape(tok) | dict(max_position_embeddings=1024, bos_token_id=tok.bos_token_id)
    half = 32 // 4 // 2  # rope_dims / 2
    rope = dict(
        rope_type="longrope",
        rope_theta=10000.0,
        long_factor=[1.0 + i / 2 for i in range(half)],
        short_factor=[1.0 + i / 8 for i in range(half)],
        original_max_position_embeddings=256,
    )
    cfg = Phi3Config(**shape, rope_parameters=rope, original_max_position_embeddings=256)
    return _save_family(path, cfg, tok, spm_model)


FAMILIES = [
    "tiny_llama",
    "tiny_llama31",
    "tiny_mistral",
    "tiny_qwen2",
    "tiny_qwen3",
    "tiny_gemma2",
    "tiny_gemma3",
    "tiny_phi3",
]


def random_lora_and_merge(base: Path, out: Path) -> tuple[Path, Path]:
    """A PEFT LoRA (r=4) on every linear layer of `base` with visibly non-zero B matrices, saved
    to out/adapter, and lorakit's fp32 merge of it in out/merged: (adapter dir, merged dir)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.core.config import MergeConfig
    from lorakit.export.merge import merge

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: the merged model must differ from the base
            torch.nn.init.normal_(p, std=0.05)
    peft_model.save_pretrained(out / "adapter")
    merged = merge(MergeConfig(adapter=str(out / "adapter"), output_dir=str(out / "merged"), dtype="fp32"))
    return out / "adapter", merged


def llama_cpp_tree() -> Path:
    """llama.cpp's source tree (converters, gguf-py, models/templates): $LORAKIT_LLAMA_CPP, which
    `make test` sets from the llama-cpp-python source package; the test is skipped without it."""
    import os

    where = os.environ.get("LORAKIT_LLAMA_CPP", "")
    if not where or not (Path(where) / "convert_hf_to_gguf.py").is_file():
        pytest.skip("LORAKIT_LLAMA_CPP does not name a llama.cpp source tree")
    return Path(where)


def serve_in_thread(app):
    """An ASGI app under uvicorn in a thread, on a free port: (url, stop)."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


# Fixtures whose tests are slow by nature (`make test-quick` leaves them out): a real browser, a
# compiler, servers and commands in processes of their own.
SLOW_FIXTURES = {
    "browser": "drives Chromium",
    "go_render": "compiles a Go program",
    "serve_process": "runs `lorakit serve` in another process",
    "dashboard_process": "runs `lorakit dashboard` in another process",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in SLOW_FIXTURES for name in item.fixturenames):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter):
    """The max |logit difference| each llama.cpp test recorded (test_llama_cpp.py), one per line."""
    lines = [
        f"{report.nodeid.split('::')[-1]}: {value:.3g}"
        for outcome in ("passed", "failed")
        for report in terminalreporter.stats.get(outcome, [])
        if report.when == "call"
        for key, value in report.user_properties
        if key == "max_abs_logit_diff"
    ]
    if lines:
        terminalreporter.section("llama.cpp vs transformers/PEFT: max |logit difference|")
        for line in lines:
            terminalreporter.write_line(line)


def inject_oom(monkeypatch, when) -> list:
    """Make every training run raise an injected out-of-memory error at the start of a step where
    `when(state, args, seen)` holds (`seen`: the steps started so far, this one included).
    Returns `seen`: (step, per-device batch size, gradient accumulation) at each step start."""
    import torch

    import lorakit.training.monitor as mon

    seen = []

    class InjectedOOM(mon.HealthWatch):
        def on_step_begin(self, args, state, control, **kw):
            seen.append(
                (state.global_step, args.per_device_train_batch_size, args.gradient_accumulation_steps)
            )
            if when(state, args, seen):
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(mon, "HealthWatch", InjectedOOM)
    return seen


# ------------------------------------------------------------------------------------------------
# A real browser: the system Chromium driven through chromedriver (Selenium)


@pytest.fixture(scope="session")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        missing = "chromium" if not chromium else "chromedriver"
        reason = f"{missing} is not installed (apt-get install chromium chromium-driver; `make test` does)"
        if os.environ.get("LORAKIT_ALLOW_NO_BROWSER") == "1":
            pytest.skip(reason)
        pytest.fail(reason + "; set LORAKIT_ALLOW_NO_BROWSER=1 to skip the browser tests")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1360,1000")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def wait(driver, seconds: float, condition, message: str):
    """Poll `condition` until it holds. The page redraws a chart by replacing its elements, so a
    poll may find none (IndexError) or hold one that was just replaced (stale): poll again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (IndexError, StaleElementReferenceException)
    return WebDriverWait(driver, seconds, poll_frequency=0.1, ignored_exceptions=ignored).until(
        condition, message
    )


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)
