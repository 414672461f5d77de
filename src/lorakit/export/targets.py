"""`lorakit export`: GGUF (model and LoRA adapter), Ollama Modelfile, vLLM command — all with
the chat template the model was trained with.

The files themselves are written by gguf.py (lorakit's writer for the families in families.py)
and ollama.py (the Go TEMPLATE and the Modelfile); for other architectures, llama.cpp's own
converters run when the user has a llama.cpp tree. Each target is written to a temporary path and
renamed; `export all` writes every target it can and says which failed and why.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.config import ExportConfig, MergeConfig
from ..core.errors import LorakitError
from ..core.fields import as_config
from ..core.files import atomic_write_text, say
from ..models.adapter import Adapter, open_adapter
from .gguf import write_gguf, write_lora_gguf
from .ollama import modelfile

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


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

    return merge(as_config(cfg, MergeConfig, output_dir=str(merged), overwrite=True))


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
    base = cfg.base_model or adapter.base_model or lora_cfg.get("base_model_name_or_path", "")
    if not base or base.endswith(".gguf"):
        # The LoRA was trained on the checkpoint lorakit rebuilt from the GGUF (the embedded default
        # is one): vLLM serves it on that, not on the GGUF file (quantized, read by another loader).
        base = adapter.resolve_base(base).path
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
