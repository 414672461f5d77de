"""An adapter directory written by `lorakit train`, read as one object.

Its training settings (lorakit.yaml, as a TrainConfig), its base model, the system prompt it was
trained with, its manifest (manifest.json) and the weight dtype training recorded there. merge,
export, generate, chat, serve, eval and sweep read adapters through this class only. A foreign
PEFT adapter (no lorakit.yaml) reads as the default settings with the base model PEFT recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import TrainConfig
from ..core.errors import LorakitError
from ..core.fields import read_yaml
from ..core.runfiles import ADAPTER_CONFIG, MANIFEST, SETTINGS


@dataclass
class Adapter:
    path: Path
    settings: TrainConfig
    lora_config: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path, weights: bool = True) -> Adapter:
        """Read and check an adapter directory; `weights=False` for commands that only read its
        configuration (the vLLM command line)."""
        d = Path(path).expanduser()
        config_file = d / ADAPTER_CONFIG
        if not config_file.is_file():
            raise LorakitError(
                f"--adapter {path}: no adapter_config.json there (expected a directory written by `lorakit train`)"
            )
        try:
            lora_config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LorakitError(
                f"{config_file}: not valid JSON ({e}); the adapter directory is damaged"
            ) from None
        _check_lora_config(lora_config, config_file)
        if weights:
            _check_weights(d, lora_config)
        settings_file = d / SETTINGS
        settings = TrainConfig(**read_yaml(settings_file, TrainConfig)) if settings_file.is_file() else None
        if settings is None:  # a foreign PEFT adapter: PEFT records the base it was made on
            settings = TrainConfig(base_model=lora_config.get("base_model_name_or_path") or "")
        manifest_file = d / MANIFEST
        try:
            manifest = (
                json.loads(manifest_file.read_text(encoding="utf-8")) if manifest_file.is_file() else {}
            )
        except (OSError, ValueError) as e:
            raise LorakitError(f"{manifest_file}: not valid JSON ({e})") from None
        return cls(d, settings, lora_config, manifest)

    @property
    def base_model(self) -> str:
        """The base model it was trained on, as given to `lorakit train` ('' = the embedded default)."""
        return self.settings.base_model

    @property
    def system_prompt(self) -> str:
        """The system prompt it was trained with ('' = none)."""
        return self.settings.system_prompt or ""

    @property
    def weight_dtype(self) -> str:
        """The dtype to merge it in: the one `train` recorded in manifest.json. For adapters
        without that record: their GPU run's half dtype (bf16 for a quantized base), else fp32."""
        if "merge_dtype" in self.manifest:
            return self.manifest["merge_dtype"]
        s = self.settings
        if not self.manifest.get("hardware", {}).get("cuda", not self.manifest):
            return "fp32"
        return "fp16" if s.fp16 else "bf16" if (s.bf16 or s.load_in_4bit or s.load_in_8bit) else "fp32"

    def weights_sha256(self) -> str:
        """SHA-256 of the adapter's weights file: what a merge of it is recorded against."""
        import hashlib

        files = sorted(self.path.glob("adapter_model.*"))
        h = hashlib.sha256()
        for f in files:
            h.update(f.read_bytes())
        return h.hexdigest()

    def resolve_base(self, override: str = ""):
        """The BaseModel to load it on: --base_model when given, else the one it was trained on."""
        from .loading import resolve_base_model

        return resolve_base_model(override or self.base_model)


def open_adapter(path: str) -> Adapter | None:
    """The adapter at `path`, or None when no --adapter was given."""
    return Adapter.open(path) if path else None


def inference_system_prompt(requested: str | None, adapter: Adapter | None) -> str:
    """An unset --system_prompt inherits the adapter's training prompt; a given one is used,
    whatever its value ('' = none)."""
    if requested is not None:
        return requested
    return adapter.system_prompt if adapter is not None else ""


def _check_lora_config(lora_config: Any, config_file: Path) -> None:
    if not isinstance(lora_config, dict):
        raise LorakitError(f"{config_file}: expected a JSON object; the adapter directory is damaged")
    r = lora_config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LorakitError(
            f"{config_file}: key 'r' must be a positive integer, got {r!r}; the adapter directory is damaged"
        )
    if not isinstance(lora_config.get("lora_alpha", 8), (int, float)):  # PEFT's default when absent
        raise LorakitError(
            f"{config_file}: key 'lora_alpha' must be a number; the adapter directory is damaged"
        )


def _check_weights(d: Path, lora_config: dict) -> None:
    """The weights file's header must be readable and its LoRA matrices must have the config's rank
    (header only: no tensor is loaded). PEFT would fail later, deep inside, with a library error."""
    weights = d / "adapter_model.safetensors"
    if not weights.is_file():
        if (d / "adapter_model.bin").is_file():
            return  # a pickled PEFT adapter: loaded by PEFT as it is
        raise LorakitError(
            f"{d}: no adapter_model.safetensors (the weights); copy the whole adapter directory"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="numpy") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise LorakitError(
            f"{weights}: not a readable safetensors file ({str(e).splitlines()[0][:120]}); "
            "the adapter is damaged: copy it again or train it again"
        ) from None
    r = lora_config["r"]
    patterned = bool(lora_config.get("rank_pattern"))
    for key, shape in shapes.items():
        axis = 0 if ".lora_A." in key else 1 if ".lora_B." in key else None
        if axis is None or patterned or len(shape) != 2:
            continue
        if shape[axis] != r:
            raise LorakitError(
                f"{weights}: tensor {key} has shape {list(shape)}, not rank r={r} as adapter_config.json says; "
                "the weights and the config come from different adapters"
            )
