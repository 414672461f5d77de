import pytest
import torch

from lorakit.core.errors import LorakitError
from lorakit.core.labels import IGNORE_INDEX
from lorakit.data.encode import encode_rows
from lorakit.data.formats import row_to_messages
from lorakit.data.template import ChatFormat
from lorakit.training.batching import Collator

ROW = {"instruction": "Assemble this.", "input": "LDA #$12", "output": "A9 12"}


def supervised_text(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_only_assistant_and_end_of_turn_are_supervised(smol_tokenizer):
    chat = ChatFormat(smol_tokenizer)
    msgs = row_to_messages(ROW, "x:1", "You are an expert SNES developer.")
    ids, labels, _ = chat.encode_conversation(msgs)
    assert len(ids) == len(labels)
    assert supervised_text(smol_tokenizer, ids, labels) == "A9 12<|im_end|>"
    # Everything before the answer (system, user, the assistant header) is masked.
    first = next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    prompt = chat.encode_prompt(msgs[:-1])
    assert ids[:first] == prompt
    assert all(lab == IGNORE_INDEX for lab in labels[:first])
    # The end-of-turn token is supervised; ChatML's trailing newline after it is not.
    eot = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    k = ids.index(eot, first)
    assert labels[k] == eot
    assert all(lab == IGNORE_INDEX for lab in labels[k + 1 :])


def test_training_text_matches_inference_prompt(smol_tokenizer):
    chat = ChatFormat(smol_tokenizer)
    msgs = row_to_messages(ROW, "x:1", "sys")
    ids, _, _ = chat.encode_conversation(msgs)
    expected = (
        smol_tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        + "A9 12<|im_end|>\n"
    )
    assert smol_tokenizer.decode(ids) == expected


def test_user_turn_is_instruction_blank_line_input(smol_tokenizer):
    msgs = row_to_messages(ROW, "x:1", "sys")
    assert msgs == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Assemble this.\n\nLDA #$12"},
        {"role": "assistant", "content": "A9 12"},
    ]
    no_input = row_to_messages({"instruction": "Say hi.", "input": "", "output": "hi"}, "x:1", "")
    assert no_input == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    own_system = row_to_messages({**ROW, "system": "Row system."}, "x:1", "default")
    assert own_system[0]["content"] == "Row system."


def test_eos_equal_to_pad_is_still_supervised_after_collation(smol_tokenizer):
    assert smol_tokenizer.pad_token_id == smol_tokenizer.eos_token_id  # the SmolLM2 trap
    examples, _ = encode_rows(
        [("a:1", ROW), ("a:2", {**ROW, "output": "A9 12 A9 12 A9 12"})], smol_tokenizer, "sys", 512
    )
    batch = Collator(smol_tokenizer.pad_token_id)(examples)
    eos = smol_tokenizer.eos_token_id
    for row in range(2):
        supervised = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert supervised[-1] == eos
    # Padding is masked by position: the short row's pad positions are -100 and attention 0.
    short = batch["attention_mask"][0].sum().item()
    assert short < batch["input_ids"].shape[1]
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and (
        batch["attention_mask"][0, short:] == 0
    ).all()


def test_mask_identical_padded_or_not(smol_tokenizer):
    examples, _ = encode_rows(
        [("a:1", ROW), ("a:2", {**ROW, "input": "LDA #$12 ; with a much longer comment here"})],
        smol_tokenizer,
        "sys",
        512,
    )
    batch = Collator(smol_tokenizer.pad_token_id)(examples)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["labels"][row, :n].tolist() == ex["labels"]
        assert batch["input_ids"][row, :n].tolist() == ex["input_ids"]


def test_multi_turn_supervises_every_assistant_turn(smol_tokenizer):
    chat = ChatFormat(smol_tokenizer)
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    ids, labels, _ = chat.encode_conversation(msgs)
    assert supervised_text(smol_tokenizer, ids, labels) == "a1<|im_end|>a2<|im_end|>"
    assert smol_tokenizer.decode(ids) == smol_tokenizer.apply_chat_template(msgs, tokenize=False)


def test_llama3_style_template_with_bos_in_text(llama3_tokenizer):
    """A template that writes BOS itself must not get a second BOS from the tokenizer."""
    tok = llama3_tokenizer
    chat = ChatFormat(tok)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " yo "}]
    ids, labels, _ = chat.encode_conversation(msgs)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert supervised_text(tok, ids, labels) == "yo<file_sep>"
    assert chat.end_of_turn_id == tok.convert_tokens_to_ids("<file_sep>")
    assert chat.encode_prompt(msgs[:1]).count(tok.bos_token_id) == 1


def test_template_without_bos_gets_the_tokenizers_bos(llama3_tokenizer):
    import copy

    tok = copy.deepcopy(llama3_tokenizer)
    tok.chat_template = tok.chat_template.replace("{{ bos_token }}", "")
    ids, labels, _ = ChatFormat(tok).encode_conversation(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    )
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert labels[0] == IGNORE_INDEX and len(ids) == len(labels)


def test_overlength_drop_truncate_error(smol_tokenizer):
    long_row = {**ROW, "input": "LDA " * 200}
    rows = [("f:1", ROW), ("f:2", long_row)]
    kept, report = encode_rows(rows, smol_tokenizer, "sys", 64, "drop")
    assert len(kept) == 1 and report.dropped_overlength == ["f:2"]
    # Truncating the long row would cut the whole answer: it is dropped, never trained silently.
    kept, report = encode_rows(rows, smol_tokenizer, "sys", 64, "truncate")
    assert len(kept) == 1 and report.dropped_overlength == ["f:2"]
    with pytest.raises(LorakitError, match="f:2: .* > max_seq_length 64"):
        encode_rows(rows, smol_tokenizer, "sys", 64, "error")


def test_collator_dtypes(smol_tokenizer):
    examples, _ = encode_rows([("a:1", ROW)], smol_tokenizer, "sys", 512)
    batch = Collator(smol_tokenizer.pad_token_id, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[1] % 8 == 0
