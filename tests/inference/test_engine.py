"""The batch engine of `lorakit serve`: rows of several adapters decoded together give each request
the answer it gets alone, which is transformers' own greedy generate() with that adapter."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lorakit.inference.decoding import Sampling, TextStream, sample
from lorakit.inference.engine import BASE, BatchEngine, Job
from lorakit.inference.kvcache import PrefixCache

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def two_adapters(tiny_llama, smol_tokenizer):
    """The tiny Llama with two random LoRA adapters (nonzero B: each changes the answers)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.data.template import ChatFormat

    torch.manual_seed(3)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=4, target_modules=SEVEN, init_lora_weights=False),
        adapter_name="a1",
    )
    model.add_adapter("a2", LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    return model, smol_tokenizer, ChatFormat(smol_tokenizer)


def collect(job: Job) -> list:
    events: list = []
    job.on_event = events.append
    return events


def answer(events) -> tuple[str, str | None]:
    text = "".join(e.text for e in events if e.kind == "text")
    reasons = [e.reason for e in events if e.kind == "finish"]
    return text, reasons[0] if reasons else None


def reference(model, chat, prompt: list[int], adapter: str, max_new_tokens: int) -> list[int]:
    """transformers' greedy generate() of one prompt, alone, with the adapter set the usual way."""
    stop = chat.stop_ids()
    with model.disable_adapter() if adapter == BASE else contextlib.nullcontext():
        if adapter != BASE:
            model.set_adapter(adapter)
        ids = torch.tensor([prompt])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=stop[0],
        )
    tokens = out[0, len(prompt) :].tolist()
    return tokens[: next((k for k, t in enumerate(tokens) if t in stop), len(tokens))]


def test_mixed_adapter_batch_equals_each_request_alone_and_generate(two_adapters):
    model, tokenizer, chat = two_adapters
    engine = BatchEngine(model, tokenizer, chat.stop_ids(), max_rows=8, max_queued=16, peft=True)
    # batched decode steps run on MKL's prepacked weights where this torch has MKL; lone ones don't
    assert bool(engine.packed.layers) == torch.backends.mkl.is_available()
    try:
        prompts = [
            chat.encode_prompt([{"role": "user", "content": f"Question {k}: {'why ' * k}is it so?"}])
            for k in range(8)
        ]
        adapters = ["a1", "a2", BASE] * 3
        alone = []
        for p, a in zip(prompts, adapters):
            job = Job(p, a, Sampling(max_tokens=24))
            events = collect(job)
            engine.submit(job)
            assert job.done.wait(60)
            alone.append(answer(events))
        steps = engine.steps
        jobs = [Job(p, a, Sampling(max_tokens=24)) for p, a in zip(prompts, adapters)]
        together = [collect(j) for j in jobs]
        for j in jobs:
            engine.submit(j)
        assert all(j.done.wait(60) for j in jobs)
        assert [answer(e) for e in together] == alone
        assert engine.steps - steps < 8 * 23  # decoded together, not one after the other
        assert len({text for text, _ in alone[:3]}) == 3  # the adapters do change the answers
        for p, a, (text, _) in zip(prompts, adapters, alone):
            ids = reference(model, chat, p, a, 24)
            assert text == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    finally:
        engine.close()
    assert not any("forward" in m.__dict__ for m in model.modules())  # the layers are given back


def run_alone(engine, prompt, adapter, max_tokens=16) -> tuple[str, str | None]:
    job = Job(prompt, adapter, Sampling(max_tokens=max_tokens))
    events = collect(job)
    engine.submit(job)
    assert job.done.wait(60)
    return answer(events)


def test_prefix_cache_hits_give_the_answers_of_a_full_prefill(two_adapters):
    model, tokenizer, chat = two_adapters
    system = {"role": "system", "content": "You answer in one short sentence."}
    prompts = [chat.encode_prompt([system, {"role": "user", "content": q}]) for q in ("Hi", "Why?", "Hi")]
    cold = BatchEngine(model, tokenizer, chat.stop_ids(), max_rows=4, peft=True, prefix_cache_bytes=0)
    warm = BatchEngine(model, tokenizer, chat.stop_ids(), max_rows=4, peft=True)
    try:
        for adapter in ("a1", "a2", BASE):
            expected = [run_alone(cold, p, adapter) for p in prompts]
            assert [run_alone(warm, p, adapter) for p in prompts] == expected
            jobs = [Job(p, adapter, Sampling(max_tokens=16)) for p in prompts]  # hits, prefilled together
            together = [collect(j) for j in jobs]
            for j in jobs:
                warm.submit(j)
            assert all(j.done.wait(60) for j in jobs)
            assert [answer(e) for e in together] == expected
            ids = reference(model, chat, prompts[1], adapter, 16)
            assert expected[1][0] == tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        assert not cold.prefixes.entries
        shared = len(prompts[0]) - 1  # an exact repeat runs only its last token
        assert warm.prefixes.lookup("a1", prompts[2])[1] == shared
    finally:
        cold.close()
        warm.close()


def test_prefix_cache_is_keyed_by_adapter_and_tokens(smol_tokenizer):
    from lorakit.data.template import ChatFormat

    chat = ChatFormat(smol_tokenizer)

    def prompt(system: str, question: str) -> list[int]:
        return chat.encode_prompt(
            [{"role": "system", "content": system}, {"role": "user", "content": question}]
        )

    def kv(n: int) -> list:  # 2 layers of [1, kv_heads 2, n, head_dim 4], position k holds k
        column = torch.arange(n, dtype=torch.float32)[None, None, :, None].expand(1, 2, n, 4)
        return [(column.clone(), -column.clone()) for _ in range(2)]

    cache = PrefixCache(max_bytes=1 << 20)
    first = prompt("Be brief.", "What is a cat?")
    cache.add("a1", first, kv(len(first)))
    second = prompt("Be brief.", "What is a dog?")
    layers, n = cache.lookup("a1", second)
    assert 0 < n < len(second) and first[:n] == second[:n] and first[n] != second[n]
    assert layers[1][0].shape == (1, 2, n, 4) and torch.equal(
        layers[1][1][0, 0, :, 0], -torch.arange(n).float()
    )
    assert cache.lookup("a2", second) == (None, 0)  # another adapter computes other keys
    other = prompt("Answer at length.", "What is a cat?")  # another system prompt: a shorter hit
    _, m = cache.lookup("a1", other)
    assert m < n and first[:m] == other[:m] and first[m] != other[m]
    assert cache.lookup("a1", first)[1] == len(first) - 1  # its last token still runs

    cache.add("a1", first[:-3], kv(len(first) - 3))  # a prompt already covered adds nothing
    assert len(cache.entries) == 1
    small = PrefixCache(max_bytes=2 * sum(k.nbytes + v.nbytes for k, v in kv(len(first))))
    for question in ("One?", "Two?", "Three?"):
        p = prompt("Be brief.", question)
        small.add(BASE, p, kv(len(p)))
    assert [key[1] for key in small.entries] == [tuple(prompt("Be brief.", q)) for q in ("Two?", "Three?")]
    assert small.bytes <= small.max_bytes


def test_n_choices_and_seed(two_adapters):
    model, tokenizer, chat = two_adapters
    engine = BatchEngine(model, tokenizer, chat.stop_ids(), max_rows=4, max_queued=4, peft=True)
    try:
        prompt = chat.encode_prompt([{"role": "user", "content": "Hello"}])
        runs = []
        for _ in range(2):
            job = Job(prompt, "a1", Sampling(max_tokens=8, temperature=1.0, seed=7), n=3)
            events = collect(job)
            engine.submit(job)
            assert job.done.wait(60)
            runs.append([answer([e for e in events if e.index == k and e.kind != "done"]) for k in range(3)])
        assert runs[0] == runs[1]  # the same seed samples the same answers
        assert len({text for text, _ in runs[0]}) > 1  # each choice has its own generator
        with pytest.raises(ValueError, match="rows generated at once"):
            engine.submit(Job(prompt, "a1", Sampling(max_tokens=8), n=5))
    finally:
        engine.close()


def test_text_stream_holds_back_a_possible_stop_string(smol_tokenizer):
    tok = smol_tokenizer
    ids = tok("Hello world, the END is near", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, ["END"])
    pieces, hit = [], False
    for t in ids:
        piece, hit = stream.push(t)
        pieces.append(piece)
        if hit:
            break
    assert hit and "".join(pieces) == "Hello world, the "
    stream = TextStream(tok, ["world!"])  # a prefix that turns out not to be the stop string
    pieces = [stream.push(t)[0] for t in ids]
    assert "".join(pieces) + stream.flush() == "Hello world, the END is near"
    assert "world" not in pieces[1]  # " world" could have begun "world!": held back until ","


def test_sampling_keeps_to_top_k_and_top_p():
    logits = torch.tensor([5.0, 4.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, Sampling(1, temperature=1.0, top_k=2), g) for _ in range(200)} == {0, 1}
    assert {sample(logits, Sampling(1, temperature=1.0, top_p=0.5), g) for _ in range(50)} == {0}
    assert sample(logits, Sampling(1, temperature=0.0), None) == 0
