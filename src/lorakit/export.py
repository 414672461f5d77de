"""`lorakit export`: GGUF (model and LoRA adapter), Ollama Modelfile, vLLM command — all with
the chat template the model was trained with.

GGUF files are written with the `gguf` package (llama.cpp's own Python library): its tensor-name
map and quantizers are used as they are. What each architecture needs beyond that (metadata keys,
q/k layout, norm offsets, RoPE factor tensors) is one record per family in families.py; the
vocabulary (byte-level BPE or SentencePiece) and the Ollama TEMPLATE are written here. For other
architectures, llama.cpp's own converters run when the user has a llama.cpp tree.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .adapter import Adapter, open_adapter
from .config import ExportConfig, MergeConfig, narrow
from .errors import LorakitError
from .families import FAMILIES, Family, family_of
from .io import atomic_write_text, say
from .pretokenizer import name_for_tokenizer

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def family_for(config) -> Family:
    """The GGUF record of a model's architecture, or an error naming what is supported."""
    family = family_of(config.model_type)
    if family is None:
        raise LorakitError(
            f"lorakit writes GGUF for the {', '.join(FAMILIES)} families, not '{config.model_type}'; "
            "give --llama_cpp_dir (or LORAKIT_LLAMA_CPP) to use llama.cpp's own converter"
        )
    return family


def _permute_rotary(w, n_head: int):
    """HF stores each rotary head as [first halves; second halves]; GGUF's Llama layout
    interleaves them. Same maths as llama.cpp's converter (the inverse of HF's conversion)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rotary_heads(name: str, hparams: dict) -> int | None:
    """Heads to permute in a q/k projection (weight, bias or LoRA B) of a rotary-permuted family."""
    if re.search(r"q_proj(\.weight|\.bias)?$", name):
        return hparams["num_attention_heads"]
    if re.search(r"k_proj(\.weight|\.bias)?$", name):
        return hparams.get("num_key_value_heads", hparams["num_attention_heads"])
    return None


def _add_architecture(writer, family: Family, hparams: dict) -> None:
    import gguf

    for method, value in family.metadata(hparams):
        if method == "add_rope_scaling_type":
            value = gguf.RopeScalingType[value]
        getattr(writer, method)(value)


def _token_type(token, added: dict):
    import gguf

    a = added.get(token)
    if a is None:
        return gguf.TokenType.NORMAL
    return gguf.TokenType.CONTROL if a.special else gguf.TokenType.USER_DEFINED


def _add_bpe_vocab(writer, tokenizer, vocab_size: int, pre: str) -> None:
    """Byte-level BPE (Llama 3, Qwen, SmolLM2 ...): tokens, types, merges, pre-tokenizer name."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise LorakitError(
            f"GGUF export writes byte-level BPE or SentencePiece vocabularies; this tokenizer is "
            f"{spec['model']['type']} without a tokenizer.model"
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        tokens.append(f"[PAD{i}]" if token is None else token)
        types.append(gguf.TokenType.UNUSED if token is None else _token_type(token, added))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def _sentencepiece_pieces(path: Path):
    """(piece, score, type) of a SentencePiece model file. Read with the protobuf schema that
    transformers ships (protobuf is installed with tensorboard), so export needs no sentencepiece."""
    from transformers.convert_slow_tokenizer import import_protobuf

    model = import_protobuf().ModelProto()
    model.ParseFromString(path.read_bytes())
    return [(p.piece, p.score, p.type) for p in model.pieces]


def _add_spm_vocab(writer, tokenizer, vocab_size: int, model_file: Path) -> None:
    """SentencePiece (Gemma, Phi-3, Llama 2, Mistral v0.1-0.3): pieces, scores and types from
    tokenizer.model, the tokenizer's added tokens over them, unused ids as [PADn] (as llama.cpp's
    converter fills them)."""
    import gguf

    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i, (piece, score, kind) in enumerate(_sentencepiece_pieces(model_file)[:vocab_size]):
        tokens[i], scores[i] = piece, score
        # SentencePiece's own types share GGUF's numbers; its user-defined pieces count as
        # normal until the tokenizer declares them (below), as in llama.cpp's converter.
        types[i] = gguf.TokenType.NORMAL if kind == gguf.TokenType.USER_DEFINED else gguf.TokenType(kind)
    for i, token in tokenizer.added_tokens_decoder.items():
        if i < vocab_size:
            special = token.special
            tokens[i] = token.content if special else token.content.replace("\u2581", " ")
            scores[i] = -1000.0
            types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def _add_metadata(writer, family: Family, hparams: dict, model_dir: Path, tokenizer, base_gguf: str) -> None:
    writer.add_name(model_dir.name)
    _add_architecture(writer, family, hparams)
    model_file = model_dir / "tokenizer.model"
    if family.vocab == "spm" or (family.vocab == "auto" and model_file.is_file()):
        if not model_file.is_file():
            raise LorakitError(
                f"{model_dir}: no tokenizer.model; {family.arch} GGUF files carry the SentencePiece "
                "vocabulary: copy tokenizer.model from the base model into this directory"
            )
        _add_spm_vocab(writer, tokenizer, hparams["vocab_size"], model_file)
        if family.add_space_prefix is not None:
            writer.add_add_space_prefix(family.add_space_prefix)
    else:
        _add_bpe_vocab(writer, tokenizer, hparams["vocab_size"], name_for_tokenizer(tokenizer, base_gguf))
    for setter, tid in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
    ):
        if tid is not None:
            setter(tid)
    from .data import ChatFormat

    chat = ChatFormat(tokenizer)
    writer.add_add_bos_token(bool(chat.prefix_ids))
    if chat.end_of_turn_id is not None:
        writer.add_eot_token_id(chat.end_of_turn_id)
    writer.add_chat_template(tokenizer.chat_template or "")


def _tensor_data(array, quant: str, two_d: bool):
    """(numpy data, raw GGML type or None) for a tensor at the requested precision."""
    import gguf
    import numpy as np

    array = array.astype(np.float32)
    if not two_d or quant == "f32":
        return array, None
    if quant == "f16":
        return array.astype(np.float16), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[quant]
    if quant == "q8_0" and array.shape[-1] % 32:
        return array.astype(np.float16), None  # Q8_0 needs rows in blocks of 32
    return gguf.quants.quantize(array, qtype), qtype


def _file_type(quant: str) -> int:
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[quant]


def write_gguf(model_dir: str | Path, path: str | Path, quant: str = "f16", base_gguf: str = "") -> Path:
    """A merged (or any plain) model directory of a family in families.py -> one GGUF file."""
    import gguf
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    model_dir, path = Path(model_dir), Path(path)
    config = AutoConfig.from_pretrained(model_dir)
    family = family_for(config)
    hparams = json.loads((model_dir / "config.json").read_text())
    hparams = {**hparams, **hparams.get("text_config", {})}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch.upper()], hparams["num_hidden_layers"])
    tied = hparams.get("tie_word_embeddings", False)
    tmp = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), family.arch)
    _add_metadata(writer, family, hparams, model_dir, tokenizer, base_gguf)
    writer.add_file_type(_file_type(quant))
    for tensor, data in family.extra_tensors(hparams).items():  # 1-D factors: always f32
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[tensor]] + ".weight", data)
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                if key == "lm_head.weight" and (tied or family.drop_lm_head):
                    continue
                new = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise LorakitError(f"{shard.name}: tensor {key} has no GGUF name for {family.arch}")
                t = f.get_tensor(key).to(torch.float32)
                heads = _rotary_heads(key, hparams) if family.permute_qk else None
                if heads is not None:
                    t = _permute_rotary(t, heads)
                if family.norm_offset and key.endswith("norm.weight"):
                    t = t + family.norm_offset
                data, raw = _tensor_data(t.numpy(), quant, t.ndim >= 2 and not new.endswith("_norm.weight"))
                writer.add_tensor(new, data, raw_dtype=raw)
    _write(writer, tmp, path)
    return path


def _write(writer, tmp: Path, path: Path) -> None:
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_lora_gguf(adapter: str | Path, path: str | Path, base_dir: str | Path) -> Path:
    """A PEFT LoRA adapter -> a llama.cpp GGUF LoRA (for Ollama's ADAPTER and llama.cpp --lora)."""
    import gguf
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    adapter, path = Path(adapter), Path(path)
    lora_cfg = Adapter.open(adapter).lora_config
    if lora_cfg.get("use_dora") or lora_cfg.get("modules_to_save"):
        raise LorakitError(
            "a GGUF LoRA cannot hold DoRA magnitudes or modules_to_save: merge and export the model instead"
        )
    family = family_for(AutoConfig.from_pretrained(base_dir))
    hparams = json.loads((Path(base_dir) / "config.json").read_text())
    hparams = {**hparams, **hparams.get("text_config", {})}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch.upper()], hparams["num_hidden_layers"])
    r, alpha = lora_cfg["r"], float(lora_cfg["lora_alpha"])
    # llama.cpp scales by alpha / r; rsLoRA scales by alpha / sqrt(r): write the alpha that gives that.
    if lora_cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(r)
    tmp = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), family.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    tensors = load_file(adapter / "adapter_model.safetensors")
    for key in sorted(tensors):
        m = re.match(r"base_model\.model\.(.+)\.lora_([AB])\.weight$", key)
        if not m:
            raise LorakitError(f"adapter tensor {key} is not a LoRA A/B matrix")
        module, which = m.groups()
        new = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if new is None:
            raise LorakitError(f"adapter module {module} has no GGUF name for {family.arch}")
        t = tensors[key].to(torch.float32)
        heads = _rotary_heads(module, hparams) if family.permute_qk and which == "B" else None
        if heads is not None:  # B's rows are the projection's output rows: they take the permutation
            t = _permute_rotary(t, heads)
        writer.add_tensor(f"{new}.lora_{which.lower()}", t.numpy())
    _write(writer, tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# Ollama


# Probe contents: characters no template writes itself, so each can be found in a render.
_U, _U2, _A, _S = "\x01U1\x01", "\x01U2\x01", "\x01A1\x01", "\x01S1\x01"


def _split(text: str, *markers: str) -> list[str]:
    """The literal pieces between the markers (each once, in order), or an error."""
    pieces = []
    for m in markers:
        if text.count(m) != 1:
            raise LorakitError(
                "the chat template rewrites message content; write the Modelfile TEMPLATE by hand"
            )
        before, text = text.split(m)
        pieces.append(before)
    return pieces + [text]


def _turn_end(ended: str, continued: str, special: list[str]) -> str:
    """The end of a user turn: what a render without the generation prompt writes after the user's
    content, as far as a render with it agrees (Phi-3 writes EOS instead of the prompt), cut back
    to a newline or the end of a special token."""
    common = os.path.commonprefix([ended, continued])
    if common == ended:
        return common
    cut = common.rfind("\n") + 1
    for token in special:
        at = common.rfind(token)
        if at >= 0:
            cut = max(cut, at + len(token))
    return common[:cut]


def _cuts_token(text: str, at: int, special: list[str]) -> bool:
    """Whether position `at` falls inside a special token's text."""
    for token in special:
        start = text.find(token)
        while start >= 0:
            if start < at < start + len(token):
                return True
            start = text.find(token, start + 1)
    return False


@dataclass
class ChatBlocks:
    """The literal text a chat template writes around each message, found by rendering probe
    conversations (Jinja cannot be translated to Go; its output for probes can be)."""

    head: str  # before the first user turn when there is no system message (a default system block)
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str  # the generation prompt after the last user turn
    system_head: str | None = None  # a system block: head with the system message ...
    system_tail: str = ""  # ... and after it (None: the template has no system role)
    system_in_user: str = ""  # "first" / "last": the system text opens that user message instead


def chat_blocks(tokenizer) -> ChatBlocks:
    from .data import ChatFormat

    # Rendered as training and inference render: with the same template variables, and a system
    # prompt folded into the first user turn where the template has no system role (Gemma 2).
    chat = ChatFormat(tokenizer)

    def render(msgs):
        return chat.render(msgs, add_generation_prompt=True)

    def render_ended(msgs):
        return chat.render(msgs, add_generation_prompt=False)

    user, asst, user2 = (
        {"role": r, "content": c} for r, c in (("user", _U), ("assistant", _A), ("user", _U2))
    )
    h0, h1 = _split(render([user]), _U)
    t0, t1, t2, t3 = _split(render([user, asst, user2]), _U, _A, _U2)
    if (t0, t3) != (h0, h1):
        raise LorakitError(
            "the chat template writes a turn differently by position; write the TEMPLATE by hand"
        )
    user_end = _turn_end(_split(render_ended([user]), _U)[1], h1, chat.special_texts)
    if not t1.startswith(user_end):
        raise LorakitError("the chat template's turns do not follow one another; write the TEMPLATE by hand")
    asst_pre = t1[len(user_end) :]
    # The assistant's end + the next user's opening: split where the opening matches the first one.
    if t2.startswith(user_end) and h0.endswith(t2[len(user_end) :]):
        cut = len(user_end)
    else:
        cut = next(
            k
            for k in range(len(t2) + 1)
            if h0.endswith(t2[k:])
            and not _cuts_token(t2, k, chat.special_texts)
            and not _cuts_token(h0, len(h0) - len(t2) + k, chat.special_texts)
        )
    asst_end, user_pre = t2[:cut], t2[cut:]
    head = h0[: len(h0) - len(user_pre)]
    if chat.template_writes_bos and chat.prefix_ids:
        # The GGUF says add_bos_token: llama.cpp and Ollama put BOS before the prompt themselves.
        head = head.removeprefix(tokenizer.bos_token)
    blocks = ChatBlocks(head, (user_pre, user_end), (asst_pre, asst_end), h1[len(user_end) :])
    system = {"role": "system", "content": _S}
    try:
        s0, s1, s2 = _split(render([system, user]), _S, _U)
    except LorakitError:
        raise
    except Exception:  # the template refuses a system message (Gemma 2): the TEMPLATE drops it
        return blocks
    if chat.template_writes_bos and chat.prefix_ids:
        s0 = s0.removeprefix(tokenizer.bos_token)
    if s2 != h1:
        raise LorakitError("a system message changes the chat template's turns; write the TEMPLATE by hand")
    if s1.endswith(user_pre) and not s0.endswith(user_pre):
        blocks.system_head, blocks.system_tail = s0, s1[: len(s1) - len(user_pre)]
    elif s0 == head + user_pre:  # the system text opens a user message: the first one or the last one
        d = render([system, user, asst, user2])
        blocks.system_head, blocks.system_tail = "", s1
        blocks.system_in_user = "first" if d.index(_S) < d.index(_U) else "last"
    else:
        raise LorakitError(
            "the chat template places the system message in a way lorakit cannot express in Go"
        )
    return blocks


def _go_literal(text: str) -> str:
    """Literal text inside a Go template: only '{{' needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(tokenizer) -> str:
    """The training chat template as an Ollama (Go text/template) TEMPLATE over .System and .Messages.

    Ollama passes every system message joined as .System and all messages as .Messages. No
    whitespace-trimming actions ({{- ... }}): they would eat the newlines the template writes.
    Jinja-side content edits (`| trim`) have no Go equivalent: content is written as it is.
    """
    b = chat_blocks(tokenizer)
    lit = _go_literal
    if b.system_head is not None and not b.system_in_user:
        opening = (
            "{{ if .System }}"
            + lit(b.system_head)
            + "{{ .System }}"
            + lit(b.system_tail)
            + "{{ else }}"
            + lit(b.head)
            + "{{ end }}"
        )
    else:
        opening = lit(b.head)
    user_open = lit(b.user[0])
    if b.system_in_user == "first":
        opening += "{{ $first := true }}"
        user_open += (
            "{{ if and $first $.System }}{{ $.System }}"
            + lit(b.system_tail)
            + "{{ end }}{{ $first = false }}"
        )
    elif b.system_in_user == "last":
        user_open += (
            "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}"
            + lit(b.system_tail)
            + "{{ end }}"
        )
    return (
        opening
        + "{{ range $i, $m := .Messages }}"
        + '{{ if eq .Role "user" }}'
        + user_open
        + "{{ .Content }}"
        + lit(b.user[1])
        + '{{ else if eq .Role "assistant" }}'
        + lit(b.assistant[0])
        + "{{ .Content }}"
        + lit(b.assistant[1])
        + "{{ end }}{{ end }}"
        + lit(b.generation)
    )


def _quoted(value: str) -> str:
    if '"""' in value:
        raise LorakitError('a Modelfile value cannot contain """')
    return f'"""{value}"""'


def modelfile(from_line: str, tokenizer, system: str, cfg: ExportConfig, adapter_line: str = "") -> str:
    from .data import ChatFormat

    chat = ChatFormat(tokenizer)
    stops = dict.fromkeys(tokenizer.convert_ids_to_tokens(i) for i in chat.stop_ids())
    lines = [f"FROM {from_line}"]
    if adapter_line:
        lines.append(f"ADAPTER {adapter_line}")
    lines.append(f"TEMPLATE {_quoted(ollama_template(tokenizer))}")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines += [
        f"PARAMETER temperature {cfg.temperature:g}",
        f"PARAMETER top_p {cfg.top_p:g}",
        f"PARAMETER top_k {cfg.top_k}",
    ]
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Commands


def _adapter(cfg: ExportConfig) -> Adapter | None:
    return open_adapter(cfg.adapter)


def _merged_dir(cfg: ExportConfig, out: Path) -> Path:
    """The merged model to export: --model, or a merge of --adapter into OUT/merged."""
    if cfg.model:
        if not (Path(cfg.model) / "config.json").is_file():
            raise LorakitError(f"--model {cfg.model}: no config.json (expected a merged model directory)")
        return Path(cfg.model)
    if not cfg.adapter:
        raise LorakitError("export needs --adapter DIR (trained adapter) or --model DIR (merged model)")
    merged = out / "merged"
    if not cfg.overwrite and _is_merge_of(merged, cfg):
        return merged
    from .merge import merge

    return merge(narrow(cfg, MergeConfig, output_dir=str(merged), overwrite=True))


def _is_merge_of(merged: Path, cfg: ExportConfig) -> bool:
    """A merge already in OUT/merged is reused only when it holds these adapter weights (a merge of
    another adapter, or of this one before it was retrained, is redone) in the asked-for dtype."""
    record = merged / "lorakit-merge.json"
    if not record.is_file():
        return False
    try:
        done = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    same_dtype = cfg.dtype == "auto" or done.get("dtype") == cfg.dtype
    return same_dtype and done.get("adapter_sha256") == Adapter.open(cfg.adapter).weights_sha256()


def _base_gguf(cfg: ExportConfig) -> str:
    """The GGUF file the adapter's base came from ('' for other bases): its pre-tokenizer name is kept."""
    adapter = _adapter(cfg)
    return adapter.resolve_base(cfg.base_model).gguf if adapter else ""


def llama_cpp_dir(cfg: ExportConfig) -> Path | None:
    """The llama.cpp source tree to convert with (--llama_cpp_dir, else $LORAKIT_LLAMA_CPP), if any."""
    where = cfg.llama_cpp_dir or os.environ.get("LORAKIT_LLAMA_CPP", "")
    if not where:
        return None
    path = Path(where).expanduser()
    if not (path / "convert_hf_to_gguf.py").is_file():
        flag = "--llama_cpp_dir" if cfg.llama_cpp_dir else "LORAKIT_LLAMA_CPP"
        raise LorakitError(
            f"{flag} {where}: no convert_hf_to_gguf.py there (expected a llama.cpp source tree)"
        )
    return path


def run_llama_cpp(llama_cpp: Path, script: str, *args: str) -> None:
    """One of llama.cpp's converter scripts, with this Python (it needs torch, transformers and,
    for SentencePiece vocabularies, sentencepiece) and the tree's own gguf-py."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(llama_cpp / "gguf-py"), os.environ.get("PYTHONPATH")])),
    )
    done = subprocess.run(
        [sys.executable, str(llama_cpp / script), *args], env=env, capture_output=True, text=True
    )
    if done.returncode:
        lines = [x for x in (done.stderr or done.stdout).strip().splitlines() if x.strip()]
        raise LorakitError(
            f"llama.cpp's {script} failed: {lines[-1] if lines else f'exit code {done.returncode}'}"
        )


def gguf_file(
    model_dir: Path, path: Path, quant: str, base_gguf: str = "", llama_cpp: Path | None = None
) -> Path:
    """A model directory -> GGUF: lorakit's writer for the families in families.py, llama.cpp's
    converter (when given) for the others or when lorakit's writer refuses the model."""
    try:
        return write_gguf(model_dir, path, quant, base_gguf)
    except LorakitError as e:
        if llama_cpp is None:
            raise
        say(f"lorakit: {e}; converting with llama.cpp's convert_hf_to_gguf.py")
    run_llama_cpp(
        llama_cpp, "convert_hf_to_gguf.py", str(model_dir), "--outfile", str(path), "--outtype", quant
    )
    return path


def lora_gguf_file(adapter: Path, path: Path, base_dir: str, llama_cpp: Path | None = None) -> Path:
    """A PEFT LoRA -> GGUF LoRA, with the same fallback to llama.cpp as gguf_file."""
    try:
        return write_lora_gguf(adapter, path, base_dir)
    except LorakitError as e:
        if llama_cpp is None or "DoRA" in str(e):
            raise
        say(f"lorakit: {e}; converting with llama.cpp's convert_lora_to_gguf.py")
    run_llama_cpp(
        llama_cpp,
        "convert_lora_to_gguf.py",
        str(adapter),
        "--base",
        str(base_dir),
        "--outfile",
        str(path),
        "--outtype",
        "f32",
    )
    return path


def _report_size(path: Path) -> Path:
    say(f"lorakit: wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return path


def export_gguf(cfg: ExportConfig, merged: Path | None = None) -> Path:
    out = Path(cfg.output_dir)
    merged = merged or _merged_dir(cfg, out)
    path = gguf_file(merged, out / f"model-{cfg.quant}.gguf", cfg.quant, _base_gguf(cfg), llama_cpp_dir(cfg))
    return _report_size(path)


def export_lora_gguf(cfg: ExportConfig) -> Path:
    adapter = _adapter(cfg)
    if adapter is None:
        raise LorakitError("a GGUF LoRA needs --adapter DIR")
    base = adapter.resolve_base(cfg.base_model).path
    return _report_size(
        lora_gguf_file(Path(cfg.adapter), Path(cfg.output_dir) / "adapter.gguf", base, llama_cpp_dir(cfg))
    )


def _relative(path: Path, out: Path) -> str:
    return (
        f"./{path.relative_to(out)}" if path.resolve().is_relative_to(out.resolve()) else str(path.resolve())
    )


def _write_modelfile(
    cfg: ExportConfig, out: Path, from_path: Path, tokenizer, adapter_line: str = ""
) -> Path:
    adapter = _adapter(cfg)
    system = cfg.system or (adapter.system_prompt if adapter else "")
    text = modelfile(_relative(from_path, out), tokenizer, system, cfg, adapter_line)
    path = atomic_write_text(out / "Modelfile", text)
    # Ollama imports a safetensors directory itself and quantizes it on `create -q`.
    quantize = " -q q4_K_M" if from_path.is_dir() else ""
    say(
        f"lorakit: wrote {path}\n  cd {out} && ollama create {cfg.ollama_name}{quantize} -f Modelfile && ollama run {cfg.ollama_name}"
    )
    return path


def _fresh_gguf(cfg: ExportConfig, merged: Path) -> Path:
    """The merged model's GGUF, written unless one newer than the merge is there already."""
    path = Path(cfg.output_dir) / f"model-{cfg.quant}.gguf"
    stale = not path.is_file() or path.stat().st_mtime < (merged / "config.json").stat().st_mtime
    return export_gguf(cfg, merged) if stale or cfg.overwrite else path


def export_ollama(cfg: ExportConfig) -> Path:
    from transformers import AutoTokenizer

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.ollama_from == "adapter":
        adapter = _adapter(cfg)
        if adapter is None:
            raise LorakitError("--ollama_from adapter needs --adapter DIR")
        base = adapter.resolve_base(cfg.base_model)
        export_lora_gguf(cfg)
        base_file = (
            Path(base.gguf)
            if base.gguf
            else gguf_file(
                Path(base.path), out / f"base-{cfg.quant}.gguf", cfg.quant, llama_cpp=llama_cpp_dir(cfg)
            )
        )
        tokenizer = AutoTokenizer.from_pretrained(cfg.adapter)
        return _write_modelfile(cfg, out, base_file, tokenizer, "./adapter.gguf")
    merged = _merged_dir(cfg, out)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    if cfg.ollama_from == "merged":
        return _write_modelfile(cfg, out, merged, tokenizer)
    try:
        source = _fresh_gguf(cfg, merged)
    except LorakitError as e:
        say(f"lorakit: no GGUF ({e}); the Modelfile imports the merged safetensors instead")
        source = merged
    return _write_modelfile(cfg, out, source, tokenizer)


def vllm_command(cfg: ExportConfig, merged: Path | None) -> str:
    if merged is not None:
        return f"vllm serve {shlex.quote(str(merged))} --port {cfg.port} --generation-config auto"
    adapter = Adapter.open(cfg.adapter, weights=False)  # a command line: the weights are vLLM's to read
    lora_cfg = adapter.lora_config
    if lora_cfg.get("modules_to_save"):
        raise LorakitError(
            "vLLM refuses LoRA adapters with modules_to_save (e.g. lm_head/embed_tokens): serve the merged model"
        )
    if lora_cfg.get("use_dora"):
        raise LorakitError("vLLM does not serve DoRA adapters: serve the merged model")
    rank = next(r for r in VLLM_LORA_RANKS if r >= lora_cfg["r"])
    base = adapter.base_model or lora_cfg.get("base_model_name_or_path", "")
    return (
        f"vllm serve {shlex.quote(base)} --port {cfg.port} --enable-lora --max-lora-rank {rank} "
        f"--lora-modules {shlex.quote(cfg.ollama_name)}={shlex.quote(str(Path(cfg.adapter).resolve()))}"
    )


def export_vllm(cfg: ExportConfig) -> Path:
    return _vllm_script(cfg, _merged_dir(cfg, Path(cfg.output_dir)))


def _vllm_script(cfg: ExportConfig, merged: Path | None) -> Path:
    """vllm.sh: base + adapter (when vLLM can serve the adapter) and the merged model (when there is one)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["#!/bin/sh", "# Serve with vLLM (pip install vllm) behind an OpenAI-compatible API."]
    if cfg.adapter:
        try:
            lines += ["# base + adapter (several adapters can share one base):", vllm_command(cfg, None)]
        except LorakitError as e:
            lines.append(f"# base + adapter is not possible: {e}")
    if merged is not None:
        lines += ["# merged model:", vllm_command(cfg, merged.resolve())]
    if not any(x.startswith("vllm") for x in lines):
        raise LorakitError("no vLLM command: " + lines[-1].removeprefix("# "))
    path = atomic_write_text(out / "vllm.sh", "\n".join(lines) + "\n")
    path.chmod(0o755)
    say(f"lorakit: wrote {path}\n  " + "\n  ".join(x for x in lines[2:] if not x.startswith("#")))
    return path


@dataclass
class Target:
    """One file or folder `export all` tries to write: where it went, or why it could not."""

    name: str
    path: Path | None = None
    reason: str = ""


def _attempt(target: Target, write: Callable[[], Path]) -> Target:
    """Run one export target; its failure is recorded, not raised, so the others still run."""
    try:
        target.path = write()
    except LorakitError as e:
        target.reason = str(e)
    except Exception as e:  # our bug or a library's: still no reason to drop the other targets
        target.reason = f"unexpected {type(e).__name__}: {e} (please report this)"
    return target


def export_all(cfg: ExportConfig) -> Path:
    """Every target that can be written: merged model, GGUF, GGUF LoRA, Modelfile, vLLM command.

    A target that fails is listed at the end with its reason and the others are still written.
    The export succeeds (exit 0) when the merged model is written: it is what vLLM, transformers
    and Ollama's safetensors import serve. Without it, the command fails after listing what it
    could write.
    """
    import dataclasses

    from transformers import AutoTokenizer

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter = _adapter(cfg)
    merged = _attempt(Target("merged model"), lambda: _merged_dir(cfg, out))
    cfg = dataclasses.replace(cfg, overwrite=False)  # reuse the merge just written
    targets = [merged]
    if merged.path is not None:
        targets.append(_attempt(Target("GGUF"), lambda: export_gguf(cfg, merged.path)))
    if adapter is not None:
        targets.append(_attempt(Target("GGUF LoRA"), lambda: export_lora_gguf(cfg)))
    if merged.path is not None:
        gguf = targets[1].path
        targets.append(
            _attempt(
                Target("Modelfile"),
                lambda: _write_modelfile(
                    cfg, out, gguf or merged.path, AutoTokenizer.from_pretrained(merged.path)
                ),
            )
        )
    targets.append(_attempt(Target("vLLM command"), lambda: _vllm_script(cfg, merged.path)))
    atomic_write_text(out / "README.md", _export_readme(cfg, targets))
    failed = [t for t in targets if t.path is None]
    listing = "\n".join(f"  {t.name}: {t.reason}" for t in failed)
    if merged.path is None:
        raise LorakitError(f"export all could not write the merged model; not written:\n{listing}")
    if failed:
        say(f"lorakit: exported to {out}, except:\n{listing}")
    return out


def _export_readme(cfg: ExportConfig, targets: list[Target]) -> str:
    lines = ["# Exported model", ""]
    use = {
        "merged model": 'transformers: `AutoModelForCausalLM.from_pretrained("merged")`; `vllm serve merged`.',
        "GGUF": "llama.cpp / Ollama / LM Studio (`llama-cli -m FILE -cnv`).",
        "GGUF LoRA": "llama.cpp `--lora adapter.gguf`, or an Ollama `ADAPTER` over the base GGUF.",
        "Modelfile": f"`ollama create {cfg.ollama_name} -f Modelfile && ollama run {cfg.ollama_name}`.",
        "vLLM command": "the `vllm serve` command(s).",
    }
    out = Path(cfg.output_dir)
    for t in targets:
        if t.path is not None:
            lines.append(f"- `{_relative(t.path, out)}`: {use[t.name]}")
    failed = [t for t in targets if t.path is None]
    if failed:
        lines += ["", "Not written:", ""] + [f"- {t.name}: {t.reason}" for t in failed]
    return "\n".join(lines) + "\n"


def export(kind: str, cfg: ExportConfig) -> Path:
    return {"gguf": export_gguf, "ollama": export_ollama, "vllm": export_vllm, "all": export_all}[kind](cfg)
