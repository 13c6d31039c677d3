"""MLP score thresholds in the decode loop (runtime/decode.py): the selection's count lives on the device, so
a CUDA graph replays whatever a token keeps. On the CPU (reference ops) and in Triton's interpreter, against
the reference runtime's own rule (a unit is kept when its score is above the layer's threshold)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from dejavu.errors import DejavuError
from dejavu.models.adapters import adapter_for
from dejavu.predictor import PredictorSet, units_for_density
from dejavu.runtime.apply import SparseRuntime
from dejavu.runtime.decode import DecodeModel

from helpers import run_interpreted


def _model(tiny_model_factory, model_type: str):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(model_type), dtype=torch.float32).eval()
    return model, adapter_for(model)


def _predictors(adapter, mlp_density=0.5, head_density=0.5, seed=3) -> PredictorSet:
    s = adapter.shape()
    return PredictorSet.random(adapter.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, 8, mlp_density,
                               head_density, seed=seed)


def _median_thresholds(model, adapter, preds, ids) -> list[float]:
    """Each layer's median MLP score over a dense forward: thresholds that keep about half."""
    captured = {}
    with SparseRuntime(model, adapter, preds, selection="predictor", mlp_score_thresholds="batch") as rt:
        with torch.no_grad():
            model(input_ids=ids)
        captured = {l: float(v) for l, v in rt.batch_score_thresholds.items()}  # noqa: E741
    return [captured[l] for l in range(adapter.num_layers)]  # noqa: E741


def _reference_last_logits(model, adapter, preds, ids, prompt_len: int) -> torch.Tensor:
    """The reference runtime's logits at the last position, with the prompt's positions dense and every later
    one sparse: what the loop computes after a dense prefill and sparse steps."""
    with SparseRuntime(model, adapter, preds, selection="predictor",
                       mlp_score_thresholds=preds.mlp_score_thresholds) as rt:
        rt.token_mask = torch.arange(ids.shape[1])[None] >= prompt_len
        with torch.no_grad():
            return model(input_ids=ids).logits[:, -1]


@pytest.mark.parametrize("model_type", ["llama", "opt", "gpt_neox"])
def test_decode_steps_equal_the_reference_runtime(tiny_model_factory, model_type):
    """Greedy decode steps of the loop (prefill dense, steps sparse) give the logits of the reference runtime's
    hooks over the whole sequence (the prompt dense, every later token sparse) at each step; tokens keep
    different counts."""
    model, adapter = _model(tiny_model_factory, model_type)
    preds = _predictors(adapter)
    prompt = torch.randint(1, 500, (1, 6), generator=torch.Generator().manual_seed(0))
    preds.mlp_score_thresholds = _median_thresholds(model, adapter, preds, prompt)
    dm = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=16)
    st = dm.new_state(1)
    dm.prefill(st, prompt)
    ids = torch.cat([prompt, st.tokens[:, None]], 1)
    counts = []
    dm.reset_mlp_tally()
    for _ in range(3):
        logits = dm.step(st, sparse=True)
        counts.append([int(lw.mlp_pred.count) for lw in dm.layers])
        ref = _reference_last_logits(model, adapter, preds, ids, prompt.shape[1])
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
        ids = torch.cat([ids, st.tokens[:, None]], 1)
    flat = [c for step in counts for c in step]
    n = adapter.shape().intermediate_size
    assert len(set(flat)) > 1 and all(0 <= c <= n for c in flat)
    # the tally: the mean count the steps kept, which the bytes per step then count
    share = dm.mlp_share_read()
    assert share == pytest.approx(sum(flat) / len(flat) / n)
    dense_bytes = dm.step_bytes(1, 8, sparse=False)["weights"]
    assert dm.step_bytes(1, 8, sparse=True)["weights"] < dense_bytes


def test_a_batch_runs_the_top_k_and_fused_equals_classic(tiny_model_factory):
    """In a batch the union of the sequences' sets would be nearly every neuron: the batch's top-k of its max
    scores runs instead, as for top-k predictors, and the timing's tally is left alone."""
    model, adapter = _model(tiny_model_factory, "llama")
    preds = _predictors(adapter)
    prompt = torch.randint(1, 500, (2, 6), generator=torch.Generator().manual_seed(1))
    thresholds = _median_thresholds(model, adapter, preds, prompt)
    out = {}
    for impl in ("fused", "classic"):
        for rule in ("threshold", "topk"):
            preds.mlp_score_thresholds = thresholds if rule == "threshold" else None
            dm = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=12, select_impl=impl)
            st = dm.new_state(2)
            dm.prefill(st, prompt)
            out[impl, rule] = torch.stack([dm.step(st, sparse=True) for _ in range(2)])
            if rule == "threshold":
                assert dm.mlp_tally[:, 1].tolist() == [0] * adapter.num_layers
                assert dm.mlp_share_read() == pytest.approx(units_for_density(0.5, 96) / 96)
                # one sequence alone keeps what its scores put above the thresholds
                x = torch.randn(1, adapter.shape().hidden_size, generator=torch.Generator().manual_seed(2))
                dm.select_all(x)
                pred = dm.layers[1].mlp_pred
                with torch.no_grad():
                    expect = (preds.layers[1].mlp(x)[0] > pred.score_threshold).nonzero().flatten()
                assert torch.equal(pred.out[:int(pred.count)], expect)
        torch.testing.assert_close(out[impl, "threshold"], out[impl, "topk"], atol=0, rtol=0)
    torch.testing.assert_close(out["fused", "threshold"], out["classic", "threshold"], atol=1e-5, rtol=1e-5)


def test_the_batch_top_k_has_its_own_buffer(tiny_model_factory):
    """A batch-1 threshold step that keeps fewer than k units leaves the batch top-k's k indices valid (the
    'static' mode, which runs no predictor, reads them as they are)."""
    model, adapter = _model(tiny_model_factory, "llama")
    preds = _predictors(adapter)
    preds.mlp_score_thresholds = [1e9] * adapter.num_layers  # keeps nothing
    dm = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=12)
    before = [lw.mlp_pred.topk_out.clone() for lw in dm.layers]
    st = dm.new_state(1)
    dm.prefill(st, torch.randint(1, 500, (1, 4), generator=torch.Generator().manual_seed(6)))
    dm.step(st, sparse=True)
    assert all(int(lw.mlp_pred.count) == 0 for lw in dm.layers)
    for lw, k_before in zip(dm.layers, before, strict=True):
        idx, count = lw.mlp_pred.selection_for(2)
        assert count is None and torch.equal(idx, k_before) and idx.unique().numel() == lw.mlp_pred.k


def test_thresholds_above_every_score_or_below_it(tiny_model_factory):
    """Below every score: the MLP is dense (the step equals a dense one with the same head selection); above
    every score: no neuron at all, and the step still runs."""
    model, adapter = _model(tiny_model_factory, "llama")
    preds = _predictors(adapter, head_density=1.0)
    prompt = torch.randint(1, 500, (1, 5), generator=torch.Generator().manual_seed(4))
    results = {}
    for name, value in (("low", -1e9), ("high", 1e9)):
        preds.mlp_score_thresholds = [value] * adapter.num_layers
        dm = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=10)
        st = dm.new_state(1)
        dm.prefill(st, prompt)
        results[name] = dm.step(st, sparse=True)
        n = adapter.shape().intermediate_size
        assert all(int(lw.mlp_pred.count) == (n if name == "low" else 0) for lw in dm.layers)
    dm = DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=10)
    st = dm.new_state(1)
    dm.prefill(st, prompt)
    torch.testing.assert_close(results["low"], dm.step(st, sparse=False), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(results["high"]).all()


def test_a_density_that_rounds_to_every_neuron_still_applies_its_threshold(tiny_model_factory):
    """k rounds to n at density 0.999 of 96 neurons, but the reference runtime still applies the threshold:
    so does the loop (a count, not k)."""
    model, adapter = _model(tiny_model_factory, "llama")
    preds = _predictors(adapter, head_density=1.0)
    prompt = torch.randint(1, 500, (1, 5), generator=torch.Generator().manual_seed(5))
    medians = _median_thresholds(model, adapter, preds, prompt)
    preds.with_densities(0.999)
    preds.mlp_score_thresholds = medians
    dm = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=10)
    assert all(lw.mlp_pred is not None for lw in dm.layers)
    st = dm.new_state(1)
    dm.prefill(st, prompt)
    ids = torch.cat([prompt, st.tokens[:, None]], 1)  # the token the step computes
    logits = dm.step(st, sparse=True)
    ref = _reference_last_logits(model, adapter, preds, ids, prompt.shape[1])
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert all(int(lw.mlp_pred.count) < adapter.shape().intermediate_size for lw in dm.layers)


def test_the_tally_counts_the_timed_steps_only(tiny_model_factory):
    from dejavu.runtime.speed import decode_ms_per_token

    model, adapter = _model(tiny_model_factory, "llama")
    preds = _predictors(adapter)
    preds.mlp_score_thresholds = [0.0] * adapter.num_layers
    dm = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=40)
    decode_ms_per_token(dm, 1, True, steps=4, warmup=3, prompt_len=5)
    assert dm.mlp_tally[:, 1].tolist() == [4] * adapter.num_layers


def test_refusals(tiny_model_factory):
    model, adapter = _model(tiny_model_factory, "llama")
    preds = _predictors(adapter)
    preds.mlp_score_thresholds = [0.0] * adapter.num_layers
    with pytest.raises(DejavuError, match="take down thresholds as their second stage"):
        DecodeModel(model, adapter, preds, "cpu", torch.float32, 16, mlp_candidate_density=0.8)
    with pytest.raises(DejavuError, match="an MLP rule of their own"):
        DecodeModel(model, adapter, preds, "cpu", torch.float32, 16, mlp_up_weight=0.4)
    from dejavu.runtime.thresholds import Thresholds

    with pytest.raises(DejavuError, match="an MLP rule of their own"):
        DecodeModel(model, adapter, preds, "cpu", torch.float32, 16,
                    thresholds=Thresholds(x=[0.1] * 3, h=[0.1] * 3, keep_x=0.5, keep_h=0.5))
    preds.mlp_score_thresholds = [0.0, None, 0.0]
    with pytest.raises(DejavuError, match="layer 1 runs a sparse MLP .* score threshold is None"):
        DecodeModel(model, adapter, preds, "cpu", torch.float32, 16)
    preds.mlp_score_thresholds = [0.0] * 2
    with pytest.raises(DejavuError, match="2 MLP score thresholds for 3 layers"):
        DecodeModel(model, adapter, preds, "cpu", torch.float32, 16)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter mode)")
def test_count_kernels_in_interpreter():
    """The Triton selection above a threshold and the kernels that read a count from the device, against the
    reference ops on idx[:count]."""
    run_interpreted('''
        from dejavu.runtime.kernels import triton_kernels as T
        from dejavu.runtime import reference as R
        torch.manual_seed(0)
        for dt in (torch.bfloat16, torch.float32):
            for B, n, r, relu in ((1, 2100, 40, False), (3, 300, 32, True)):
                h = torch.randn(B, r).to(dt)
                w2, b2 = (torch.randn(n, r) * r ** -0.5).to(dt), (torch.randn(n) * 0.1).to(dt)
                scores = torch.nn.functional.linear(torch.relu(h) if relu else h, w2, b2)
                for thr in (0.0, 0.3, 1e9, -1e9, float(scores[0, 7])):  # (a score exactly at it: not kept)
                    expect = R.select_above(scores, thr)
                    out, count = torch.full((n,), -1, dtype=torch.long), torch.zeros(1, dtype=torch.int32)
                    tally, keys = torch.zeros(2, dtype=torch.int64), torch.empty(n, dtype=torch.int32)
                    T.select_above(scores, thr, out, count, tally, keys)
                    assert int(count) == expect.numel() and torch.equal(out[:int(count)], expect), (dt, B, n, thr)
                    assert tally.tolist() == [expect.numel(), 1]
                    if dt == torch.float32:  # fused scores: fp32 products in another order than F.linear
                        T.predict_above(h, w2, b2, relu, thr, out, count, tally, keys)
                        got = set(out[:int(count)].tolist())
                        assert len(got ^ set(expect.tolist())) <= 2
        # kernels that read the count: only idx[:count], whatever follows it
        d, n = 64, 200
        x1, x2 = torch.randn(1, d), torch.randn(3, d)
        gate, up, down_t = torch.randn(n, d) * 0.1, torch.randn(n, d) * 0.1, torch.randn(n, d) * 0.1
        idx = torch.randperm(n)
        for c in (0, 1, 37, n):
            count = torch.tensor([c], dtype=torch.int32)
            kept = idx[:c]
            for x in (x1, x2):
                ref = torch.zeros(x.shape[0], d)
                R.gather_vecmat_acc(R.gather_matvec(x, up, kept, 1, gate, 1), down_t, kept, 1, ref)
                h = T.gather_matvec(x, up, idx, 1, gate, 1, count=count)
                torch.testing.assert_close(h[:, :c], R.gather_matvec(x, up, kept, 1, gate, 1), atol=1e-4, rtol=1e-4)
                acc = torch.zeros(x.shape[0], d)
                T.gather_vecmat_acc(h, down_t, idx, 1, acc, count=count)
                torch.testing.assert_close(acc, ref, atol=1e-4, rtol=1e-4)
                if x.shape[0] == 1:
                    acc = torch.zeros(1, d)
                    T.sparse_mlp_gemv(x, gate, up, down_t, idx, 1, acc, count=count)
                    torch.testing.assert_close(acc, ref, atol=1e-4, rtol=1e-4)
        print("ok")
    ''', timeout=600)
