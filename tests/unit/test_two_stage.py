"""Two-stage MLP selection (runtime/apply.py, `mlp_candidate_density`): predictor candidates, then the
exact top-k among them; its limits (all candidates = oracle, c == d = one-stage), gather == mask, and
that the final set never leaves the candidates."""

from __future__ import annotations

import pytest
import torch

from dejavu.errors import DejavuError
from dejavu.runtime.apply import SparseRuntime, topk_among

from helpers import load_tiny, random_ids, random_predictors


def test_topk_among_stays_inside_candidates():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.5]])
    cand = torch.tensor([[False, True, False, True, True, True]])
    assert topk_among(scores, cand, 0.5).tolist() == [[False, True, False, True, True, False]]
    few = torch.tensor([[True, False, False, False, False, False]])
    assert topk_among(scores, few, 0.5).tolist() == [[True, False, False, False, False, False]]


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_all_candidates_equals_oracle(tiny_model_factory, model_type):
    model, adapter = load_tiny(tiny_model_factory(model_type))
    ids = random_ids(model)
    with SparseRuntime(model, adapter, None, selection="oracle", mlp_density=0.4, head_density=1.0):
        oracle = model(ids).logits
    with SparseRuntime(model, adapter, random_predictors(adapter), mlp_density=0.4, head_density=1.0,
                       mlp_candidate_density=1.0) as rt:
        two = model(ids).logits
        s = rt.stats.summary()
    torch.testing.assert_close(two, oracle)
    assert s["mlp_candidates_kept"] == pytest.approx(1.0)
    up_share = 2 / 3 if model_type == "llama" else 1 / 2
    assert s["mlp_weight_share"] == pytest.approx(up_share + (1 - up_share) * s["mlp_kept"])


@torch.no_grad()
def test_candidates_equal_final_is_one_stage(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    ids, preds = random_ids(model), random_predictors(adapter)
    with SparseRuntime(model, adapter, preds, mlp_density=0.5, head_density=1.0):
        plain = model(ids).logits
    with SparseRuntime(model, adapter, preds, mlp_density=0.5, head_density=1.0, mlp_candidate_density=0.5):
        two = model(ids).logits
    torch.testing.assert_close(two, plain)


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_gather_equals_mask(tiny_model_factory, model_type):
    model, adapter = load_tiny(tiny_model_factory(model_type))
    ids, preds = random_ids(model), random_predictors(adapter)
    kw = dict(mlp_density=0.3, head_density=1.0, mlp_candidate_density=0.7)
    with SparseRuntime(model, adapter, preds, mode="mask", **kw) as rt:
        masked = model(ids).logits
        mask_stats = rt.stats.summary()
    with SparseRuntime(model, adapter, preds, mode="gather", **kw) as rt:
        gathered = model(ids).logits
        gather_stats = rt.stats.summary()
    torch.testing.assert_close(gathered, masked)
    assert gather_stats == pytest.approx(mask_stats)
    assert not torch.allclose(masked, model(ids).logits)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["mask", "gather"])
def test_final_set_is_subset_of_candidates(tiny_llama, mode):
    model, adapter = load_tiny(tiny_llama)
    ids, preds = random_ids(model), random_predictors(adapter)
    n = adapter.shape().intermediate_size
    with SparseRuntime(model, adapter, preds, mode=mode, mlp_density=0.25, head_density=1.0,
                       mlp_candidate_density=0.6, record=True) as rt:
        model(ids)
        for l in range(adapter.num_layers):  # noqa: E741
            final, cand = rt.masks[("mlp", l)], rt.masks[("mlp_candidates", l)].reshape(rt.masks[("mlp", l)].shape)
            assert not (final & ~cand).any()
            assert (final.sum(-1) == -(-n // 4)).all()  # k = ceil(0.25 n) per token
        s = rt.stats.summary()
    assert s["mlp_candidates_kept"] == pytest.approx(0.6, abs=1.5 / n)
    assert s["mlp_weight_share"] == pytest.approx(2 / 3 * s["mlp_candidates_kept"] + 1 / 3 * s["mlp_kept"])


def test_candidates_below_final_density_is_refused(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    with pytest.raises(DejavuError, match="below the final MLP density"):
        SparseRuntime(model, adapter, random_predictors(adapter), mlp_density=0.5, mlp_candidate_density=0.3)
    with pytest.raises(DejavuError, match="needs selection 'predictor'"):
        SparseRuntime(model, adapter, None, selection="oracle", mlp_candidate_density=0.8)


def test_export_records_candidates_and_bench_uses_them(tmp_path, tiny_llama):
    import json

    from dejavu.export.bundle import run_export
    from dejavu.runtime.bench import run_bench

    from helpers import EVAL_RAW, make_predictors_dir

    make_predictors_dir(tmp_path, tiny_llama)
    manifest = run_export(tmp_path, tmp_path / "bundle", overrides={"export.mlp_candidate_density": 0.8})
    assert manifest["mlp_candidate_density"] == 0.8

    def bench(**overrides):
        out = tmp_path / "bench.json"
        run_bench(model=str(tiny_llama), bundle=tmp_path / "bundle", dataset=str(EVAL_RAW), json_out=out,
                  config_file="tiny", overrides={"runtime.max_eval_tokens": 200, "runtime.device": "cpu",
                                                 **overrides}, speed=False)
        return json.loads(out.read_text())

    from_bundle = bench()
    assert from_bundle["mlp_candidate_density"] == 0.8
    computed = from_bundle["quality"]["computed"]
    assert computed["mlp_candidates_kept"] > computed["mlp_kept"]
    assert computed["mlp_weight_share"] == pytest.approx(2 / 3 * computed["mlp_candidates_kept"]
                                                         + 1 / 3 * computed["mlp_kept"])
    assert bench(**{"runtime.mlp_candidate_density": 0.6})["mlp_candidate_density"] == 0.6  # flag > bundle
