"""Property tests: random conversations through real chat templates (SmolLM2's ChatML and a
Llama-3-style template built locally)."""

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lorakit.core.labels import IGNORE_INDEX
from lorakit.data.template import ChatFormat
from lorakit.training.batching import Collator

from ..conftest import conversations_of

SPECIALS = ("<|", "|>", "<repo", "<file", "<issue", "<jupyter", "<empty", "<gh_", "<filename", "<reponame")
text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from(list("\n\t ")), min_size=1, max_size=30
).filter(lambda s: s.strip() and not any(t in s for t in SPECIALS))


def conversations():
    return conversations_of(text)


PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def round_trips(tok, msgs):
    """Characters the tokenizer itself cannot decode back (e.g. unassigned code points the GGUF
    vocabulary lacks) say nothing about the mask: such inputs are skipped."""
    return all(
        tok.decode(tok(m["content"], add_special_tokens=False)["input_ids"]) == m["content"] for m in msgs
    )


def check_supervision(tok, msgs, end_token, trim, last_only=False):
    assume(round_trips(tok, msgs))
    chat = ChatFormat(tok)
    ids, labels, _ = chat.encode_conversation(msgs, last_only=last_only)
    assert len(ids) == len(labels)
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    if last_only:
        answers = answers[-1:]
    expected = "".join((a.strip() if trim else a) + end_token for a in answers)
    supervised = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(supervised) == expected
    # Labels equal the input ids wherever they are set (no shifted or foreign labels).
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    # The tokens before the last answer are exactly the prompt inference feeds for it.
    turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    last_prompt = chat.encode_prompt(msgs[: turns[-1]])
    assert ids[: len(last_prompt)] == last_prompt
    # Nothing before the first supervised answer is supervised: its prompt's text is all -100.
    # (Earlier turns sit inside the last prompt, tokenized as one text: where BPE merges a
    # boundary differently, e.g. Llama 3's "\n\n" before an answer, their ids differ, not the text.)
    first = next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    first_turn = turns[-1] if last_only else turns[0]
    assert tok.decode(ids[:first]) == tok.decode(chat.encode_prompt(msgs[:first_turn]))
    return ids, labels


@PROPS
@given(msgs=conversations())
def test_chatml_supervises_exactly_the_answers(smol_tokenizer, msgs):
    ids, labels = check_supervision(smol_tokenizer, msgs, "<|im_end|>", trim=False)
    # Count check: each answer's own tokens plus one end-of-turn token, nothing else.
    n = sum(
        len(smol_tokenizer(m["content"], add_special_tokens=False)["input_ids"]) + 1
        for m in msgs
        if m["role"] == "assistant"
    )
    assert sum(lab != IGNORE_INDEX for lab in labels) == n


@PROPS
@given(msgs=conversations())
def test_llama3_style_supervises_exactly_the_answers(llama3_tokenizer, msgs):
    ids, _ = check_supervision(llama3_tokenizer, msgs, "<file_sep>", trim=True)
    assert ids.count(llama3_tokenizer.bos_token_id) == 1


@PROPS
@given(msgs=conversations())
def test_last_turn_only(smol_tokenizer, msgs):
    check_supervision(smol_tokenizer, msgs, "<|im_end|>", trim=False, last_only=True)


@PROPS
@given(a=conversations(), b=conversations())
def test_mask_identical_padded_or_not(smol_tokenizer, a, b):
    chat = ChatFormat(smol_tokenizer)
    rows = []
    for msgs in (a, b):
        ids, labels, _ = chat.encode_conversation(msgs)
        rows.append({"input_ids": ids, "labels": labels})
    batch = Collator(smol_tokenizer.pad_token_id, pad_to_multiple_of=8)(rows)
    for k, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["labels"][k, :n].tolist() == r["labels"]
        assert (batch["labels"][k, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][k].sum().item() == n


@pytest.mark.parametrize("fixture", ["smol_tokenizer", "llama3_tokenizer"])
def test_inference_prompt_plus_answer_is_the_training_text(request, fixture):
    tok = request.getfixturevalue(fixture)
    chat = ChatFormat(tok)
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    ids, labels, _ = chat.encode_conversation(msgs)
    prompt = chat.encode_prompt(msgs[:-1])
    assert ids[: len(prompt)] == prompt  # the exact tokens `generate` feeds the model
    generated = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert ids[len(prompt) : len(prompt) + len(generated)] == generated  # the answer follows directly


@PROPS
@given(batch=st.lists(conversations(), min_size=1, max_size=6), last_only=st.booleans())
def test_batched_encoding_equals_one_call_per_text(smol_tokenizer, llama3_tokenizer, batch, last_only):
    """Whole batches go straight to the Rust tokenizer; the result is what the HF tokenizer,
    called once per text, gives."""
    for tok in (smol_tokenizer, llama3_tokenizer):
        batched = ChatFormat(tok)
        assert batched.batched
        one_by_one = ChatFormat(tok)
        one_by_one.batched = False
        assert batched.encode_conversations(batch, last_only) == [
            one_by_one.encode_conversation_rows(m, last_only) for m in batch
        ]
