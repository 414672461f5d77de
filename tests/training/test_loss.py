"""Speed paths keep the loss: chunked cross-entropy == plain, packed == per-row (values and gradients)."""

import pytest
import torch

from lorakit.core.config import TrainConfig
from lorakit.core.labels import IGNORE_INDEX
from lorakit.data.encode import encode_rows
from lorakit.data.template import ChatFormat
from lorakit.training.batching import Collator
from lorakit.training.loss import causal_lm_loss, chunked_lm_loss

ROWS = [
    {"instruction": "Assemble.", "input": "LDA #$12", "output": "A9 12"},
    {"instruction": "Assemble this longer one, please.", "input": "STA $1234 ; store", "output": "8D 34 12"},
    {"instruction": "Say it.", "output": "A longer answer with several words in it."},
]


@pytest.fixture
def lora_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    from lorakit.models.loading import add_lora

    torch.manual_seed(0)
    model = add_lora(
        TrainConfig(lora_r=4, lora_dropout=0.0, target_modules=["all-linear"]),
        AutoModelForCausalLM.from_pretrained(tiny_llama),
    )
    with torch.no_grad():  # B starts at zero; give the adapter a non-trivial value
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model.train()


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def close(a, b, tol=1e-5):
    return all(torch.allclose(a[k], b[k], atol=tol, rtol=1e-4) for k in a)


def examples(tok):
    ex, _ = encode_rows([(f"f:{i}", r) for i, r in enumerate(ROWS)], tok, "sys", 512, chat=ChatFormat(tok))
    return ex


@pytest.mark.parametrize("chunk", [1024, 3])
def test_chunked_cross_entropy_equals_plain(lora_model, smol_tokenizer, chunk):
    batch = Collator(smol_tokenizer.pad_token_id)(examples(smol_tokenizer))
    batch.pop("sources")
    plain = lora_model(**batch).loss
    g_plain = grads(lora_model, plain)
    chunked = causal_lm_loss(lora_model, batch, chunk_size=chunk)
    g_chunked = grads(lora_model, chunked)
    assert torch.allclose(plain, chunked, atol=1e-6)
    assert close(g_plain, g_chunked)


def test_chunked_loss_with_an_explicit_divisor_and_softcap():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 5, 8)
    labels = torch.tensor([[-100, 3, 4, -100, 1], [-100, -100, 7, 2, 9]])
    logits = 30 * torch.tanh(head(hidden) / 30)
    plain = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="sum"
    )
    assert torch.allclose(
        chunked_lm_loss(hidden, labels, head, num_items=10, chunk_size=2, softcap=30.0), plain / 10
    )


@pytest.mark.parametrize("loss_path", ["model", "chunked"])
def test_packed_batch_equals_per_row_computation(lora_model, smol_tokenizer, loss_path):
    ex = examples(smol_tokenizer)
    # Per row, unpadded: summed token losses over all rows / all supervised tokens.
    total, count = 0.0, 0
    for e in ex:
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total = total + lora_model(input_ids=ids, labels=labels).loss * n
        count += n
    per_row = total / count
    g_rows = grads(lora_model, per_row)
    packed = Collator(smol_tokenizer.pad_token_id, padding_free=True)(ex)
    packed.pop("sources")
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    if loss_path == "model":
        loss = lora_model(**packed, use_cache=False).loss
    else:
        loss = causal_lm_loss(lora_model, packed)
    g_packed = grads(lora_model, loss)
    assert torch.allclose(per_row, loss, atol=1e-5)
    assert close(g_rows, g_packed)
    # Without the per-row positions the rows would attend to each other and the loss would move.
    crossed = lora_model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False).loss
    assert not torch.allclose(crossed, per_row, atol=1e-4)


def test_padding_free_training_runs(tmp_path, tiny_llama):
    from lorakit.training.train import train

    from ..conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(16)])
    out = train(
        TrainConfig(
            base_model=str(tiny_llama),
            dataset=str(data),
            output_dir=str(tmp_path / "o"),
            padding_free=True,
            max_steps=2,
            lora_r=4,
            batch_size=4,
            gradient_accumulation_steps=1,
            warmup_steps=0,
        )
    )
    assert (out / "adapter_model.safetensors").is_file()


def test_the_padding_mask_is_dropped_only_where_right_padding_makes_it_moot(lora_model, smol_tokenizer):
    import lorakit.training.loss as loss

    seen = []
    decoder = lora_model.get_base_model().model
    real = decoder.forward

    def spy(*a, **kw):
        seen.append(kw.get("attention_mask"))
        return real(*a, **kw)

    batch = Collator(smol_tokenizer.pad_token_id)(examples(smol_tokenizer))
    batch.pop("sources")
    decoder.forward = spy
    try:
        right = loss.causal_lm_loss(lora_model, batch)
        # the same rows padded on the left: the mask is needed and kept
        width = batch["input_ids"].shape[1]
        lengths = batch["attention_mask"].sum(1).tolist()
        left = {
            k: torch.stack([torch.cat([row[n:], row[:n]]) for row, n in zip(batch[k], lengths)])
            for k in ("input_ids", "labels", "attention_mask")
        }
        left["position_ids"] = (left["attention_mask"].cumsum(1) - 1).clamp(min=0)
        assert min(lengths) < width  # some row is padded
        left_loss = loss.causal_lm_loss(lora_model, left)
    finally:
        decoder.forward = real
    assert seen[0] is None and seen[1] is not None
    plain = lora_model(**batch).loss  # the model's own loss, with the mask
    assert torch.allclose(right, plain, atol=1e-6)
    assert torch.allclose(left_loss, plain, atol=1e-5)
