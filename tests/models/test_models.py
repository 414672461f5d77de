import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.core.errors import LorakitError
from lorakit.models import loading as models


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_resolve_kinds(tmp_path, tiny_llama):
    assert models.resolve_base_model(str(tiny_llama)).source == "local"
    assert models.resolve_base_model("Qwen/Qwen2.5-0.5B-Instruct").source == "hub"
    with pytest.raises(LorakitError, match="no such .gguf file"):
        models.resolve_base_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorakitError, match="no config.json"):
        models.resolve_base_model(str(tmp_path / "empty"))


@pytest.mark.slow
def test_gguf_converts_once_and_matches_gguf_logits(fresh_home):
    from transformers import AutoModelForCausalLM

    gguf = models.embedded_gguf()
    base = models.resolve_base_model(str(gguf))
    cache = Path(base.path)
    assert base.source == "gguf" and cache.parent == fresh_home / "models"
    assert json.loads((cache / "lorakit-source.json").read_text())["sha256"] == models.file_sha256(gguf)
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")], "no partial directory left"
    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    assert models.resolve_base_model("").path == str(cache)  # the embedded default is the same file
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again

    converted = AutoModelForCausalLM.from_pretrained(cache).eval()
    original = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    ids = torch.tensor([[1, 9690, 198, 504, 3459, 2, 198]])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, original(ids).logits)
    # The plain checkpoint can be trained and saved (the GGUF-loaded model refuses both).
    assert getattr(converted.config, "quantization_config", None) is None


@pytest.mark.slow
def test_failed_conversion_leaves_no_cache(fresh_home, monkeypatch):
    from transformers import PreTrainedModel

    def boom(self, *a, **kw):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        models.convert_gguf(models.embedded_gguf())
    assert not [p for p in (fresh_home / "models").iterdir()], "neither a final nor a partial directory"


def test_models_command_lists_embedded(tmp_path):
    env = {
        **os.environ,
        "LORAKIT_HOME": str(tmp_path),
        "COLUMNS": "200",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
    }
    r = subprocess.run([sys.executable, "-m", "lorakit", "models"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "SmolLM2-135M-Instruct" in r.stdout and "embedded" in r.stdout
