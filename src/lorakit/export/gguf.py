"""GGUF files of a merged model (f32/f16/q8_0) and of a LoRA adapter.

They are written with the `gguf` package (llama.cpp's own Python library): its tensor-name map and
quantizers are used as they are. What each architecture needs beyond that (metadata keys, q/k
layout, norm offsets, RoPE factor tensors) is one record per family in families.py; the
vocabulary (byte-level BPE or SentencePiece) is written here.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..core.errors import LorakitError
from ..models.adapter import Adapter
from ..models.pretokenizer import name_for_tokenizer
from .families import FAMILIES, Family, family_of


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
    from ..data.template import ChatFormat

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
