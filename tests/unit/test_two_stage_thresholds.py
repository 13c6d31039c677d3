"""Two-stage score thresholds (`--mlp-selection threshold --mlp-candidate-density C`): score thresholds keep
the candidates whose gate/up run, and per-layer thresholds on |down input| keep the MLP density of all neurons
for down. Exactness at the limits, the calibrated shares, tuning through them, the bundle round trip, and what
refuses them."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from dejavu.errors import DejavuError
from dejavu.predictor import units_for_density
from dejavu.runtime.apply import SparseRuntime
from dejavu.runtime.score_thresholds import DOWN_TENSOR_NAME, calibrate_two_stage

from helpers import (
    CALIB_TXT,
    EVAL_RAW,
    load_tiny,
    make_predictors_dir,
    random_ids,
    random_predictors,
    run_interpreted,
)


@torch.no_grad()
def test_down_thresholds_below_every_activation_equal_the_candidates_alone(tiny_llama):
    """Down thresholds that cut nothing leave score thresholds at the candidate density; a threshold above
    every |down input| leaves no neuron, as an MLP that adds nothing."""
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, mlp_density=0.4)
    ids = random_ids(model)
    n = adapter.num_layers
    scores = [0.0] * n
    with SparseRuntime(model, adapter, preds, head_density=1.0, mlp_density=0.6, mlp_score_thresholds=scores):
        one_stage = model(ids).logits
    with SparseRuntime(model, adapter, preds, head_density=1.0, mlp_candidate_density=0.6,
                       mlp_score_thresholds=scores, mlp_down_thresholds=[-1.0] * n) as rt:
        torch.testing.assert_close(model(ids).logits, one_stage)
        summary = rt.stats.summary()
        assert summary["mlp_kept"] == pytest.approx(summary["mlp_candidates_kept"])
    hooks = [adapter.mlp_module(layer).register_forward_hook(lambda m, a, out: torch.zeros_like(out))
             for layer in adapter.decoder_layers()]
    try:
        no_mlp = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    with SparseRuntime(model, adapter, preds, head_density=1.0, mlp_candidate_density=0.6,
                       mlp_score_thresholds=scores, mlp_down_thresholds=[float("inf")] * n) as rt:
        torch.testing.assert_close(model(ids).logits, no_mlp)
        assert rt.stats.summary()["mlp_kept"] == 0.0


@torch.no_grad()
def test_batch_mode_keeps_both_shares_and_fixed_values_reproduce_it(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, mlp_density=0.3)
    ids = random_ids(model, seq=32, batch=1)
    with SparseRuntime(model, adapter, preds, head_density=1.0, mlp_candidate_density=0.6,
                       mlp_score_thresholds="batch", mlp_down_thresholds="batch") as rt:
        batch_logits = model(ids).logits
        scores = [float(rt.batch_score_thresholds[l]) for l in range(adapter.num_layers)]  # noqa: E741
        down = [float(rt.batch_down_thresholds[l]) for l in range(adapter.num_layers)]  # noqa: E741
        summary = rt.stats.summary()
    assert summary["mlp_candidates_kept"] == pytest.approx(0.6, abs=1e-3)
    assert summary["mlp_kept"] == pytest.approx(0.3, abs=1e-3)
    # bytes: gate/up rows of the candidates, down rows of the final set
    assert summary["mlp_weight_share"] == pytest.approx(2 / 3 * 0.6 + 1 / 3 * 0.3, abs=2e-3)
    with SparseRuntime(model, adapter, preds, head_density=1.0, mlp_candidate_density=0.6,
                       mlp_score_thresholds=scores, mlp_down_thresholds=down):
        torch.testing.assert_close(model(ids).logits, batch_logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_gather_mode_equals_mask_mode(tiny_llama):
    """Gather (only the union's rows computed; down reads the union of the final sets) equals mask mode."""
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, mlp_density=0.3)
    ids = random_ids(model, seq=12, batch=2)
    n = adapter.num_layers
    rule = dict(head_density=1.0, mlp_candidate_density=0.6, mlp_score_thresholds=[0.0] * n,
                mlp_down_thresholds=[0.02] * n)
    with SparseRuntime(model, adapter, preds, **rule) as rt:
        masked = model(ids).logits
        kept = rt.stats.summary()["mlp_kept"]
    with SparseRuntime(model, adapter, preds, mode="gather", **rule) as rt:
        torch.testing.assert_close(model(ids).logits, masked, rtol=1e-4, atol=1e-4)
        assert rt.stats.summary()["mlp_kept"] == pytest.approx(kept)
    assert 0.0 < kept < rt.stats.summary()["mlp_candidates_kept"]


def test_calibration_keeps_both_shares_on_its_own_text(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, mlp_density=0.3)
    ids = random_ids(model, seq=256, batch=1, seed=3)[0]
    scores, down = calibrate_two_stage(model, adapter, preds, ids, window=64, candidate_density=0.5,
                                       windows_per_forward=2)
    assert len(scores) == len(down) == adapter.num_layers and all(v is not None and v >= 0 for v in down)
    with SparseRuntime(model, adapter, preds, head_density=1.0, mlp_candidate_density=0.5, mlp_score_thresholds=scores,
                       mlp_down_thresholds=down) as rt, torch.no_grad():
        for start in range(0, 256, 64):
            model(ids[start:start + 64][None])
        summary = rt.stats.summary()
    assert summary["mlp_candidates_kept"] == pytest.approx(0.5, abs=0.03)
    assert summary["mlp_kept"] == pytest.approx(0.3, abs=0.03)


def test_straight_through_reaches_the_predictors_through_both_stages(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, mlp_density=0.3)
    ids = random_ids(model, seq=16, batch=1)
    with SparseRuntime(model, adapter, preds, head_density=1.0, mlp_candidate_density=0.6, mlp_score_thresholds="batch",
                       mlp_down_thresholds="batch", straight_through=2.0) as rt:
        model(ids).logits.float().logsumexp(-1).mean().backward()
        assert rt.stats.summary()["mlp_kept"] == pytest.approx(0.3, abs=1e-3)
    assert all(lp.mlp.w2.grad is not None and lp.mlp.w2.grad.abs().sum() > 0 for lp in preds.layers)


def test_the_runtime_refuses_half_a_rule(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, mlp_density=0.3)
    n = adapter.num_layers
    with pytest.raises(DejavuError, match="take down thresholds"):  # candidates by score, no second stage
        SparseRuntime(model, adapter, preds, mlp_candidate_density=0.6, mlp_score_thresholds=[0.0] * n)
    with pytest.raises(DejavuError, match="second stage of score-threshold candidates"):  # after a top-k
        SparseRuntime(model, adapter, preds, mlp_candidate_density=0.6, mlp_down_thresholds=[0.0] * n)
    with pytest.raises(DejavuError, match="no down threshold"):
        SparseRuntime(model, adapter, preds, mlp_candidate_density=0.6, mlp_score_thresholds=[0.0] * n,
                      mlp_down_thresholds=[float("nan")] * n)
    with pytest.raises(DejavuError, match="below the final MLP density"):
        SparseRuntime(model, adapter, preds, mlp_candidate_density=0.2, mlp_score_thresholds=[0.0] * n,
                      mlp_down_thresholds=[0.0] * n)


@pytest.fixture(scope="module")
def two_stage_bundle(tmp_path_factory, tiny_llama):
    from dejavu.export.bundle import run_export

    run = tmp_path_factory.mktemp("two-stage")
    make_predictors_dir(run, tiny_llama, mlp_density=0.4, head_density=1.0)
    manifest = run_export(run, run / "bundle", config_file="tiny", overrides={
        "export.mlp_selection": "threshold", "export.mlp_candidate_density": 0.6, "data.dataset": str(CALIB_TXT),
        "export.calibration_tokens": 512})
    return run, run / "bundle", manifest


def test_bundle_round_trip_and_bench(two_stage_bundle, tiny_llama, tmp_path):
    from dejavu.export.bundle import load_bundle, run_export
    from dejavu.runtime.bench import run_bench

    run, bundle, manifest = two_stage_bundle
    assert manifest["mlp_selection"] == "threshold" and manifest["mlp_candidate_density"] == 0.6
    _, pset = load_bundle(bundle)
    assert len(pset.mlp_down_thresholds) == len(pset.layers)
    assert all(isinstance(v, float) for v in pset.mlp_down_thresholds)
    common = dict(model=str(tiny_llama), dataset=str(EVAL_RAW), config_file="tiny", speed=False)
    settings = {"runtime.max_eval_tokens": 300, "runtime.device": "cpu"}
    from_bundle = run_bench(bundle=bundle, json_out=tmp_path / "a.json", overrides=settings, **common)
    assert from_bundle["mlp_score_thresholds"]["from_bundle"] and from_bundle["mlp_candidate_density"] == 0.6
    computed = from_bundle["quality"]["computed"]
    assert computed["mlp_kept"] < computed["mlp_candidates_kept"]
    # a top-k bundle of the same predictors with the same rule asked for by flags: calibrated at bench time on
    # the same tokens, so the same figures
    run_export(run, tmp_path / "topk", config_file="tiny")
    flagged = run_bench(bundle=tmp_path / "topk", json_out=tmp_path / "b.json", **common, overrides={
        **settings, "runtime.mlp_selection": "threshold", "runtime.mlp_candidate_density": 0.6,
        "runtime.mlp_density": 0.4, "runtime.calibration_tokens": 512, "data.dataset": str(CALIB_TXT)})
    assert not flagged["mlp_score_thresholds"].get("from_bundle")
    assert from_bundle["sparse"]["ppl"] == pytest.approx(flagged["sparse"]["ppl"], rel=1e-6)
    # another candidate density than the bundle's: calibrated anew
    other = run_bench(bundle=bundle, json_out=tmp_path / "c.json", **common, overrides={
        **settings, "runtime.mlp_candidate_density": 0.8, "runtime.calibration_tokens": 512,
        "data.dataset": str(CALIB_TXT)})
    assert not other["mlp_score_thresholds"].get("from_bundle")
    assert other["quality"]["computed"]["mlp_candidates_kept"] > computed["mlp_candidates_kept"]
    # the exact top-k among top-k candidates is the other two-stage rule
    exact = run_bench(bundle=bundle, json_out=tmp_path / "d.json", **common,
                      overrides={**settings, "runtime.mlp_selection": "topk"})
    assert exact["mlp_selection"] == "topk" and exact["mlp_candidate_density"] == 0.6


def test_the_python_api_refuses_another_candidate_density_than_calibrated(two_stage_bundle, tiny_llama):
    from dejavu.export.bundle import load_bundle
    from dejavu.models.adapters import adapter_for
    from dejavu.models.loading import load_model
    from dejavu.runtime.apply import SparseRuntime
    from dejavu.runtime.decode import DecodeModel

    _, bundle, _ = two_stage_bundle
    _, pset = load_bundle(bundle)
    assert pset.mlp_candidate_density == 0.6
    model, _, _ = load_model(str(tiny_llama), device="cpu", dtype="float32")
    adapter = adapter_for(model)
    rule = dict(mlp_score_thresholds=pset.mlp_score_thresholds, mlp_down_thresholds=pset.mlp_down_thresholds)
    with pytest.raises(DejavuError, match="not the 0.6 these predictors' down thresholds"):
        SparseRuntime(model, adapter, pset, mlp_candidate_density=0.8, **rule)
    with SparseRuntime(model, adapter, pset, mlp_candidate_density=0.6, **rule):
        pass
    with pytest.raises(DejavuError, match="mlp_candidate_density 0.8 is not the 0.6"):
        DecodeModel(model, adapter, pset, "cpu", torch.float32, 16, mlp_candidate_density=0.8)
    with pytest.raises(DejavuError, match=r"calibrated at \(0.6\)"):
        DecodeModel(model, adapter, pset, "cpu", torch.float32, 16)
    DecodeModel(model, adapter, pset, "cpu", torch.float32, 16, mlp_candidate_density=0.6)
    # other densities drop the thresholds, and with them the candidate density they were set at
    assert pset.with_densities(mlp=0.3).mlp_candidate_density is None


def test_bundle_refuses_missing_down_thresholds(two_stage_bundle, tmp_path):
    from dejavu.artifacts import load_tensors, save_tensors
    from dejavu.export.bundle import BUNDLE_FILE, load_bundle

    _, bundle, _ = two_stage_bundle
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    tensors = load_tensors(bundle / BUNDLE_FILE)
    del tensors[DOWN_TENSOR_NAME]
    sha = save_tensors(copy / BUNDLE_FILE, tensors)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][0]["sha256"] = sha
    manifest["files"][0]["bytes"] = (copy / BUNDLE_FILE).stat().st_size
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DejavuError, match=f"lacks {DOWN_TENSOR_NAME}"):
        load_bundle(copy)


def test_tuning_for_them_and_the_export_note(tmp_path, tiny_llama, capsys):
    from dejavu.export.bundle import run_export
    from dejavu.train.tune import run_tune

    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.4, head_density=1.0)
    manifest = run_tune(run, config_file="tiny", overrides={
        "tune.steps": 2, "tune.eval_sequences": 1, "tune.mlp_selection": "threshold",
        "tune.mlp_candidate_density": 0.6, "data.dataset": str(CALIB_TXT), "model.device": "cpu"})
    assert manifest["tuned"]["mlp_candidate_density"] == 0.6
    assert manifest["tuned"]["inputs"]["tune"]["mlp_candidate_density"] == 0.6
    capsys.readouterr()
    run_export(run / "tuned", tmp_path / "bundle", config_file="tiny",
               overrides={"export.mlp_selection": "threshold", "data.dataset": str(CALIB_TXT),
                          "export.calibration_tokens": 256})
    assert "--mlp-selection threshold --mlp-candidate-density 0.6 matches the tuning" in capsys.readouterr().out
    run_export(run / "tuned", tmp_path / "bundle", config_file="tiny", overrides={
        "export.mlp_selection": "threshold", "export.mlp_candidate_density": 0.6, "data.dataset": str(CALIB_TXT),
        "export.calibration_tokens": 256})
    assert "matches the tuning" not in capsys.readouterr().out
    # a candidate density below the MLP density is refused before the finished tuning is touched
    with pytest.raises(DejavuError, match="below the MLP density"):
        run_tune(run, config_file="tiny", overwrite=True, overrides={
            "tune.steps": 2, "tune.eval_sequences": 1, "tune.mlp_selection": "threshold",
            "tune.mlp_candidate_density": 0.3, "data.dataset": str(CALIB_TXT), "model.device": "cpu"})
    assert (run / "tuned" / "manifest.json").is_file()


def test_a_top_k_tuning_exported_two_stage_top_k_gets_no_note(tmp_path, tiny_llama, capsys):
    """A two-stage top-k is never tuned for, so exporting top-k-tuned predictors with candidates notes nothing;
    a tuning without candidates exported with them is told what matches."""
    from dejavu.export.bundle import run_export
    from dejavu.train.tune import run_tune

    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.4, head_density=1.0)
    run_tune(run, config_file="tiny", overrides={"tune.steps": 1, "tune.eval_sequences": 1,
                                                 "data.dataset": str(CALIB_TXT), "model.device": "cpu"})
    capsys.readouterr()
    run_export(run / "tuned", tmp_path / "b", config_file="tiny", overrides={"export.mlp_candidate_density": 0.6})
    assert "matches the tuning" not in capsys.readouterr().out
    run_export(run / "tuned", tmp_path / "c", config_file="tiny", overrides={
        "export.mlp_selection": "threshold", "export.mlp_candidate_density": 0.6, "data.dataset": str(CALIB_TXT),
        "export.calibration_tokens": 256})
    assert "(--mlp-selection topk matches the tuning)" in capsys.readouterr().out


def test_config_refuses_candidates_for_a_top_k_tuning():
    from dejavu.config import load_config

    with pytest.raises(DejavuError, match="needs --mlp-selection threshold"):
        load_config(None, {"tune.mlp_candidate_density": 0.6})
    with pytest.raises(DejavuError, match="below the MLP density"):
        load_config(None, {"tune.mlp_candidate_density": 0.3, "tune.mlp_density": 0.5,
                            "tune.mlp_selection": "threshold"})


# --- the decode loop ---------------------------------------------------------------------------------------------


def _decode_setup(tiny_model_factory, candidate_density=0.6, down_quantile=0.5):
    """A tiny Llama, random predictors at MLP density 0.3 and heads 0.5, and two-stage thresholds from a batch-mode
    forward of random tokens (about the candidate density; the down cut keeps about down_quantile of all)."""
    from transformers import AutoModelForCausalLM

    from dejavu.models.adapters import adapter_for
    from dejavu.predictor import PredictorSet

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"), dtype=torch.float32).eval()
    adapter = adapter_for(model)
    s = adapter.shape()
    preds = PredictorSet.random(adapter.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, 8, down_quantile,
                                0.5, seed=3)
    ids = torch.randint(1, 500, (1, 24), generator=torch.Generator().manual_seed(5))
    with SparseRuntime(model, adapter, preds, mlp_candidate_density=candidate_density, mlp_score_thresholds="batch",
                       mlp_down_thresholds="batch") as rt, torch.no_grad():
        model(input_ids=ids)
        preds.mlp_score_thresholds = [float(rt.batch_score_thresholds[l]) for l in range(adapter.num_layers)]  # noqa: E741
        preds.mlp_down_thresholds = [float(rt.batch_down_thresholds[l]) for l in range(adapter.num_layers)]  # noqa: E741
    return model, adapter, preds


def test_decode_steps_equal_the_reference_runtime(tiny_model_factory):
    from dejavu.runtime.decode import DecodeModel

    model, adapter, preds = _decode_setup(tiny_model_factory)
    prompt = torch.randint(1, 500, (1, 6), generator=torch.Generator().manual_seed(0))
    dm = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=16, mlp_candidate_density=0.6)
    st = dm.new_state(1)
    dm.prefill(st, prompt)
    ids = torch.cat([prompt, st.tokens[:, None]], 1)
    dm.reset_mlp_tally()
    for _ in range(3):
        logits = dm.step(st, sparse=True)
        with SparseRuntime(model, adapter, preds, mlp_candidate_density=0.6,
                           mlp_score_thresholds=preds.mlp_score_thresholds,
                           mlp_down_thresholds=preds.mlp_down_thresholds) as rt, torch.no_grad():
            rt.token_mask = torch.arange(ids.shape[1])[None] >= prompt.shape[1]
            ref = model(input_ids=ids).logits[:, -1]
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
        ids = torch.cat([ids, st.tokens[:, None]], 1)
    candidates, down = dm.mlp_share_read(), dm.mlp_down_share_read()
    assert 0.0 < down < candidates < 1.0
    assert dm.down_tally[:, 1].tolist() == [3] * adapter.num_layers
    # the bytes count the down rows read: as many more as down would read for every candidate
    cut_bytes = dm.step_bytes(1, 8, sparse=True)["weights"]
    rows_skipped = (dm.mlp_tally[:, 0].sum() - dm.down_tally[:, 0].sum()).item() / 3  # a step's, over the layers
    dm.down_tally[:, 0] = dm.mlp_tally[:, 0]
    fp32 = 4
    assert dm.step_bytes(1, 8, sparse=True)["weights"] - cut_bytes == pytest.approx(
        rows_skipped * adapter.shape().hidden_size * fp32)


def test_a_batch_takes_the_candidates_top_k_and_cuts_down_per_sequence(tiny_model_factory):
    """In a batch the candidates are the batch's top-k at the candidate density; with a down cut below every
    activation that is the one-stage top-k at that density, and the fused and classic paths agree."""
    from dejavu.runtime.decode import DecodeModel

    model, adapter, preds = _decode_setup(tiny_model_factory)
    prompt = torch.randint(1, 500, (2, 6), generator=torch.Generator().manual_seed(1))
    cuts = preds.mlp_down_thresholds

    def steps(impl, rule):
        if rule == "topk":
            preds.mlp_score_thresholds = preds.mlp_down_thresholds = None
            use = preds.with_densities(0.6, None)
        else:
            use = preds
        dm = DecodeModel(model, adapter, use, "cpu", torch.float32, max_len=12, select_impl=impl,
                         mlp_candidate_density=None if rule == "topk" else 0.6)
        st = dm.new_state(2)
        dm.prefill(st, prompt)
        out = torch.stack([dm.step(st, sparse=True) for _ in range(2)])
        return out, dm

    scores = preds.mlp_score_thresholds
    fused, dm = steps("fused", "two-stage")
    classic, _ = steps("classic", "two-stage")
    torch.testing.assert_close(fused, classic, atol=1e-5, rtol=1e-5)
    assert dm.mlp_tally[:, 1].tolist() == [0] * adapter.num_layers  # the candidates' top-k: no count
    assert dm.down_tally[:, 1].tolist() == [2] * adapter.num_layers
    assert dm.mlp_down_share_read() < units_for_density(0.6, adapter.shape().intermediate_size) / adapter.shape(
    ).intermediate_size
    preds.mlp_down_thresholds = [-1.0] * adapter.num_layers
    uncut, _ = steps("fused", "two-stage")
    preds.mlp_score_thresholds, preds.mlp_down_thresholds = scores, cuts
    topk, _ = steps("fused", "topk")
    torch.testing.assert_close(uncut, topk, atol=1e-5, rtol=1e-5)


def test_the_cut_keeps_each_sequence_s_own_entries():
    """In a batch, down reads a row when any sequence's activation is above the cut, and each sequence adds only
    its own entries above it (the reference op the kernels are checked against)."""
    from dejavu.runtime.kernels import ops

    torch.manual_seed(0)
    d, n = 8, 4
    x = torch.randn(2, d)
    gate, up, down_t = torch.randn(n, d), torch.randn(n, d), torch.randn(n, d)
    idx = torch.arange(n)
    h = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    cut = float(h.abs().median())
    acc, tally = torch.zeros(2, d), torch.zeros(2, dtype=torch.int64)
    ops.sparse_mlp_cut_acc(x, gate, up, down_t, idx, 1, acc, cut, tally)
    want = torch.where(h.abs() > cut, h, 0.0) @ down_t
    torch.testing.assert_close(acc, want, rtol=1e-5, atol=1e-5)
    assert tally.tolist() == [int((h.abs() > cut).any(0).sum()), 1]
    assert (h.abs() > cut).any(0).sum() > (h.abs() > cut).sum(1).max()  # the sequences keep different rows


def test_the_decode_loop_refuses_half_a_rule(tiny_model_factory):
    from dejavu.runtime.decode import DecodeModel

    model, adapter, preds = _decode_setup(tiny_model_factory)
    with pytest.raises(DejavuError, match="pass the mlp_candidate_density"):
        DecodeModel(model, adapter, preds, "cpu", torch.float32, 16)  # no candidate density
    down = preds.mlp_down_thresholds
    preds.mlp_down_thresholds = None
    with pytest.raises(DejavuError, match="take down thresholds as their second stage"):
        DecodeModel(model, adapter, preds, "cpu", torch.float32, 16, mlp_candidate_density=0.6)
    preds.mlp_down_thresholds, preds.mlp_score_thresholds = down, None
    with pytest.raises(DejavuError, match="carry no score thresholds"):
        DecodeModel(model, adapter, preds, "cpu", torch.float32, 16, mlp_candidate_density=0.6)


def test_bench_times_them_and_generate_agrees_with_the_hooks(two_stage_bundle, tiny_llama, tmp_path):
    from dejavu.runtime.bench import run_bench
    from dejavu.runtime.generate import run_generate

    _, bundle, _ = two_stage_bundle
    timed = run_bench(bundle=bundle, json_out=tmp_path / "s.json", speed=True, quality=False, model=str(tiny_llama),
                      dataset=str(EVAL_RAW), config_file="tiny", overrides={"runtime.device": "cpu"})
    row = timed["speed"]["batches"]["1"]
    assert 0.0 < row["sparse_mlp_down_share_read"] < row["sparse_mlp_share_read"] < 1.0
    assert "down threshold" in timed["speed"]["batch_selection"]
    out = {}
    for engine in ("decode-loop", "hooks"):
        out[engine] = run_generate(["The history of the city"], model=str(tiny_llama), bundle=bundle,
                                   config_file="tiny", max_new_tokens=8, engine=engine, overrides={"runtime.device": "cpu"})
        assert out[engine]["engine"].startswith(engine)
    loop, hooks = (out[e]["generations"][0]["sparse"]["token_ids"] for e in ("decode-loop", "hooks"))
    assert loop == hooks and len(loop) >= 1


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter mode)")
def test_cut_kernels_in_interpreter():
    """The down kernels' cut: only entries above it count, a row no sequence keeps is never read, and the tally
    sums the rows read, against the reference ops."""
    run_interpreted('''
        from dejavu.runtime.kernels import triton_kernels as T, ops
        torch.manual_seed(0)
        d, n = 300, 200  # d above one column block: a row is tallied once whatever the blocks
        gate, up, down_t = torch.randn(n, d) * 0.3, torch.randn(n, d) * 0.3, torch.randn(n, d) * 0.1
        idx = torch.randperm(n)
        for cut in (-1.0, 0.05, 0.2, 1e9):
            for c in (None, 0, 37, n):
                count = None if c is None else torch.tensor([c], dtype=torch.int32)
                for b in (1, 3):
                    x = torch.randn(b, d)
                    ref, ref_tally = torch.zeros(b, d), torch.zeros(2, dtype=torch.int64)
                    ops.sparse_mlp_cut_acc.eager(x, gate, up, down_t, idx, 1, ref, cut, ref_tally, count)
                    h = T.gather_matvec(x, up, idx, 1, gate, 1, count=count)
                    acc, tally = torch.zeros(b, d), torch.zeros(2, dtype=torch.int64)
                    T.gather_vecmat_acc(h, down_t, idx, 1, acc, count=count, cut=cut, tally=tally)
                    torch.testing.assert_close(acc, ref, atol=1e-4, rtol=1e-4)
                    assert tally.tolist() == ref_tally.tolist(), (cut, c, b, tally, ref_tally)
                    if b == 1:
                        acc, tally = torch.zeros(1, d), torch.zeros(2, dtype=torch.int64)
                        T.sparse_mlp_gemv(x, gate, up, down_t, idx, 1, acc, count=count, cut=cut, tally=tally)
                        torch.testing.assert_close(acc, ref, atol=1e-4, rtol=1e-4)
                        assert tally.tolist() == ref_tally.tolist(), (cut, c, tally, ref_tally)
        print("ok")
    ''', timeout=600)
