"""A bundle's manifest edited by hand, stale predictors and an --out inside a run's stages: each refused
with one line naming the file, never a KeyError and never a check silently turned off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dejavu.artifacts import parent_ref, read_manifest, write_manifest
from dejavu.errors import DejavuError
from dejavu.export.bundle import BUNDLE_FILE, check_bundle_out, load_bundle, run_export

from helpers import make_predictors_dir


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_llama):
    run = tmp_path_factory.mktemp("run")
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=0.75)
    run_export(run, run / "bundle")
    return run / "bundle"


@pytest.fixture(scope="module")
def thresholds_bundle(tmp_path_factory, tiny_llama):
    from helpers import CALIB_TXT

    out = tmp_path_factory.mktemp("thresholds") / "bundle"
    run_export(None, out, config_file="tiny", model_name=str(tiny_llama),
               overrides={"export.mlp_keep_input": 0.7, "data.dataset": str(CALIB_TXT),
                          "export.calibration_tokens": 256})
    return out


def _edited(source, tmp_path, edit):
    copy = tmp_path / "edited"
    shutil.copytree(source, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _dropping(*path):
    def edit(manifest):
        for key in path[:-1]:
            manifest = manifest[key]
        del manifest[path[-1]]
    return edit


# 1. required fields


@pytest.mark.parametrize("path", [("model",), ("mlp_density",), ("head_density_per_layer",), ("mlp_pairing",),
                                  ("hidden_activation",), ("model", "num_layers"), ("model", "fingerprint")])
def test_a_missing_field_is_refused_by_name(bundle, tmp_path, path):
    edited = _edited(bundle, tmp_path, _dropping(*path))
    with pytest.raises(DejavuError, match=rf"manifest.json lacks the field '{'.'.join(path)}' \(written by another"):
        load_bundle(edited)


def test_bench_without_the_model_field_is_a_one_line_error(bundle, tmp_path, tiny_llama, capsys):
    from dejavu.cli.main import main

    edited = _edited(bundle, tmp_path, _dropping("model"))
    assert main(["bench", "--bundle", str(edited), "--config", "tiny", "--json", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "lacks the field 'model'" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["x", [1], {"keep_input": 0.7}, {"keep_input": 0.7, "keep_down_input": 2.0}])
def test_a_thresholds_field_of_the_wrong_shape_is_refused(thresholds_bundle, tmp_path, value):
    # a string here once raised an AttributeError past the one-line error handling
    edited = _edited(thresholds_bundle, tmp_path, lambda m: m.update(thresholds=value))
    with pytest.raises(DejavuError, match=r"the manifest's thresholds must give keep_input and keep_down_input .*"
                                          r"\(edited manifest\?\)"):
        load_bundle(edited)


def test_thresholds_alone_need_no_pairing(thresholds_bundle):
    manifest, pset = load_bundle(thresholds_bundle)
    assert "mlp_pairing" not in manifest and not pset.has_predictors and pset.thresholds is not None


# 2. the file list


@pytest.mark.parametrize("edit, says", [
    (_dropping("files"), "lacks the field 'files'"),
    (lambda m: m.update(files={}), "files must be a list"),
    (lambda m: m.update(files=[]), f"does not list {BUNDLE_FILE}"),
    (lambda m: m.update(files=[{**m["files"][0], "path": "other.safetensors"}]), f"does not list {BUNDLE_FILE}"),
    (lambda m: m["files"][0].pop("sha256"), r"files\[0\] lacks its path, bytes or sha256"),
])
@pytest.mark.parametrize("which", ["predictors", "thresholds"])
def test_the_tensor_file_must_stay_listed_with_its_sha256(bundle, thresholds_bundle, tmp_path, edit, says, which):
    edited = _edited(bundle if which == "predictors" else thresholds_bundle, tmp_path, edit)
    data = bytearray((edited / BUNDLE_FILE).read_bytes())
    data[-5] ^= 0xFF  # what the unlisted file would have hidden
    (edited / BUNDLE_FILE).write_bytes(bytes(data))
    with pytest.raises(DejavuError, match=says):
        load_bundle(edited)


# 3. top-level densities against the per-layer lists


@pytest.mark.parametrize("key, value", [("mlp_pairing", "foo"), ("head_pairing", ["x"]), ("hidden_activation", "foo")])
def test_an_edited_pairing_or_activation_is_refused_by_name(bundle, tmp_path, key, value):
    # before, anything but "lookahead" ran as "current" without a word
    edited = _edited(bundle, tmp_path, lambda m: m.update({key: value}))
    with pytest.raises(DejavuError, match=rf"manifest.json: {key} must be .* \(an edited manifest\?\)"):
        load_bundle(edited)


@pytest.mark.parametrize("key, value", [("mlp_density", 0.6), ("head_density", 0.5)])
def test_a_top_level_density_that_disagrees_with_the_layers_is_refused(bundle, tmp_path, key, value):
    edited = _edited(bundle, tmp_path, lambda m: m.update({key: value}))
    with pytest.raises(DejavuError, match=rf"{key} is {value:g}, but the mean of {key}_per_layer .*edited manifest"):
        load_bundle(edited)


def test_per_layer_overrides_make_the_top_level_their_mean(tmp_path, tiny_llama):
    make_predictors_dir(tmp_path, tiny_llama, layers=[0, 2])
    manifest = run_export(tmp_path, tmp_path / "b", overrides={"export.mlp_density": 0.5,
                                                               "export.mlp_density_per_layer": {0: 0.2}})
    assert manifest["mlp_density_per_layer"] == [0.2, 1.0, 0.5]  # layer 1 has no predictor: dense, not averaged
    assert manifest["mlp_density"] == pytest.approx(0.35)
    _, pset = load_bundle(tmp_path / "b")
    assert [layer.mlp_density for layer in pset.layers] == [0.2, 1.0, 0.5]
    edited = _edited(tmp_path / "b", tmp_path, lambda m: m.update(mlp_density=0.5))  # the default, not the mean
    with pytest.raises(DejavuError, match="mlp_density is 0.5, but the mean"):
        load_bundle(edited)


def test_thresholds_alone_state_the_share_their_thresholds_keep(thresholds_bundle, tmp_path):
    manifest, _ = load_bundle(thresholds_bundle)
    assert manifest["mlp_density"] == manifest["thresholds"]["keep_down_input"]
    edited = _edited(thresholds_bundle, tmp_path, lambda m: m.update(mlp_density=0.9))
    with pytest.raises(DejavuError, match="mlp_density is 0.9, but the share of down's input its thresholds keep"):
        load_bundle(edited)
    (tmp_path / "edited").rename(tmp_path / "first")
    edited = _edited(thresholds_bundle, tmp_path, lambda m: m.update(head_density=0.5))
    with pytest.raises(DejavuError, match="head_density is 0.5, but 1"):
        load_bundle(edited)


# 4. predictors trained on collect data the run no longer holds


def _trained_on_collect(run, tiny_llama):
    make_predictors_dir(run, tiny_llama)
    collect = write_manifest(run / "collect", "dejavu.collect", {}, [], model={}, tokens=100)
    predictors = read_manifest(run / "predictors", "dejavu.predictors")
    predictors["parent"] = parent_ref(run / "collect", collect)
    (run / "predictors" / "manifest.json").write_text(json.dumps(predictors))


def test_export_refuses_predictors_of_earlier_collect_data(tmp_path, tiny_llama):
    _trained_on_collect(tmp_path, tiny_llama)
    run_export(tmp_path, tmp_path / "bundle")  # the collect data they were trained on: fine
    write_manifest(tmp_path / "collect", "dejavu.collect", {}, [], model={}, tokens=200)  # collect --overwrite
    with pytest.raises(DejavuError, match=r"trained with other collect data .* re-run `dejavu train-predictors"):
        run_export(tmp_path, tmp_path / "stale")
    (tmp_path / "collect" / "manifest.json").unlink()  # collecting again, unfinished
    with pytest.raises(DejavuError, match="trained with other collect data"):
        run_export(tmp_path, tmp_path / "stale")
    assert not (tmp_path / "stale").exists()
    shutil.rmtree(tmp_path / "collect")  # deleted to free disk: nothing to compare with
    run_export(tmp_path, tmp_path / "bundle")


# 5. --out inside a run's stages


def test_export_never_writes_inside_a_run_stage(tmp_path, tiny_llama):
    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama)
    write_manifest(run / "collect", "dejavu.collect", {}, [], model={})
    for out in (run / "collect" / "shards" / "b", run / "predictors" / "newb", run / "predictors" / "layers"):
        with pytest.raises(DejavuError, match="is inside the run's stage"):
            run_export(run, out)
        assert not (out / BUNDLE_FILE).exists()
    shutil.rmtree(run / "collect")
    (run / "collect").mkdir()  # collect started, no manifest yet
    with pytest.raises(DejavuError, match="is inside the run's stage"):
        run_export(run, run / "collect")
    run_export(run, run / "bundle")  # beside the stages: the usual place
    other = tmp_path / "other-run"
    write_manifest(other / "collect", "dejavu.collect", {}, [], model={})
    with pytest.raises(DejavuError, match=r"is inside .*other-run/collect \(a dejavu.collect directory\)"):
        check_bundle_out(other / "collect" / "deep" / "b")  # any run's stage, --run or not (thresholds alone)
    with pytest.raises(DejavuError, match=r"\(a dejavu.bundle directory\)"):
        run_export(run, run / "bundle" / "nested")


def test_settings_that_a_thresholds_rule_would_ignore_are_refused(tmp_path, tiny_llama):
    # per-layer top-k densities with thresholds, and --head-density on a bundle without head predictors
    from dejavu.config import load_config
    from dejavu.runtime.plan import check_flags

    with pytest.raises(DejavuError, match="mlp_density_per_layer sets the predictors' top-k"):
        run_export(None, tmp_path / "b", config_file="tiny", model_name=str(tiny_llama),
                   overrides={"export.mlp_keep_input": 0.8, "export.mlp_density_per_layer": {0: 0.3}})
    assert not (tmp_path / "b").exists()
    run_export(None, tmp_path / "b", config_file="tiny", model_name=str(tiny_llama),
               overrides={"export.mlp_keep_input": 0.8})
    _, thresholds_only = load_bundle(tmp_path / "b")
    check_flags(load_config("tiny", {}), thresholds_only, "bench")
    with pytest.raises(DejavuError, match="no head predictors"):
        check_flags(load_config("tiny", {"runtime.head_density": 0.5}), thresholds_only, "bench")
    # refused before the model loads or anything is calibrated
    for overrides, says in (({"export.mlp_keep_input": 0.8, "export.attn_keep_input": 0.7, "export.head_density": 0.5},
                             "attention thresholds .* replace head selection: drop --head-density"),
                            ({"export.keep_layer_bytes": 0.7, "export.head_density": 0.5}, "drop --head-density"),
                            ({"export.mlp_keep_input": 0.8, "export.mlp_compensation_rank": 4},
                             "--mlp-compensation-rank corrects the predictors' MLP selection: not with magnitude")):
        with pytest.raises(DejavuError, match=says):
            run_export(None, tmp_path / "c", config_file="tiny", model_name="/nonexistent/model", overrides=overrides)
        make_predictors_dir(tmp_path / "run", tiny_llama, mlp_density=0.5, head_density=0.5)
        with pytest.raises(DejavuError, match=says):
            run_export(tmp_path / "run", tmp_path / "c", model_name="/nonexistent/model", overrides=overrides)
    assert not (tmp_path / "c").exists()


def test_attention_thresholds_leave_the_runs_head_predictors_out(tmp_path, tiny_llama, capsys):
    """They replace head selection: a bundle keeping the head predictors said head density 0.5 and ran every head."""
    from helpers import CALIB_TXT

    make_predictors_dir(tmp_path / "run", tiny_llama, mlp_density=0.5, head_density=0.5)
    # a tuned run's stored config carries its head density as export's default: not a --head-density asked for
    path = tmp_path / "run" / "predictors" / "manifest.json"
    stored = json.loads(path.read_text())
    stored["config"]["export"]["head_density"] = 0.5
    path.write_text(json.dumps(stored))
    manifest = run_export(tmp_path / "run", tmp_path / "b", overrides={
        "export.mlp_keep_input": 0.8, "export.attn_keep_input": 0.7, "data.dataset": str(CALIB_TXT),
        "export.calibration_tokens": 256})
    assert "the run's head predictors are left out" in capsys.readouterr().out
    assert manifest["head_density"] == 1.0 and set(manifest["head_density_per_layer"]) == {1.0}
    assert "attn" not in manifest["metrics"]
    _, pset = load_bundle(tmp_path / "b")
    assert all(lp.attn is None and lp.mlp is not None for lp in pset.layers) and pset.thresholds.attention


def test_a_nan_in_a_predictor_is_refused_even_with_matching_hashes(bundle, tmp_path):
    """A bundle whose predictor holds a NaN (hand-edited, its hashes updated to match) would score at random."""
    from dejavu.artifacts import file_entry, load_tensors, save_tensors

    copy = tmp_path / "nan"
    shutil.copytree(bundle, copy)
    tensors = load_tensors(copy / BUNDLE_FILE)
    key = next(k for k in tensors if k.endswith(".mlp.w1"))
    tensors[key][0, 0] = float("nan")
    save_tensors(copy / BUNDLE_FILE, tensors, {"format": "dejavu.bundle", "format_version": "1"})
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"] = [file_entry(copy / BUNDLE_FILE, copy) if entry["path"] == BUNDLE_FILE else entry
                         for entry in manifest["files"]]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DejavuError, match=rf"{key} contains NaN or infinite values"):
        load_bundle(copy)


def _resigned(source, tmp_path, edit_tensors):
    """A copy of the bundle with its tensors edited and its sha256 updated to match, the header's copy of the
    manifest kept (as a hand edit through safetensors' own API would keep it)."""
    from safetensors import safe_open

    from dejavu.artifacts import file_entry, load_tensors, save_tensors

    copy = tmp_path / "resigned"
    shutil.copytree(source, copy)
    with safe_open(str(copy / BUNDLE_FILE), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_tensors(copy / BUNDLE_FILE)
    edit_tensors(tensors)
    save_tensors(copy / BUNDLE_FILE, tensors, metadata)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"] = [file_entry(copy / BUNDLE_FILE, copy) if entry["path"] == BUNDLE_FILE else entry
                         for entry in manifest["files"]]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("edit, says", [
    (lambda t: t.update({"layers.0.mlp.w1": t["layers.0.mlp.w1"].int()}), r"layer 0's mlp predictor: w1 \(torch.int32\) "
                                                                         "must hold floating-point values"),
    (lambda t: t.update({"layers.1.mlp.b1": t["layers.1.mlp.b1"][:1]}), r"layer 1's mlp predictor: shapes do not fit .*"
                                                                       r"b1 \[1\] \(expected \[\d+\]\)"),
    (lambda t: t.update({"layers.0.attn.input_mean": t["layers.0.attn.input_mean"][:1]}), "input_mean"),
    (lambda t: t.update({"layers.2.mlp.w2": t["layers.2.mlp.w2"][:, :1]}), r"w2 \[\d+, 1\] \(expected"),
])
def test_predictor_tensors_of_the_wrong_dtype_or_shape_are_refused_by_name(bundle, tmp_path, edit, says):
    # before, a [1]-shaped bias was broadcast into place and ran; an integer tensor raised a TypeError
    with pytest.raises(DejavuError, match=says):
        load_bundle(_resigned(bundle, tmp_path, edit))


def test_a_layer_without_predictors_cannot_list_a_sparse_density(bundle, tmp_path):
    def drop_layer_1_mlp(tensors):
        for key in [k for k in tensors if k.startswith("layers.1.mlp.")]:
            del tensors[key]

    with pytest.raises(DejavuError, match=r"mlp_density_per_layer lists densities below 1 for layers \[1\], which "
                                          "have no mlp predictor"):
        load_bundle(_resigned(bundle, tmp_path, drop_layer_1_mlp))


@pytest.mark.parametrize("key, value", [("mlp_pairing", "lookahead"), ("head_pairing", "current"),
                                        ("hidden_activation", "relu"), ("rank", 3)])
def test_a_field_edited_to_another_valid_value_is_refused(bundle, tmp_path, key, value):
    # each value passes the checks of its own; the tensors file's header keeps what export wrote
    assert load_bundle(bundle)[0][key] != value
    edited = _edited(bundle, tmp_path, lambda m: m.update({key: value}))
    with pytest.raises(DejavuError, match=rf"manifest.json: {key} differs from what export wrote .*the manifest was "
                                          "edited"):
        load_bundle(edited)


def test_bundles_written_before_the_header_copy_still_load(bundle, tmp_path):
    copy = _resigned(bundle, tmp_path, lambda tensors: None)
    from dejavu.artifacts import file_entry, load_tensors, save_tensors

    save_tensors(copy / BUNDLE_FILE, load_tensors(copy / BUNDLE_FILE), {"format": "dejavu.bundle",
                                                                        "format_version": "1"})
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"] = [file_entry(copy / BUNDLE_FILE, copy)]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert load_bundle(copy)[0]["mlp_pairing"] == load_bundle(bundle)[0]["mlp_pairing"]


def test_a_model_changed_only_in_a_middle_layer_or_its_embeddings_is_told_apart(bundle, tiny_llama):
    """The fingerprint once sampled only the first and last layers' up, down, q and o; a model differing
    elsewhere passed a bundle's check. Identities recorded then (their first 32 values) must still match."""
    import torch
    from transformers import AutoModelForCausalLM

    from dejavu.models.adapters import adapter_for
    from dejavu.models.identity import check_identity, fingerprint, identity_difference

    expected = read_manifest(bundle, "dejavu.bundle")["model"]
    for change in ("gate", "k", "v", "embed"):
        adapter = adapter_for(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
        check_identity(expected, adapter)  # unchanged: accepted
        middle = adapter.decoder_layers()[1]
        with torch.no_grad():
            if change == "gate":
                adapter.mlp_weights(middle).gate.mul_(1.5)
            elif change == "embed":
                adapter.model.get_input_embeddings().weight.mul_(1.5)
            else:
                getattr(adapter.attention_weights(middle), change).mul_(1.5)
        with pytest.raises(DejavuError, match="other weights than the loaded model's"):
            check_identity(expected, adapter)
        # an identity written before: first rows of the first and last layers' up, down, q and o, nothing else
        layers = adapter.decoder_layers()
        old_scheme = [round(float(v), 6) for layer in (layers[0], layers[-1])
                      for w in (adapter.mlp_weights(layer).up, adapter.mlp_weights(layer).down,
                                adapter.attention_weights(layer).q, adapter.attention_weights(layer).o)
                      for v in w[:4].detach().float().norm(dim=1)]
        assert identity_difference({**expected, "fingerprint": old_scheme}, {"fingerprint": fingerprint(adapter)}) is None
    assert "recorded fingerprint is unreadable" in identity_difference({"fingerprint": "abc"}, {"fingerprint": [1.0]})


def test_the_oracle_runs_at_the_bundles_densities_layer_by_layer(tmp_path, tiny_llama):
    """--selection oracle with a bundle is its ceiling: once it ran the bundle's mean density in every layer, so a
    bundle with untrained (dense) layers or per-layer densities had a 'ceiling' below its own predictors."""
    from dejavu.runtime.generate import load_sparse

    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=0.5, layers=[1, 2])
    run_export(run, tmp_path / "b", overrides={"export.mlp_density_per_layer": {2: 0.75}})
    with load_sparse(str(tiny_llama), bundle=tmp_path / "b", config="tiny", device="cpu", selection="oracle") as sm:
        hooks = sm.plan.hooks(sm.model, sm.adapter)
        assert hooks.mlp_density == [1.0, 0.5, 0.75] and hooks.head_density == [1.0, 0.5, 0.5]
        hooks.remove()
    with load_sparse(str(tiny_llama), bundle=tmp_path / "b", config="tiny", device="cpu", selection="oracle",
                     mlp_density=0.25) as sm:  # a flag sets every layer, as for the predictors
        hooks = sm.plan.hooks(sm.model, sm.adapter)
        assert hooks.mlp_density == [0.25, 0.25, 0.25] and hooks.head_density == [1.0, 0.5, 0.5]
        hooks.remove()


def test_per_layer_densities_export_refuses_what_it_would_not_apply(tmp_path, tiny_llama):
    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=0.5, layers=[1, 2])
    with pytest.raises(DejavuError, match=r"layers \[0\] have no trained predictors \(they run dense\)"):
        run_export(run, tmp_path / "a", overrides={"export.mlp_density_per_layer": {0: 0.3}})
    with pytest.raises(DejavuError, match=r"--mlp-candidate-density 0.6 is below the MLP density 0.75 "
                                          r"\(layers \[2\]\)"):
        run_export(run, tmp_path / "c", overrides={"export.mlp_density_per_layer": {2: 0.75},
                                                   "export.mlp_candidate_density": 0.6})
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_a_run_bundle_with_mlp_thresholds_reports_no_mlp_top_k(tmp_path, tiny_llama):
    """Magnitude thresholds run the MLP while the run's head predictors select heads: the report once said
    mlp_selection 'topk' with the predictors' pairing."""
    from dejavu.runtime.generate import load_sparse

    from helpers import CALIB_TXT

    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=0.5)
    run_export(run, tmp_path / "b", overrides={"export.mlp_keep_input": 0.8, "data.dataset": str(CALIB_TXT),
                                               "export.calibration_tokens": 256})
    with load_sparse(str(tiny_llama), bundle=tmp_path / "b", config="tiny", device="cpu") as sm:
        described = sm.plan.description
    assert described["thresholds"] is not None and described["selection"] == "predictor"
    assert described["mlp_selection"] is None and described["mlp_pairing"] is None
    assert described["head_pairing"] == "lookahead"


def test_export_checks_its_calibration_flags_against_the_runs_own_rule(tmp_path, tiny_llama):
    """--calibration was refused as useless when only the run's stored config (not the file or a flag) asked for
    score thresholds, which export then calibrates."""
    from dejavu.cli.main import _check_rule_flags

    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=0.5)
    with pytest.raises(DejavuError, match="--calibration is used only to calibrate thresholds"):
        _check_rule_flags(None, "export", "corpus.txt", run=str(run))
    path = run / "predictors" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["config"]["export"]["mlp_selection"] = "threshold"
    path.write_text(json.dumps(manifest))
    _check_rule_flags(None, "export", "corpus.txt", run=str(run))  # accepted


def test_bench_checks_its_calibration_flags_against_the_bundles_own_rule(tmp_path):
    """A score-threshold bundle asked for other densities, another candidate density or another compensation state
    (by flag or config file) calibrates its thresholds anew, so --calibration and --calibration-tokens were wrongly
    refused as changing nothing; with none of those asked, its own thresholds run and the flags are refused."""
    from dejavu.cli.main import _check_rule_flags

    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"mlp_selection": "threshold"}))
    config = tmp_path / "c.yaml"
    config.write_text("runtime:\n  mlp_density: 0.3\n")
    accepted = [dict(densities=(0.3, None, None)), dict(densities=(None, 0.5, None)),
                dict(densities=(None, None, 0.9)), dict(mlp_compensation=False), dict(config=str(config)),
                dict(densities=(0.3, None, None), bundle=bundle / "manifest.json")]  # the bundle named by its file
    for asked in accepted:
        asked = {"bundle": bundle, **asked}
        file = asked.pop("config", None)
        _check_rule_flags(file, "runtime", "corpus.txt", **asked)
        _check_rule_flags(file, "runtime", None, calibration_tokens=256, **asked)
    with pytest.raises(DejavuError, match="--calibration-tokens is used only to calibrate thresholds"):
        _check_rule_flags(None, "runtime", None, densities=(None, None, None), calibration_tokens=256, bundle=bundle)
    with pytest.raises(DejavuError, match="--calibration is used only to calibrate thresholds"):
        _check_rule_flags(None, "runtime", "corpus.txt", densities=(0.3, None, None), bundle=bundle,
                          mlp_selection="topk")
    (bundle / "manifest.json").write_text(json.dumps({"mlp_selection": "topk"}))
    with pytest.raises(DejavuError, match="--calibration is used only to calibrate thresholds"):
        _check_rule_flags(None, "runtime", "corpus.txt", densities=(0.3, None, None), bundle=bundle)


def test_an_export_that_fails_while_writing_keeps_the_earlier_bundle(tmp_path, tiny_llama, monkeypatch):
    """A full disk while the new tensors were written left the old bundle without its manifest (the commit marker
    went first) and printed a traceback."""
    from safetensors import SafetensorError

    import dejavu.artifacts as artifacts

    make_predictors_dir(tmp_path / "run", tiny_llama, mlp_density=0.5, head_density=0.75)
    out = tmp_path / "bundle"
    run_export(tmp_path / "run", out)
    before = load_bundle(out)[0]

    def full_disk(*args, **kwargs):
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(artifacts, "save_file", full_disk)
    with pytest.raises(DejavuError, match="cannot write .*No space left on device"):
        run_export(tmp_path / "run", out, overrides={"export.mlp_density": 0.3})
    assert load_bundle(out)[0] == before and not list(out.glob(".*.tmp"))
    with pytest.raises(DejavuError, match="cannot write"):  # a new --out: nothing left behind, not even directories
        run_export(tmp_path / "run", tmp_path / "new" / "deeper" / "bundle")
    assert not (tmp_path / "new").exists()


def test_one_export_writes_a_bundle_at_a_time(tmp_path, tiny_llama):
    """Two at once both reported success, and one's manifest could describe the other's tensors. The lock is inside
    the bundle, by its real path: a symlink to it or `.` is the same bundle, and its owner needs no other directory."""
    from dejavu.artifacts import WriterLock

    make_predictors_dir(tmp_path / "run", tiny_llama)
    out = tmp_path / "bundle"
    before = run_export(tmp_path / "run", out)
    (tmp_path / "alias").symlink_to(out)
    with WriterLock(out / ".export.lock", "the bundle"):
        for spelling in (out, tmp_path / "alias"):
            with pytest.raises(DejavuError, match="is being written by another dejavu process"):
                run_export(tmp_path / "run", spelling, overrides={"export.mlp_density": 0.3})
    assert load_bundle(out)[0]["created"] == before["created"] and not (out / ".export.lock").exists()
    assert run_export(tmp_path / "run", tmp_path / "alias", overrides={"export.mlp_density": 0.3})["mlp_density"] == 0.3


def test_a_failed_export_removes_only_the_directories_it_made(tmp_path, tiny_llama, monkeypatch):
    # `x/../y/z` with y there before: the walk up went by the text and removed y, keeping x
    from safetensors import SafetensorError

    import dejavu.artifacts as artifacts

    make_predictors_dir(tmp_path / "run", tiny_llama)
    (tmp_path / "y").mkdir()
    monkeypatch.chdir(tmp_path)

    def full_disk(*args, **kwargs):
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(artifacts, "save_file", full_disk)
    with pytest.raises(DejavuError, match="cannot write"):
        run_export(tmp_path / "run", Path("x/../y/z"))
    assert (tmp_path / "y").is_dir() and not (tmp_path / "x").exists() and not (tmp_path / "y" / "z").exists()


def test_paths_through_a_symlink_and_dotdot_are_written_where_the_kernel_puts_them(tmp_path, tiny_llama):
    """`link/../x` is realpath(link)/../x to the kernel, but mkstemp collapsed it by text: temp files landed
    elsewhere and the rename failed."""
    (tmp_path / "real" / "inner").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "inner")
    make_predictors_dir(tmp_path / "real" / "run", tiny_llama)
    run_export(tmp_path / "link" / ".." / "run", tmp_path / "link" / ".." / "bundle")
    assert load_bundle(tmp_path / "real" / "bundle")[1].has_predictors
