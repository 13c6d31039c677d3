"""What `dejavu collect` writes: the keys, shapes and dtypes of docs/FORMATS.md, and values that match
an independent forward pass of the same model."""

from __future__ import annotations

import json

import pytest
import torch

from dejavu.artifacts import load_tensors, read_manifest
from dejavu.bits import unpack_bits
from dejavu.collect.collect import make_plan, run_collect
from dejavu.config import load_config
from dejavu.corpus import fixed_length_sequences, load_texts, tokenize_stream
from dejavu.models.loading import load_model

from helpers import CALIB_TXT, e4m3_bound

MANIFEST_KEYS = {"format", "format_version", "dejavu_version", "created", "config", "parent", "files", "model",
                 "tokens", "train_tokens", "eval_tokens", "seq_len", "world_size", "mlp_label_rule",
                 "mlp_label_tags", "input_dtype", "shards", "stats"}


def tiny_cfg(model_dir, **overrides):
    return load_config("tiny", {"model.name": str(model_dir), "model.device": "cpu",
                                "data.dataset": str(CALIB_TXT), **overrides})


@pytest.fixture(scope="module")
def llama_run(tiny_model_factory, tmp_path_factory):
    model_dir = tiny_model_factory("llama")
    out = tmp_path_factory.mktemp("collect-llama")
    cfg = tiny_cfg(model_dir, **{"collect.mlp_label_densities": [0.5, 0.25]})
    run_collect(cfg, out)
    return cfg, out / "collect"


def test_manifest_follows_formats(llama_run):
    cfg, stage = llama_run
    m = read_manifest(stage, "dejavu.collect")  # also checks sizes and sha256 of every shard
    assert MANIFEST_KEYS <= set(m)
    assert m["tokens"] == 1024 and m["train_tokens"] == 768 and m["eval_tokens"] == 256
    assert m["seq_len"] == 64 and m["world_size"] == 1
    assert m["mlp_label_rule"] == "topk" and m["mlp_label_tags"] == ["0.5", "0.25"]
    assert m["input_dtype"] == "float16"
    assert m["model"]["family"] == "llama" and m["model"]["num_layers"] == 3 and m["model"]["fingerprint"]
    assert [s["path"] for s in m["shards"]] + ["down_proj.safetensors"] == [f["path"] for f in m["files"]]
    assert m["down_inputs"] is True and m["down_weights"] == "down_proj.safetensors"
    assert [(s["split"], s["index"]) for s in m["shards"]] == [("train", 0), ("train", 1), ("train", 2), ("eval", 0)]
    assert sum(s["tokens"] for s in m["shards"]) == m["tokens"]
    assert set(m["stats"]) == {"0", "1", "2"}
    for row in m["stats"].values():
        for kind in ("mlp", "attn"):
            fr = row[kind]["frac_for_mass"]
            assert set(fr) == {"0.9", "0.95", "0.99"}
            assert 0 < fr["0.9"] <= fr["0.95"] <= fr["0.99"] <= 1
    assert m["config"] == cfg.to_dict()


def test_shard_keys_shapes_and_dtypes(llama_run):
    _, stage = llama_run
    m = read_manifest(stage, "dejavu.collect")
    d, n, h = m["model"]["hidden_size"], m["model"]["intermediate_size"], m["model"]["num_heads"]
    for shard in m["shards"]:
        t = load_tensors(stage / shard["path"])
        expected = set()
        for layer in range(3):
            expected |= {f"input.{layer}", f"mlp_labels.{layer}@0.5", f"mlp_labels.{layer}@0.25",
                         f"head_norms.{layer}"}
            if shard["split"] == "eval":
                expected.add(f"mlp_act.{layer}")
            expected |= {f"mlp_down_input.{layer}", f"mlp_down_scale.{layer}"}
        assert set(t) == expected
        T = shard["tokens"]
        assert t["input.0"].shape == (T, d) and t["input.0"].dtype == torch.float16
        assert t["mlp_labels.1@0.5"].shape == (T, (n + 7) // 8) and t["mlp_labels.1@0.5"].dtype == torch.uint8
        assert t["head_norms.2"].shape == (T, h) and t["head_norms.2"].dtype == torch.float16
        if shard["split"] == "eval":
            assert t["mlp_act.0"].shape == (T, n) and t["mlp_act.0"].dtype == torch.float16
        assert t["mlp_down_input.1"].shape == (T, n) and t["mlp_down_input.1"].dtype == torch.float8_e4m3fn
        assert t["mlp_down_scale.1"].shape == (T,) and t["mlp_down_scale.1"].dtype == torch.float32
        labels = unpack_bits(t["mlp_labels.0@0.25"], n)
        assert labels.sum(dim=1).eq(24).all()  # ceil(0.25 * 96) neurons per token


def test_labels_are_topk_of_the_stored_activation(llama_run):
    _, stage = llama_run
    m = read_manifest(stage, "dejavu.collect")
    n = m["model"]["intermediate_size"]
    shard = next(s for s in m["shards"] if s["split"] == "eval")
    t = load_tensors(stage / shard["path"])
    for layer in range(3):
        act = t[f"mlp_act.{layer}"].float()
        assert (act >= 0).all()
        for tag in ("0.5", "0.25"):
            mask = unpack_bits(t[f"mlp_labels.{layer}@{tag}"], n)
            kept_min = torch.where(mask, act, torch.inf).amin(dim=1)
            dropped_max = torch.where(mask, -torch.inf, act).amax(dim=1)
            assert (kept_min >= dropped_max).all()  # fp16 rounding may tie, never invert


def test_down_inputs_are_the_stored_activation_in_fp8_and_down_is_the_models(llama_run, tiny_model_factory):
    from dejavu.fp8 import dequantize_rows

    cfg, stage = llama_run
    m = read_manifest(stage, "dejavu.collect")
    shard = next(s for s in m["shards"] if s["split"] == "eval")
    t = load_tensors(stage / shard["path"])
    for layer in range(3):
        act = t[f"mlp_act.{layer}"].float()  # |down input| in fp16
        down = dequantize_rows(t[f"mlp_down_input.{layer}"], t[f"mlp_down_scale.{layer}"]).abs()
        bound = e4m3_bound(act) + 1e-3 * act  # (act itself rounded to fp16)
        assert ((down - act).abs() <= bound).all()
    model, _, _ = load_model(str(tiny_model_factory("llama")), "cpu", "float32")
    weights = load_tensors(stage / "down_proj.safetensors")
    assert set(weights) == {"down.0", "down.1", "down.2"}
    for layer, block in enumerate(model.model.layers):
        assert torch.equal(weights[f"down.{layer}"], block.mlp.down_proj.weight.detach().half())


def test_without_down_inputs_the_run_is_as_before(tiny_model_factory, tmp_path):
    run_collect(tiny_cfg(tiny_model_factory("llama"), **{"collect.record_down_input": False}), tmp_path)
    m = read_manifest(tmp_path / "collect", "dejavu.collect")
    assert m["down_inputs"] is False and m["down_weights"] is None
    assert not (tmp_path / "collect" / "down_proj.safetensors").exists()
    assert not any(k.startswith("mlp_down") for k in load_tensors(tmp_path / "collect" / m["shards"][0]["path"]))


def test_block_inputs_and_down_inputs_equal_the_models(llama_run, tiny_model_factory):
    from dejavu.fp8 import dequantize_rows

    cfg, stage = llama_run
    model, tok, _ = load_model(str(tiny_model_factory("llama")), "cpu", "float32")
    stream = tokenize_stream(load_texts(str(CALIB_TXT)), tok)
    seqs = fixed_length_sequences(stream, cfg.data.seq_len, cfg.collect.max_tokens, cfg.data.seed)
    plan = make_plan(seqs, cfg.collect.eval_tokens, cfg.collect.shard_tokens, 1)
    spec = plan.shards[1]
    downs = {}
    hooks = [block.mlp.down_proj.register_forward_pre_hook(
        lambda module, args, layer=layer: downs.__setitem__(layer, args[0].reshape(-1, args[0].shape[-1])))
        for layer, block in enumerate(model.model.layers)]
    with torch.no_grad():
        hidden = model(spec.sequences, output_hidden_states=True).hidden_states
    for hook in hooks:
        hook.remove()
    t = load_tensors(stage / spec.path)
    for layer in range(3):
        want = hidden[layer].reshape(-1, hidden[layer].shape[-1])
        torch.testing.assert_close(t[f"input.{layer}"].float(), want, atol=2e-3, rtol=2e-3)
        # the down input with its sign, within e4m3's precision
        down = dequantize_rows(t[f"mlp_down_input.{layer}"], t[f"mlp_down_scale.{layer}"])
        bound = e4m3_bound(downs[layer]) + 1e-4
        assert ((down - downs[layer]).abs() <= bound).all() and (down * downs[layer] >= 0).all()
        assert (down < 0).float().mean() > 0.2  # SiLU-gated: a good share of them are negative


def test_an_old_run_without_down_inputs_resumes_with_no_down_inputs(tiny_model_factory, tmp_path):
    """A run.json written before collect could keep down inputs lacks the key: it kept none."""
    import json

    from dejavu.errors import DejavuError

    model_dir = tiny_model_factory("llama")
    run_collect(tiny_cfg(model_dir, **{"collect.record_down_input": False}), tmp_path)
    state = tmp_path / "collect" / "run.json"
    old = json.loads(state.read_text())
    del old["config"]["collect"]["record_down_input"]
    state.write_text(json.dumps(old))
    assert run_collect(tiny_cfg(model_dir, **{"collect.record_down_input": False}), tmp_path)["down_inputs"] is False
    with pytest.raises(DejavuError, match=r"record_down_input: False -> True\); add --overwrite to discard it, or use "
                                          r"another --out; it kept no MLP down inputs: --no-down-inputs uses it as it is"):
        run_collect(tiny_cfg(model_dir), tmp_path)
    with pytest.raises(DejavuError) as refused:  # with another difference too, the hint would mislead
        run_collect(tiny_cfg(model_dir, **{"collect.eval_tokens": 128}), tmp_path)
    assert "eval_tokens" in str(refused.value) and "--no-down-inputs" not in str(refused.value)


def test_relu_model_gets_positive_labels(tiny_model_factory, tmp_path):
    cfg = tiny_cfg(tiny_model_factory("opt"), **{"collect.max_tokens": 512})
    m = run_collect(cfg, tmp_path)
    assert m["mlp_label_rule"] == "positive" and m["mlp_label_tags"] == ["positive"]
    n = m["model"]["intermediate_size"]
    shard = next(s for s in m["shards"] if s["split"] == "eval")
    t = load_tensors(tmp_path / "collect" / shard["path"])
    mask = unpack_bits(t["mlp_labels.0@positive"], n)
    act = t["mlp_act.0"].float()
    assert (act[~mask] == 0).all()  # ReLU: everything unlabelled is exactly zero
    assert mask.float().mean() > 0.05


def test_gpt2_conv1d_model_collects(tiny_model_factory, tmp_path):
    cfg = tiny_cfg(tiny_model_factory("gpt2"), **{"collect.max_tokens": 256, "collect.eval_tokens": 64})
    m = run_collect(cfg, tmp_path)
    assert m["mlp_label_rule"] == "topk" and m["tokens"] == 256
    head = json.loads((tmp_path / "collect" / "run.json").read_text())
    assert head["config"]["model"]["name"] == cfg.model.name


def test_resume_recollects_a_kept_shard_whose_bytes_changed(tiny_model_factory, tmp_path, capsys):
    # a shard edited after it was written keeps a readable header, so only its recorded hash gives it away
    cfg = tiny_cfg(tiny_model_factory("llama"))
    run_collect(cfg, tmp_path)
    stage = tmp_path / "collect"
    first = {f["path"]: f["sha256"] for f in read_manifest(stage, "dejavu.collect")["files"]}
    (stage / "manifest.json").unlink()  # as if killed before the manifest
    victim = stage / sorted(first)[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    run_collect(cfg, tmp_path)
    out = capsys.readouterr()
    assert f"{victim} changed on disk" in out.out + out.err
    assert {f["path"]: f["sha256"] for f in read_manifest(stage, "dejavu.collect")["files"]} == first  # redone, as collected before
