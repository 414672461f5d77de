"""`lorakit export`: GGUF (model and LoRA adapter), Ollama Modelfile, vLLM command — all with
the chat template the model was trained with.

GGUF files are written with the `gguf` package (llama.cpp's own Python library): its tensor-name
map and quantizers are used as they are. What it does not do is decide the metadata of a
Hugging Face model; that part (the q/k permutation Llama's GGUF layout needs, the BPE
vocabulary and its pre-tokenizer name, the token types) is written here.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

from .adapter import Adapter, open_adapter
from .config import ExportConfig, MergeConfig, narrow
from .errors import LorakitError
from .io import atomic_write_text, say
from .pretokenizer import name_for_tokenizer

# transformers model_type -> (llama.cpp architecture, q/k rows need the rotary permutation)
GGUF_ARCHS = {"llama": ("llama", True), "qwen2": ("qwen2", False)}
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _check_arch(config) -> tuple[str, bool]:
    if config.model_type not in GGUF_ARCHS:
        raise LorakitError(
            f"GGUF export supports the {', '.join(GGUF_ARCHS)} families, not '{config.model_type}'; "
            "use llama.cpp's convert_hf_to_gguf.py for it"
        )
    return GGUF_ARCHS[config.model_type]


def _permute_rotary(w, n_head: int):
    """HF stores each rotary head as [first halves; second halves]; GGUF's Llama layout
    interleaves them. Same maths as llama.cpp's converter (the inverse of HF's conversion)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_metadata(writer, config, tokenizer, chat_template: str, pre: str, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(
        config, "rope_theta", 10000.0
    )
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)

    # Vocabulary: byte-level BPE only (Llama 3, Qwen2, SmolLM2 families).
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise LorakitError(
            f"GGUF export writes byte-level BPE vocabularies; this tokenizer is {spec['model']['type']}"
        )
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(config.vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            a = added.get(token)
            types.append(
                gguf.TokenType.NORMAL
                if a is None
                else gguf.TokenType.CONTROL
                if a.special
                else gguf.TokenType.USER_DEFINED
            )
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
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
    writer.add_chat_template(chat_template)


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
    """A merged (or any plain) Llama/Qwen2 model directory -> one GGUF file."""
    import gguf
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    model_dir, path = Path(model_dir), Path(path)
    config = AutoConfig.from_pretrained(model_dir)
    arch, permute = _check_arch(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pre = name_for_tokenizer(tokenizer, base_gguf)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tmp = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    _add_metadata(writer, config, tokenizer, tokenizer.chat_template or "", pre, model_dir.name)
    writer.add_file_type(_file_type(quant))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                if key == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                new = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise LorakitError(f"{shard.name}: tensor {key} has no GGUF name for {arch}")
                t = f.get_tensor(key).to(torch.float32)
                if permute and key.endswith(("q_proj.weight", "k_proj.weight")):
                    n = config.num_attention_heads if "q_proj" in key else config.num_key_value_heads
                    assert t.shape[0] == n * head_dim
                    t = _permute_rotary(t, n)
                data, raw = _tensor_data(t.numpy(), quant, t.ndim == 2)
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
    config = AutoConfig.from_pretrained(base_dir)
    arch, permute = _check_arch(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    r, alpha = lora_cfg["r"], float(lora_cfg["lora_alpha"])
    # llama.cpp scales by alpha / r; rsLoRA scales by alpha / sqrt(r): write the alpha that gives that.
    if lora_cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(r)
    tmp = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
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
            raise LorakitError(f"adapter module {module} has no GGUF name for {arch}")
        t = tensors[key].to(torch.float32)
        if which == "B" and permute and module.endswith(("q_proj", "k_proj")):
            t = _permute_rotary(
                t, config.num_attention_heads if module.endswith("q_proj") else config.num_key_value_heads
            )
        writer.add_tensor(f"{new}.lora_{which.lower()}", t.numpy())
    _write(writer, tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# Ollama


def _role_blocks(render) -> dict[str, tuple[str, str]]:
    """(prefix, suffix) the chat template writes around each role's content, found by rendering
    conversations that grow one message at a time."""
    s, u, a = "\x01SYSTEM\x01", "\x01USER\x01", "\x01ASSISTANT\x01"
    m1 = [{"role": "system", "content": s}]
    m2 = m1 + [{"role": "user", "content": u}]
    m3 = m2 + [{"role": "assistant", "content": a}]
    r1, r2, r3 = render(m1, False), render(m2, False), render(m3, False)
    gen = render(m2, True)
    if not (r2.startswith(r1) and gen.startswith(r2) and r3.startswith(gen)):
        raise LorakitError(
            "the chat template does not render messages one after another; write the Modelfile TEMPLATE by hand"
        )
    blocks = {}
    for role, text, marker in (
        ("system", r1, s),
        ("user", r2[len(r1) :], u),
        ("assistant", r3[len(r2) :], a),
    ):
        if text.count(marker) != 1:
            raise LorakitError(
                f"the chat template changes {role} content; write the Modelfile TEMPLATE by hand"
            )
        blocks[role] = tuple(text.split(marker))
    blocks["generation"] = (gen[len(r2) :], "")
    return blocks


def _go_literal(text: str) -> str:
    """Literal text inside a Go template: only '{{' needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(tokenizer) -> str:
    """The training chat template as an Ollama (Go) TEMPLATE over .Messages.

    No whitespace-trimming actions ({{- ... }}): they would eat the newlines the template writes.
    """
    from .data import ChatFormat

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    b = _role_blocks(render)
    sys_pre = b["system"][0]
    if ChatFormat(tokenizer).template_writes_bos and sys_pre.startswith(tokenizer.bos_token):
        sys_pre = sys_pre[len(tokenizer.bos_token) :]  # the GGUF says add_bos_token: the runtime adds it
    asst_pre, asst_suf = b["assistant"]  # asst_pre starts with the generation prompt
    return (
        "{{ range .Messages }}"
        '{{ if eq .Role "system" }}'
        + _go_literal(sys_pre)
        + "{{ .Content }}"
        + _go_literal(b["system"][1])
        + '{{ else if eq .Role "user" }}'
        + _go_literal(b["user"][0])
        + "{{ .Content }}"
        + _go_literal(b["user"][1])
        + '{{ else if eq .Role "assistant" }}'
        + _go_literal(asst_pre)
        + "{{ .Content }}"
        + _go_literal(asst_suf)
        + "{{ end }}{{ end }}"
        + _go_literal(b["generation"][0])
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


def export_gguf(cfg: ExportConfig, merged: Path | None = None) -> Path:
    out = Path(cfg.output_dir)
    merged = merged or _merged_dir(cfg, out)
    path = write_gguf(merged, out / f"model-{cfg.quant}.gguf", cfg.quant, _base_gguf(cfg))
    say(f"lorakit: wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return path


def export_ollama(cfg: ExportConfig) -> Path:
    from transformers import AutoTokenizer

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter = _adapter(cfg)
    system = cfg.system or (adapter.system_prompt if adapter else "")
    adapter_line = ""
    if cfg.ollama_from == "adapter":
        if adapter is None:
            raise LorakitError("--ollama_from adapter needs --adapter DIR")
        base = adapter.resolve_base(cfg.base_model)
        write_lora_gguf(cfg.adapter, out / "adapter.gguf", base.path)
        base_file = base.gguf or str(write_gguf(base.path, out / f"base-{cfg.quant}.gguf", cfg.quant))
        from_line, adapter_line = base_file, "./adapter.gguf"
        tokenizer = AutoTokenizer.from_pretrained(cfg.adapter)
    elif cfg.ollama_from == "merged":
        merged = _merged_dir(cfg, out)
        from_line = f"./{merged.relative_to(out)}" if merged.is_relative_to(out) else str(merged.resolve())
        tokenizer = AutoTokenizer.from_pretrained(merged)
    else:
        merged = _merged_dir(cfg, out)
        gguf_path = out / f"model-{cfg.quant}.gguf"
        stale = (
            not gguf_path.is_file() or gguf_path.stat().st_mtime < (merged / "config.json").stat().st_mtime
        )
        if stale or cfg.overwrite:  # a GGUF written before the merge it should come from is redone
            gguf_path = export_gguf(cfg, merged)
        from_line = f"./{gguf_path.name}"
        tokenizer = AutoTokenizer.from_pretrained(merged)
    path = atomic_write_text(out / "Modelfile", modelfile(from_line, tokenizer, system, cfg, adapter_line))
    say(
        f"lorakit: wrote {path}\n  cd {out} && ollama create {cfg.ollama_name} -f Modelfile && ollama run {cfg.ollama_name}"
    )
    return path


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
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["#!/bin/sh", "# Serve with vLLM (pip install vllm) behind an OpenAI-compatible API."]
    if cfg.adapter:
        try:
            lines += ["# base + adapter (several adapters can share one base):", vllm_command(cfg, None)]
        except LorakitError as e:
            lines.append(f"# base + adapter is not possible: {e}")
    merged = _merged_dir(cfg, out)
    lines += ["# merged model:", vllm_command(cfg, merged.resolve())]
    path = atomic_write_text(out / "vllm.sh", "\n".join(lines) + "\n")
    path.chmod(0o755)
    say(f"lorakit: wrote {path}\n  " + "\n  ".join(x for x in lines[2:] if not x.startswith("#")))
    return path


def export_all(cfg: ExportConfig) -> Path:
    import dataclasses

    out = Path(cfg.output_dir)
    merged = _merged_dir(cfg, out)
    export_gguf(cfg, merged)
    cfg = dataclasses.replace(cfg, overwrite=False)  # reuse the merge and the GGUF just written
    export_ollama(cfg)
    adapter = _adapter(cfg)
    if adapter is not None:
        try:
            write_lora_gguf(cfg.adapter, out / "adapter.gguf", adapter.resolve_base(cfg.base_model).path)
        except LorakitError as e:
            say(f"lorakit: no GGUF LoRA: {e}")
    export_vllm(cfg)
    readme = f"""# Exported model

- `merged/`: the merged model (safetensors, tokenizer, chat template, generation config).
  transformers: `AutoModelForCausalLM.from_pretrained("merged")`.
- `model-{cfg.quant}.gguf`: the merged model for llama.cpp / Ollama / LM Studio
  (`llama-cli -m model-{cfg.quant}.gguf -cnv`).
- `adapter.gguf` (when written): the LoRA adapter for llama.cpp (`--lora adapter.gguf`) or an Ollama `ADAPTER`.
- `Modelfile`: `ollama create {cfg.ollama_name} -f Modelfile && ollama run {cfg.ollama_name}`.
- `vllm.sh`: the `vllm serve` command(s).
"""
    atomic_write_text(out / "README.md", readme)
    return out


def export(kind: str, cfg: ExportConfig) -> Path:
    return {"gguf": export_gguf, "ollama": export_ollama, "vllm": export_vllm, "all": export_all}[kind](cfg)
