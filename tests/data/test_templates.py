"""Every real chat template of llama.cpp's corpus (70 models' templates, from the llama-cpp-python
0.3.36 source package, which `make test` fetches) either encodes with a verified mask or is
refused with one line.

Each template runs with the SmolLM2 tokenizer, to which the control tokens the template writes
(`<|im_end|>`, `<｜Assistant｜>`, `[INST]`, `<think>` ...) are added as special tokens, as the
model's own tokenizer has them. The checks do not reuse lorakit's rendering: the supervised text
of each turn must decode to the answer as written, wrapped only in template markup and ended by
a stop token of ChatFormat.stop_ids() (where generation stops); the tokens before each row's last
answer must be encode_prompt of the conversation before it, whose text is the template's own
render (tokenizer.apply_chat_template). `python tests/data/test_templates.py` prints the tally.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.core.errors import LorakitError
from lorakit.core.labels import IGNORE_INDEX
from lorakit.data.template import ChatFormat

from ..conftest import conversations_of

CORPUS_ENV = "LORAKIT_TEMPLATE_CORPUS"  # a directory of *.jinja templates
SKIP_ENV = "LORAKIT_ALLOW_NO_TEMPLATES"  # "1": skip (not fail) where the corpus is missing
LLAMA_CPP_ENV = "LORAKIT_LLAMA_CPP"  # else: llama.cpp's source tree, whose models/templates is the corpus

# Control-token literals as chat templates write them.
CONTROL = re.compile(
    r"<\|[^<>|\s]{1,48}\|>|<｜[^<>｜\s]{1,48}｜>|<\|[\w\"]{1,24}>|<[\w\"]{1,24}\|>"
    r"|\[/?[A-Z][A-Z_]{1,30}\]|\[gMASK\]|\]~!?b\]|\[e~\[|\]~!b\["
    r"|</?think>|<start_of_turn>|<end_of_turn>|<SPECIAL_\d+>|<sop>|<seed:[a-z_]+>|<sep>"
    r"|<(?:beginning|end)_of_sentence>|</?(?:system|user|assistant)>"
)

SYSTEM = {"role": "system", "content": "Answer in one short sentence."}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}],
    "system": [
        SYSTEM,
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue is a colour."},
    ],
    "multi": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 3+4?"},
        {"role": "assistant", "content": "It is 7."},
    ],
}


def corpus_dir() -> Path | None:
    """The corpus: $LORAKIT_TEMPLATE_CORPUS, or llama.cpp's models/templates in the source tree
    that `make test` fetches (from the llama-cpp-python source package) and names in $LORAKIT_LLAMA_CPP."""
    if os.environ.get(CORPUS_ENV):
        path = Path(os.environ[CORPUS_ENV])
    elif os.environ.get(LLAMA_CPP_ENV):
        path = Path(os.environ[LLAMA_CPP_ENV]) / "models" / "templates"
    else:
        return None
    return path if any(path.glob("*.jinja")) else None


def corpus() -> list[Path]:
    path = corpus_dir()
    if path is None:
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(
                f"no chat template corpus in ${CORPUS_ENV} or ${LLAMA_CPP_ENV}/models/templates ({SKIP_ENV}=1)"
            )
        pytest.fail(
            f"no chat template corpus: run `make test` (it fetches llama.cpp's source) or set ${LLAMA_CPP_ENV} "
            f"or ${CORPUS_ENV}"
        )
    return sorted(path.glob("*.jinja"))


def control_tokens(template: str) -> list[str]:
    """The control tokens a template writes, including those it builds with str.format
    (Hunyuan: `'<｜hy_eos{}｜>'.format(HYTK)` with `{%- set HYTK = ':opensource' %}`)."""
    found = set(CONTROL.findall(template))
    values = dict(re.findall(r"set (\w+) = '([^']*)'", template))
    for literal, name in re.findall(r"'(<[^'<>]*\{\}[^'<>]*>)'\.format\((\w+)\)", template):
        found.add(literal.format(values.get(name, "")))
    return sorted(found)


def tokenizer_for(base, template: str):
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"additional_special_tokens": control_tokens(template)})
    tok.chat_template = template
    return tok


_FORMATS: dict[str, tuple] = {}


def chat_format(base, path: Path) -> tuple:
    """(tokenizer, ChatFormat or the LorakitError of building it, what it said) per template."""
    if path.name not in _FORMATS:
        tok = tokenizer_for(base, path.read_text(encoding="utf-8"))
        said = io.StringIO()
        with contextlib.redirect_stdout(said):
            try:
                chat: ChatFormat | LorakitError = ChatFormat(tok)
            except LorakitError as e:
                chat = e
        _FORMATS[path.name] = (tok, chat, said.getvalue())
    return _FORMATS[path.name]


def supervised_runs(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of supervised positions."""
    runs, start = [], None
    for k, lab in enumerate([*labels, IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = k
        elif lab == IGNORE_INDEX and start is not None:
            runs.append((start, k))
            start = None
    return runs


def check_answer(tok, chat: ChatFormat, ids: list[int], content: str, others: list[str], last: bool) -> str:
    """The supervised tokens of one turn: markup, the answer as written, markup, a stop token
    (which an earlier turn of a row lacks only where the template writes no token after it).
    Returns the markup before the answer (e.g. `<think>\\n\\n</think>\\n\\n`)."""
    stops = ids[-1] in chat.stop_ids()
    assert stops or not last, f"the turn ends with {tok.decode(ids[-1:])!r}, not a stop token"
    text = tok.decode(ids[:-1] if stops else ids)
    key = content.strip()
    assert key in text, f"{key!r} is not in the supervised text {text!r}"
    before, after = text[: text.rindex(key)], text[text.rindex(key) + len(key) :]
    assert not CONTROL.sub("", after).strip(), f"text after the answer: {after!r}"
    markup = CONTROL.sub("", before)
    assert not any(len(o.strip()) > 3 and o.strip() in markup for o in others), f"another message: {before!r}"
    assert len(markup) < 40, f"long markup before the answer: {before!r}"
    return before


def check_rows(tok, chat: ChatFormat, messages: list[dict], rows, last_only: bool = False) -> list[str]:
    """Every assistant turn supervised once, in order, as check_answer says; the tokens before
    each row's last answer are encode_prompt of the conversation before it, whose text is the
    template's own render. Returns the markup before each answer."""
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    turns = turns[-1:] if last_only else turns
    others = [m["content"] for m in messages if m["role"] != "assistant"]
    markup, done = [], 0
    for ids, labels, _ in rows:
        assert len(ids) == len(labels) and all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
        runs = supervised_runs(labels)
        assert runs and done + len(runs) <= len(turns), "more supervised answers than assistant turns"
        for start, end in runs:
            content = messages[turns[done]]["content"]
            markup.append(check_answer(tok, chat, ids[start:end], content, others, (start, end) == runs[-1]))
            done += 1
        last = turns[done - 1]
        prompt = chat.encode_prompt(messages[:last])
        assert ids[: runs[-1][0]] == prompt, "the tokens before the last answer are not the inference prompt"
        expected = tok.apply_chat_template(
            chat._fold_system(messages[:last]) if chat.system_folded else messages[:last],
            tokenize=False,
            add_generation_prompt=True,
            **chat.variables,
        )
        assert tok.decode(prompt).endswith(expected)
    assert done == len(turns), f"{done} of {len(turns)} assistant turns supervised"
    return markup


def outcome(base, path: Path, messages: list[dict]) -> str:
    """ "ok", "ok, N rows" or "refused: <reason>"; any other exception, or a failed check, raises."""
    tok, chat, _ = chat_format(base, path)
    try:
        if isinstance(chat, LorakitError):
            raise chat
        rows = chat.encode_conversation_rows(messages)
    except LorakitError as e:
        assert "\n" not in str(e) and "Traceback" not in str(e)
        return f"refused: {e}"
    check_rows(tok, chat, messages, rows)
    return "ok" if len(rows) == 1 else f"ok, {len(rows)} rows"


def tally(base) -> dict[str, dict[str, str]]:
    return {p.stem: {k: outcome(base, p, m) for k, m in CONVERSATIONS.items()} for p in corpus()}


def test_every_template_encodes_verified_or_refuses_in_one_line(smol_tokenizer, capsys):
    results = tally(smol_tokenizer)
    counts = Counter(v.split(":")[0].split(",")[0] for r in results.values() for v in r.values())
    with capsys.disabled():
        print(
            f"\nchat template corpus: {len(results)} templates x {len(CONVERSATIONS)} conversations: {dict(counts)}"
        )
        for name, r in results.items():
            bad = {k: v for k, v in r.items() if v != "ok"}
            if bad:
                print(f"  {name}: {bad}")
    assert len(results) >= 70
    assert counts["ok"] >= 200  # the tally of this commit: see README


def test_gemma2_system_prompt_goes_into_the_first_user_turn(smol_tokenizer):
    [path] = [p for p in corpus() if p.stem == "google-gemma-2-2b-it"]
    tok = tokenizer_for(smol_tokenizer, path.read_text(encoding="utf-8"))
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        chat = ChatFormat(tok)
        rows = [chat.encode_conversation(CONVERSATIONS["system"]) for _ in range(3)]
    assert said.getvalue().count("no system role") == 1
    ids, labels, _ = rows[0]
    first = next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert tok.decode(ids[:first]).endswith(
        "<start_of_turn>user\nAnswer in one short sentence.\n\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
    )
    assert tok.decode(ids[first:]) == "Blue is a colour.<end_of_turn>\n"


def test_a_template_that_rewrites_history_trains_one_row_per_turn(smol_tokenizer):
    """Qwen3 drops the empty reasoning block from past turns: each turn is its own row, exactly
    as inference saw it, and the data report says so."""
    from lorakit.data.encode import encode_samples
    from lorakit.data.formats import DataReport, Sample

    [path] = [p for p in corpus() if p.stem == "Qwen-Qwen3-0.6B"]
    tok, chat, _ = chat_format(smol_tokenizer, path)
    report = DataReport(rows=1)
    rows = encode_samples([Sample("f:1", "chat", CONVERSATIONS["multi"])], chat, 512, report=report)
    assert len(rows) == 2 and report.split_conversations == 1
    assert "trained as one row per run of turns" in report.summary()
    for row, answer in zip(rows, ["Hello! How can I help?", "It is 7."]):
        first = next(k for k, lab in enumerate(row["labels"]) if lab != IGNORE_INDEX)
        assert tok.decode(row["input_ids"][first:]) == f"<think>\n\n</think>\n\n{answer}<|im_end|>\n"


def test_inline_reasoning_trains_where_the_template_keeps_it(smol_tokenizer):
    """`<think>...</think>answer` in an answer: Qwen3 moves the reasoning into its block (trained);
    DeepSeek-R1 drops it from the finished turn (refused, rather than trained without it)."""
    msgs = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\nIt is 4."},
    ]
    for name, kept in (("Qwen-Qwen3-0.6B", True), ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B", False)):
        [path] = [p for p in corpus() if p.stem == name]
        tok = copy.deepcopy(smol_tokenizer)  # <think> as plain text, as in Qwen3's own tokenizer
        tok.chat_template = path.read_text(encoding="utf-8")
        chat = ChatFormat(tok)
        if not kept:
            with pytest.raises(LorakitError, match="drops part of this assistant answer"):
                chat.encode_conversation(msgs)
            continue
        ids, labels, _ = chat.encode_conversation(msgs)
        supervised = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
        assert supervised == "<think>\nTwo and two.\n</think>\n\nIt is 4.<|im_end|>"


def test_template_errors_are_one_line(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = (
        "{% if messages|length > 2 %}{{ raise_exception('Only one exchange is supported') }}{% endif %}"
        + tok.chat_template
    )
    chat = ChatFormat(tok)
    with pytest.raises(LorakitError, match=r"^the chat template cannot render this conversation: Only one"):
        chat.encode_conversation(CONVERSATIONS["multi"])
    tok.chat_template = "{% for m in messages %}{{ m.content }"
    with pytest.raises(LorakitError, match=r"^the chat template cannot render") as e:
        ChatFormat(tok)
    assert "\n" not in str(e.value)


def test_without_an_end_marker_eos_ends_the_row_only(smol_tokenizer):
    """A template with no end-of-turn token: EOS is taught once, where inference stops (after
    the row's last answer), never inside the conversation."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    chat = ChatFormat(tok)
    ids, labels, _ = chat.encode_conversation(CONVERSATIONS["multi"])
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == labels[-1] == tok.eos_token_id
    assert ids[: supervised_runs(labels)[-1][0]] == chat.encode_prompt(CONVERSATIONS["multi"][:3])


# Plain text without markup characters (a control token inside a message is refused by design).
text = st.text(
    st.characters(whitelist_categories=("L", "N", "Zs"), whitelist_characters=".,?!'\n-"),
    min_size=1,
    max_size=24,
).filter(lambda s: s.strip())


def conversations():
    return conversations_of(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), msgs=conversations(), last_only=st.booleans())
def test_random_conversations_train_on_the_inference_prompt(smol_tokenizer, data, msgs, last_only):
    """In every row, the tokens before the last answer are what inference feeds for that turn,
    and every supervised turn is there once (or the template refuses the row in one line)."""
    path = data.draw(st.sampled_from(corpus()), label="template")
    tok, chat, _ = chat_format(smol_tokenizer, path)
    try:
        if isinstance(chat, LorakitError):
            raise chat
        rows = chat.encode_conversation_rows(msgs, last_only)
    except LorakitError as e:
        assert "\n" not in str(e)
        return
    turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    turns = turns[-1:] if last_only else turns
    runs = [supervised_runs(labels) for _, labels, _ in rows]
    assert sum(len(r) for r in runs) == len(turns)
    done = 0
    for (ids, _, _), row_runs in zip(rows, runs):
        done += len(row_runs)
        assert ids[: row_runs[-1][0]] == chat.encode_prompt(msgs[: turns[done - 1]])


if __name__ == "__main__":
    from transformers import AutoTokenizer

    from lorakit.models.loading import resolve_base_model

    base = AutoTokenizer.from_pretrained(resolve_base_model("").path)
    for name, r in tally(base).items():
        print(f"| {name} | " + " | ".join(r[k] for k in CONVERSATIONS) + " |")


def test_the_direct_render_equals_apply_chat_template(smol_tokenizer):
    """ChatFormat renders through the compiled template directly (the fast path) only where it
    gives apply_chat_template's text: checked here on every prefix of every test conversation,
    with and without the generation prompt, for the whole corpus."""
    fast = 0
    for path in corpus():
        tok = tokenizer_for(smol_tokenizer, path.read_text(encoding="utf-8"))
        chat = ChatFormat(tok)
        fast += chat._direct is not None
        for msgs in CONVERSATIONS.values():
            msgs = chat._fold_system(msgs) if chat.system_folded else msgs
            for n, gen in [(n, gen) for n in range(1, len(msgs) + 1) for gen in (False, True)]:
                try:
                    expected = tok.apply_chat_template(
                        msgs[:n], tokenize=False, add_generation_prompt=gen, **chat.variables
                    )
                except Exception:  # some templates refuse some prefixes (no user turn yet, ...)
                    with pytest.raises(LorakitError):
                        chat._apply(msgs[:n], gen, chat.variables)
                    continue
                assert chat._apply(msgs[:n], gen, chat.variables) == expected, (path.name, n, gen)
    assert fast == len(corpus())  # every real template of the corpus takes the fast path
