"""The bundle: round trip, per-layer densities, no pickle, and refusal of a mismatched model or file."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from dejavu.errors import DejavuError
from dejavu.export.bundle import BUNDLE_FILE, check_bundle_matches, load_bundle, run_export
from dejavu.models.adapters import adapter_for
from dejavu.models.loading import load_model
from dejavu.predictor import PREDICTOR_TENSORS

from helpers import make_predictors_dir, make_tiny_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama):
    run = tmp_path_factory.mktemp("run")
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=0.75)
    out = run / "bundle"
    manifest = run_export(run, out)
    return run, out, manifest


def test_round_trip(exported, tiny_llama):
    from dejavu.artifacts import load_tensors

    run, out, manifest = exported
    loaded_manifest, pset = load_bundle(out)
    assert loaded_manifest == manifest
    assert manifest["format"] == "dejavu.bundle" and manifest["format_version"] == 1
    for key in ("model", "mlp_density", "head_density", "mlp_density_per_layer", "head_density_per_layer",
                "mlp_pairing", "head_pairing", "rank", "hidden_activation", "metrics", "predictor_bytes"):
        assert key in manifest, key
    assert manifest["model"]["fingerprint"]
    assert manifest["mlp_density_per_layer"] == [0.5] * 3 and manifest["head_density_per_layer"] == [0.75] * 3
    assert (pset.mlp_pairing, pset.head_pairing) == ("current", "lookahead")
    assert manifest["parent"]["format"] == "dejavu.predictors"
    for layer in range(3):
        source = load_tensors(run / "predictors" / "layers" / f"layer-{layer:03d}.safetensors")
        lp = pset.layers[layer]
        assert (lp.mlp_density, lp.head_density) == (0.5, 0.75)
        for kind, pred in (("mlp", lp.mlp), ("attn", lp.attn)):
            for name in PREDICTOR_TENSORS:
                torch.testing.assert_close(getattr(pred, name), source[f"{kind}.{name}"], rtol=0, atol=0)
    expected_bytes = sum(v.numel() * 4 for layer in range(3) for v in load_tensors(
        run / "predictors" / "layers" / f"layer-{layer:03d}.safetensors").values())
    assert manifest["predictor_bytes"] == expected_bytes
    model, _, _ = load_model(str(tiny_llama), device="cpu", dtype="float32")
    check_bundle_matches(manifest, adapter_for(model))  # the right model passes


def test_bundle_is_plain_safetensors_without_pickle(exported):
    _, out, _ = exported
    raw = (out / BUNDLE_FILE).read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    metadata = header["__metadata__"]
    assert {k: metadata[k] for k in ("format", "format_version")} == {"format": "dejavu.bundle", "format_version": "1"}
    # a copy of the manifest's fields, against which an edited manifest is refused
    manifest = json.loads((out / "manifest.json").read_text())
    recorded = json.loads(metadata["manifest_fields"])
    assert recorded == {k: v for k, v in manifest.items()
                        if k not in ("format", "format_version", "dejavu_version", "created", "files")}
    assert all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__")
    assert "layers.0.mlp.w1" in header and "layers.2.attn.b2" in header
    assert not list(out.glob("*.pt")) and not list(out.glob("*.bin")) and not list(out.glob("*.pkl"))


def test_density_overrides_and_untrained_layers(tmp_path, tiny_llama):
    make_predictors_dir(tmp_path, tiny_llama, layers=[0, 2])
    manifest = run_export(tmp_path, tmp_path / "b", overrides={"export.mlp_density": 0.3,
                                                               "export.head_density": 1.0})
    assert manifest["mlp_density"] == 0.3
    assert manifest["mlp_density_per_layer"] == [0.3, 1.0, 0.3]  # layer 1 has no predictor: dense
    _, pset = load_bundle(tmp_path / "b")
    assert pset.layers[1].mlp is None and pset.layers[1].mlp_density == 1.0
    assert pset.layers[2].mlp is not None  # the run's manifest counts 2 trained layers of the model's 3


def test_a_run_of_one_middle_layer_exports(tmp_path, tiny_llama):
    make_predictors_dir(tmp_path, tiny_llama, layers=[1])
    manifest = run_export(tmp_path, tmp_path / "b")
    assert manifest["mlp_density_per_layer"] == [1.0, 0.5, 1.0]
    _, pset = load_bundle(tmp_path / "b")
    assert [layer.mlp is not None for layer in pset.layers] == [False, True, False]


def test_refuses_other_model_and_other_dims(exported, tmp_path, tiny_tokenizer, tiny_model_factory):
    _, out, manifest = exported
    other = make_tiny_model(tmp_path / "other", "llama", tiny_tokenizer, seed=1)
    model, _, _ = load_model(str(other), device="cpu", dtype="float32")
    with pytest.raises(DejavuError, match="other weights"):
        check_bundle_matches(manifest, adapter_for(model))
    wider = tiny_model_factory("llama", intermediate_size=128)
    model, _, _ = load_model(str(wider), device="cpu", dtype="float32")
    with pytest.raises(DejavuError, match="intermediate_size=96"):
        check_bundle_matches(manifest, adapter_for(model))
    qwen, _, _ = load_model(str(tiny_model_factory("qwen2")), device="cpu", dtype="float32")
    with pytest.raises(DejavuError, match="num_layers=3"):
        check_bundle_matches(manifest, adapter_for(qwen))


def test_refuses_edited_or_truncated_file(exported, tmp_path):
    import shutil

    _, out, _ = exported
    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    data = bytearray((edited / BUNDLE_FILE).read_bytes())
    data[-5] ^= 0xFF
    (edited / BUNDLE_FILE).write_bytes(bytes(data))
    with pytest.raises(DejavuError, match="sha256"):
        load_bundle(edited)
    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated)
    data = (truncated / BUNDLE_FILE).read_bytes()
    (truncated / BUNDLE_FILE).write_bytes(data[:-100])
    with pytest.raises(DejavuError, match="truncated"):
        load_bundle(truncated)
    (truncated / "manifest.json").unlink()
    with pytest.raises(DejavuError, match="no manifest.json"):
        load_bundle(truncated)


def test_export_refuses_unfinished_predictors(tmp_path):
    (tmp_path / "predictors" / "layers").mkdir(parents=True)
    with pytest.raises(DejavuError, match="did not finish"):
        run_export(tmp_path, tmp_path / "bundle")


def test_export_cli(tmp_path, tiny_llama):
    from typer.testing import CliRunner

    from dejavu.cli.main import app

    make_predictors_dir(tmp_path, tiny_llama)
    result = CliRunner().invoke(app, ["export", "--run", str(tmp_path), "--out", str(tmp_path / "b"),
                                      "--mlp-density", "0.25"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["mlp_density"] == 0.25
    result = CliRunner().invoke(app, ["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "error:" in result.output


def _threshold_overrides(**extra):
    from helpers import CALIB_TXT

    return {"export.mlp_keep_input": 0.7, "data.dataset": str(CALIB_TXT), "export.calibration_tokens": 512, **extra}


def test_bundle_carries_thresholds_and_bench_applies_them(tmp_path, tiny_llama):
    from dejavu.runtime.bench import run_bench

    from helpers import EVAL_RAW

    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=0.75)
    manifest = run_export(run, tmp_path / "bundle", config_file="tiny", overrides=_threshold_overrides())
    described = manifest["thresholds"]
    assert (described["keep_input"], described["keep_down_input"], described["keep_attn_input"]) == (0.7, 0.5, None)
    _, pset = load_bundle(tmp_path / "bundle")
    t = pset.thresholds
    assert len(t.x) == len(t.h) == pset.layers.__len__() and not t.attention and pset.has_predictors
    # the bundle's thresholds give what calibrating at bench time on the same tokens gives
    common = dict(model=str(tiny_llama), dataset=str(EVAL_RAW), config_file="tiny", speed=False)
    settings = {"runtime.max_eval_tokens": 300, "runtime.device": "cpu"}
    from_bundle = run_bench(bundle=tmp_path / "bundle", json_out=tmp_path / "a.json", overrides=settings, **common)
    flagged = run_bench(bundle=tmp_path / "bundle", json_out=tmp_path / "b.json", **common, overrides={
        **settings, "runtime.mlp_keep_input": 0.7, "runtime.mlp_density": 0.5, "runtime.calibration_tokens": 512,
        "data.dataset": described["calibration"]})
    assert from_bundle["thresholds"]["from_bundle"] and from_bundle["head_density"] == 0.75
    assert from_bundle["sparse"]["ppl"] == pytest.approx(flagged["sparse"]["ppl"], rel=1e-6)
    # another selection asked for explicitly: the thresholds step aside
    oracle = run_bench(bundle=tmp_path / "bundle", json_out=tmp_path / "c.json", **common,
                       overrides={**settings, "runtime.selection": "oracle"})
    assert oracle["thresholds"] is None


def test_thresholds_only_bundle(tmp_path, tiny_llama):
    from dejavu.runtime.bench import run_bench

    from helpers import EVAL_RAW

    with pytest.raises(DejavuError, match="needs --run"):
        run_export(None, tmp_path / "none", config_file="tiny", model_name=str(tiny_llama))
    manifest = run_export(None, tmp_path / "bundle", config_file="tiny", model_name=str(tiny_llama),
                          overrides=_threshold_overrides(**{"export.attn_keep_input": 0.6}))
    assert manifest["predictor_bytes"] == 0 and manifest["thresholds"]["keep_attn_input"] == 0.6
    _, pset = load_bundle(tmp_path / "bundle")
    assert not pset.has_predictors and pset.thresholds.attention
    report = run_bench(model=str(tiny_llama), bundle=tmp_path / "bundle", dataset=str(EVAL_RAW), config_file="tiny",
                       json_out=tmp_path / "r.json", speed=False,
                       overrides={"runtime.max_eval_tokens": 300, "runtime.device": "cpu"})
    computed = report["quality"]["computed"]
    assert computed["attn_input_kept"] == pytest.approx(0.6, abs=0.1) and report["head_density"] == 1.0
    assert report["sparse"]["ppl"] != report["dense"]["ppl"]


def test_thresholds_refuse_another_model_or_a_bad_file(tmp_path, tiny_llama, tiny_model_factory):
    from dejavu.runtime.thresholds import thresholds_from_tensors

    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama)
    with pytest.raises(DejavuError, match="made for a model with"):
        run_export(run, tmp_path / "bundle", config_file="tiny", model_name=str(tiny_model_factory("mistral")),
                   overrides=_threshold_overrides())
    assert not (tmp_path / "bundle" / "manifest.json").exists()  # refused before anything was written
    with pytest.raises(DejavuError, match="comes with --mlp-keep-input"):
        run_export(run, tmp_path / "bundle", config_file="tiny", overrides={"export.attn_keep_input": 0.5})
    described = {"keep_input": 0.7, "keep_down_input": 0.5, "keep_attn_input": None}
    good = {"thresholds.mlp_input": torch.ones(2), "thresholds.down_input": torch.ones(2)}
    assert thresholds_from_tensors(good, described, 2, "b").x == [1.0, 1.0]
    with pytest.raises(DejavuError, match="lacks thresholds.down_input"):
        thresholds_from_tensors({"thresholds.mlp_input": torch.ones(2)}, described, 2, "b")
    with pytest.raises(DejavuError, match="one finite value per layer"):
        thresholds_from_tensors({**good, "thresholds.mlp_input": torch.tensor([1.0, float("nan")])}, described, 2, "b")
    with pytest.raises(DejavuError, match="one finite value per layer"):
        thresholds_from_tensors(good, described, 3, "b")


def test_greedy_thresholds_bundle_round_trips_and_bench_applies_it(tmp_path, tiny_llama):
    """--keep-layer-bytes: thresholds on every input, split per layer by the greedy search, stored with their
    per-layer shares; bench from the bundle equals bench calibrating the same way."""
    from dejavu.runtime.bench import run_bench

    from helpers import CALIB_TXT, EVAL_RAW

    calib = {"data.dataset": str(CALIB_TXT), "export.calibration_tokens": 512}
    with pytest.raises(DejavuError, match="sets every threshold itself"):
        run_export(None, tmp_path / "x", config_file="tiny", model_name=str(tiny_llama),
                   overrides={**calib, "export.keep_layer_bytes": 0.6, "export.mlp_keep_input": 0.7})
    manifest = run_export(None, tmp_path / "bundle", config_file="tiny", model_name=str(tiny_llama),
                          overrides={**calib, "export.keep_layer_bytes": 0.6})
    allocation = manifest["thresholds"]["allocation"]
    assert allocation["rule"] == "greedy" and allocation["layer_bytes"] == 0.6
    _, pset = load_bundle(tmp_path / "bundle")
    t = pset.thresholds
    assert t.attention and t.layer_shares == allocation["layer_shares"] and not pset.has_predictors
    assert manifest["mlp_density"] == pytest.approx(t.keep_h)  # down's share kept, a mean over the layers
    common = dict(model=str(tiny_llama), dataset=str(EVAL_RAW), config_file="tiny", speed=False)
    settings = {"runtime.max_eval_tokens": 300, "runtime.device": "cpu"}
    from_bundle = run_bench(bundle=tmp_path / "bundle", json_out=tmp_path / "a.json", overrides=settings, **common)
    flagged = run_bench(json_out=tmp_path / "b.json", **common, overrides={
        **settings, "runtime.keep_layer_bytes": 0.6, "runtime.calibration_tokens": 512,
        "data.dataset": str(CALIB_TXT)})
    assert from_bundle["sparse"]["ppl"] == pytest.approx(flagged["sparse"]["ppl"], rel=1e-6)
    assert flagged["thresholds"]["allocation"]["layer_shares"] == allocation["layer_shares"]
    assert from_bundle["head_density"] == 1.0 and from_bundle["sparse"]["ppl"] != from_bundle["dense"]["ppl"]
    with pytest.raises(DejavuError, match="replace head selection"):
        run_bench(json_out=tmp_path / "c.json", **common, overrides={
            **settings, "runtime.keep_layer_bytes": 0.6, "runtime.head_density": 0.5})
