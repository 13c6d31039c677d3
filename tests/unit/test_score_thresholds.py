"""MLP score thresholds (runtime/score_thresholds.py, `--mlp-selection threshold`): each token keeps the
neurons its predictor scores above a per-layer threshold instead of a top-k. Exactness at the limits, the
calibrated share, the bundle round trip, the decode loop and generate running them, and what refuses them."""

from __future__ import annotations

import json

import pytest
import torch

from dejavu.errors import DejavuError
from dejavu.runtime.apply import SparseRuntime
from dejavu.runtime.score_thresholds import TENSOR_NAME, calibrate_score_thresholds

from helpers import CALIB_TXT, EVAL_RAW, load_tiny, make_predictors_dir, random_ids, random_predictors


@torch.no_grad()
def test_thresholds_below_every_score_equal_dense(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, mlp_density=0.5)
    ids = random_ids(model)
    dense = model(ids).logits
    with SparseRuntime(model, adapter, preds, head_density=1.0,
                       mlp_score_thresholds=[float("-inf")] * adapter.num_layers) as rt:
        torch.testing.assert_close(model(ids).logits, dense)
        assert rt.stats.summary()["mlp_kept"] == 1.0


@torch.no_grad()
def test_fixed_thresholds_reproduce_the_forward_they_were_set_on(tiny_llama):
    """A sequence in batch mode keeps exactly the density per layer; the same thresholds fixed give the
    same forward, and tokens keep different counts (what a top-k cannot)."""
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, mlp_density=0.5)
    ids = random_ids(model, seq=32, batch=1)
    with SparseRuntime(model, adapter, preds, head_density=1.0, mlp_score_thresholds="batch", record=True) as rt:
        batch_logits = model(ids).logits
        values = [rt.batch_score_thresholds[l] for l in range(adapter.num_layers)]  # noqa: E741
        assert rt.stats.summary()["mlp_kept"] == pytest.approx(0.5, abs=1e-3)
        per_token = rt.masks[("mlp", 0)].sum(-1)
    assert per_token.min() < per_token.max()
    with SparseRuntime(model, adapter, preds, head_density=1.0, mlp_score_thresholds=values) as rt:
        torch.testing.assert_close(model(ids).logits, batch_logits)
    # top-k at the same density is another selection
    with SparseRuntime(model, adapter, preds, head_density=1.0):
        assert not torch.allclose(model(ids).logits, batch_logits)


@torch.no_grad()
def test_each_sequence_sets_its_own_thresholds(tiny_llama):
    """Batch mode takes each sequence's quantile, so a batch gives what its sequences give alone (and a tuning
    split over processes what one process gives); dense tokens are left out of the quantile."""
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, mlp_density=0.5)
    ids = random_ids(model, seq=24, batch=2, seed=1)
    with SparseRuntime(model, adapter, preds, head_density=1.0, mlp_score_thresholds="batch") as rt:
        together = model(ids).logits
        alone = torch.cat([model(ids[i:i + 1]).logits for i in range(2)])
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
        first_dense = torch.ones(ids.shape, dtype=torch.bool)
        first_dense[0] = False  # sequence 0 all dense: it neither counts nor shifts sequence 1's threshold
        rt.token_mask = first_dense
        masked = model(ids).logits
        assert rt.batch_score_tokens[0] == 24
    torch.testing.assert_close(masked[1], alone[1], rtol=1e-4, atol=1e-4)


def test_calibration_keeps_the_density_on_its_own_text(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, mlp_density=0.3)
    ids = random_ids(model, seq=256, batch=1, seed=3)[0]
    values = calibrate_score_thresholds(model, adapter, preds, ids, window=64, windows_per_forward=2)
    assert len(values) == adapter.num_layers and all(v is not None for v in values)
    with SparseRuntime(model, adapter, preds, head_density=1.0, mlp_score_thresholds=values) as rt, torch.no_grad():
        for start in range(0, 256, 64):
            model(ids[start:start + 64][None])
        assert rt.stats.summary()["mlp_kept"] == pytest.approx(0.3, abs=0.03)


def test_straight_through_thresholds_pass_gradients_to_the_predictors(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, mlp_density=0.5)
    ids = random_ids(model, seq=16, batch=1)
    with SparseRuntime(model, adapter, preds, head_density=1.0, mlp_score_thresholds="batch",
                       straight_through=2.0):
        model(ids).logits.float().logsumexp(-1).mean().backward()
    assert all(lp.mlp.w2.grad is not None and lp.mlp.w2.grad.abs().sum() > 0 for lp in preds.layers)


def test_runtime_refuses_thresholds_it_cannot_apply(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, mlp_density=0.5)
    n = adapter.num_layers
    with pytest.raises(DejavuError, match="cover 1 layers"):
        SparseRuntime(model, adapter, preds, mlp_score_thresholds=[0.0])
    with pytest.raises(DejavuError, match="no score threshold"):
        SparseRuntime(model, adapter, preds, mlp_score_thresholds=[float("nan")] * n)
    with pytest.raises(DejavuError, match="own MLP rule"):
        SparseRuntime(model, adapter, preds, mlp_score_thresholds=[0.0] * n, mlp_up_weight=0.4)
    with pytest.raises(DejavuError, match="selection 'predictor'"):
        SparseRuntime(model, adapter, None, selection="oracle", mlp_score_thresholds=[0.0] * n)


def test_other_densities_drop_the_thresholds(tiny_llama):
    _, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, mlp_density=0.5)
    preds.mlp_score_thresholds = [0.0] * adapter.num_layers
    assert preds.with_densities(0.5, None).mlp_score_thresholds is not None
    assert preds.with_densities(0.4, None).mlp_score_thresholds is None


@pytest.fixture(scope="module")
def threshold_bundle(tmp_path_factory, tiny_llama):
    from dejavu.export.bundle import run_export

    run = tmp_path_factory.mktemp("scored")
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=1.0)
    manifest = run_export(run, run / "bundle", config_file="tiny", overrides={
        "export.mlp_selection": "threshold", "data.dataset": str(CALIB_TXT), "export.calibration_tokens": 512})
    return run, run / "bundle", manifest


def test_bundle_round_trip_and_bench_from_it(threshold_bundle, tiny_llama, tmp_path):
    from dejavu.export.bundle import load_bundle
    from dejavu.runtime.bench import run_bench

    run, bundle, manifest = threshold_bundle
    assert manifest["mlp_selection"] == "threshold"
    assert manifest["mlp_score_thresholds"]["calibration_tokens"] == 512
    _, pset = load_bundle(bundle)
    assert len(pset.mlp_score_thresholds) == len(pset.layers)
    assert all(isinstance(v, float) for v in pset.mlp_score_thresholds)
    common = dict(model=str(tiny_llama), dataset=str(EVAL_RAW), config_file="tiny")
    settings = {"runtime.max_eval_tokens": 300, "runtime.device": "cpu"}
    from_bundle = run_bench(bundle=bundle, json_out=tmp_path / "a.json", speed=False, overrides=settings, **common)
    assert from_bundle["mlp_selection"] == "threshold" and from_bundle["mlp_score_thresholds"]["from_bundle"]
    # a top-k bundle of the same predictors, calibrated at bench time on the same tokens: the same thresholds,
    # so the same figures
    from dejavu.export.bundle import run_export

    run_export(run, tmp_path / "topk", config_file="tiny")
    flagged = run_bench(bundle=tmp_path / "topk", json_out=tmp_path / "b.json", speed=False, **common, overrides={
        **settings, "runtime.mlp_selection": "threshold", "runtime.calibration_tokens": 512,
        "data.dataset": str(CALIB_TXT)})
    assert flagged["mlp_selection"] == "threshold" and not flagged["mlp_score_thresholds"].get("from_bundle")
    assert from_bundle["sparse"]["ppl"] == pytest.approx(flagged["sparse"]["ppl"], rel=1e-6)
    # the flag on a threshold bundle asks to calibrate now, on the corpus given
    again = run_bench(bundle=bundle, json_out=tmp_path / "f.json", speed=False, **common, overrides={
        **settings, "runtime.mlp_selection": "threshold", "runtime.calibration_tokens": 256,
        "data.dataset": str(CALIB_TXT)})
    assert again["mlp_score_thresholds"] == {"calibration": str(CALIB_TXT), "calibration_tokens": 256,
                                             "with_mlp_compensation": False}
    # another head density than the bundle's: its thresholds were set with other inputs, so new ones
    heads = run_bench(bundle=bundle, json_out=tmp_path / "g.json", speed=False, **common, overrides={
        **settings, "runtime.head_density": 0.5, "runtime.calibration_tokens": 512, "data.dataset": str(CALIB_TXT)})
    assert heads["mlp_selection"] == "threshold" and not heads["mlp_score_thresholds"].get("from_bundle")
    # other densities than the bundle's: its thresholds no longer apply, new ones are calibrated
    other = run_bench(bundle=bundle, json_out=tmp_path / "e.json", speed=False, **common, overrides={
        **settings, "runtime.mlp_density": 0.3, "runtime.calibration_tokens": 512, "data.dataset": str(CALIB_TXT)})
    assert other["mlp_selection"] == "threshold" and not other["mlp_score_thresholds"].get("from_bundle")
    assert other["quality"]["computed"]["mlp_kept"] < from_bundle["quality"]["computed"]["mlp_kept"]
    # the top-k of the same predictors is another rule
    topk = run_bench(bundle=bundle, json_out=tmp_path / "c.json", speed=False, **common,
                     overrides={**settings, "runtime.mlp_selection": "topk"})
    assert topk["mlp_selection"] == "topk" and topk["mlp_score_thresholds"] is None
    assert topk["sparse"]["ppl"] != from_bundle["sparse"]["ppl"]
    # speed: the decode loop runs the thresholds, and reports the share of the MLP its steps really read
    timed = run_bench(bundle=bundle, json_out=tmp_path / "d.json", speed=True, quality=False, **common,
                      overrides=settings)
    row = timed["speed"]["batches"]["1"]
    assert timed["mlp_selection"] == "threshold" and "above the layer's threshold" in timed["speed"]["batch_selection"]
    assert 0.0 < row["sparse_mlp_share_read"] < 1.0 and row["sparse_ms_per_token"] > 0
    # the bundle's top-k asked for: the decode loop times it
    timed = run_bench(bundle=bundle, json_out=tmp_path / "h.json", speed=True, quality=False, **common,
                      overrides={**settings, "runtime.mlp_selection": "topk"})
    assert timed["speed"]["batches"]["1"]["sparse_ms_per_token"] > 0


def test_bundle_refuses_a_damaged_threshold(threshold_bundle, tmp_path):
    import shutil

    from dejavu.artifacts import load_tensors, save_tensors
    from dejavu.export.bundle import BUNDLE_FILE, load_bundle

    _, bundle, _ = threshold_bundle
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["mlp_selection"] = "sometimes"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DejavuError, match="mlp_selection must be topk or threshold"):
        load_bundle(copy)
    # a NaN threshold, with the file hash updated as a careless edit would
    tensors = load_tensors(bundle / BUNDLE_FILE)
    tensors[TENSOR_NAME][0] = float("nan")
    sha = save_tensors(copy / BUNDLE_FILE, tensors)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][0]["sha256"] = sha
    manifest["files"][0]["bytes"] = (copy / BUNDLE_FILE).stat().st_size
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DejavuError, match="layer 0 runs a sparse MLP but its score_thresholds.mlp value is nan"):
        load_bundle(copy)


def test_generate_runs_them_in_the_decode_loop_as_the_hooks_do(threshold_bundle, tiny_llama):
    from dejavu.runtime.generate import run_generate

    _, bundle, _ = threshold_bundle
    out = {}
    for engine in ("decode-loop", "hooks"):
        out[engine] = run_generate(["The history of the city"], model=str(tiny_llama), bundle=bundle,
                                   config_file="tiny", max_new_tokens=8, engine=engine, overrides={"runtime.device": "cpu"})
        assert out[engine]["engine"].startswith(engine) and out[engine]["mlp_selection"] == "threshold"
    auto = run_generate(["Hello"], model=str(tiny_llama), bundle=bundle, config_file="tiny", max_new_tokens=2,
                        engine="auto", overrides={"runtime.device": "cpu"})
    assert auto["engine"].startswith("decode-loop")
    loop, hooks = (out[e]["generations"][0]["sparse"]["token_ids"] for e in ("decode-loop", "hooks"))
    assert loop == hooks and len(loop) >= 1


def test_flags_that_cannot_go_with_it_are_refused(threshold_bundle, tiny_llama):
    from typer.testing import CliRunner

    from dejavu.cli.main import app

    _, bundle, _ = threshold_bundle
    runner = CliRunner()
    base = ["bench", "--model", str(tiny_llama), "--bundle", str(bundle), "--no-speed", "--config", "tiny",
            "--device", "cpu"]
    for extra, message in ((["--mlp-selection", "threshold", "--mlp-up-weight", "0.4"], "own MLP rule"),
                           (["--mlp-selection", "threshold", "--selection", "oracle"], "refine the predictors"),
                           (["--mlp-selection", "sometimes"], "runtime.mlp_selection must be one of")):
        result = runner.invoke(app, base + extra)
        assert result.exit_code != 0 and message in result.output, result.output
    # random weights have no corpus: a synthetic run refuses calibration flags rather than ignore them
    for extra in (["--calibration", str(CALIB_TXT)], ["--calibration-tokens", "64"]):
        result = runner.invoke(app, ["bench", "--synthetic", "smollm2-135m", "--layers", "1", "--device", "cpu",
                                     "--mlp-selection", "threshold", *extra])
        assert result.exit_code != 0 and "random tokens" in result.output, result.output
