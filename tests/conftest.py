"""Fixtures: tiny random-initialised models (2 layers, hidden 32) with the SmolLM2 tokenizer.

The tokenizer comes from the embedded SmolLM2 GGUF (converted once into LORAKIT_HOME), so the
tests run offline and exercise the real chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from lorakit.models import resolve_base_model

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
    from lorakit.config import TrainConfig

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
