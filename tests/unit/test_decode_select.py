"""The fused predictor path: grouped first layers + the wide top-k kernels (CPU reference and Triton's
CPU interpreter), against the unfused path and the exact selection contract."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from dejavu.models.adapters import adapter_for
from dejavu.predictor import PredictorSet
from dejavu.runtime.decode import DecodeModel

from helpers import run_interpreted


@pytest.mark.parametrize("pairing", ["current", "lookahead"])
def test_fused_and_classic_selection_agree_on_cpu(tiny_model_factory, pairing):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"), dtype=torch.float32).eval()
    adapter = adapter_for(model)
    s = adapter.shape()
    preds = PredictorSet.random(adapter.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, 8, 0.3, 0.5, seed=2)
    preds.mlp_pairing = pairing
    for lp in preds.layers:
        lp.mlp.activation = "relu"  # one relu predictor in each group
    logits = {}
    for impl in ("fused", "classic"):
        dm = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=12, select_impl=impl)
        # one group per source layer: the MLP predictor and a head predictor share each input
        assert all(len(g.members) >= 1 for g in dm.pred_groups.values())
        assert sum(len(g.members) for g in dm.pred_groups.values()) == 2 * adapter.num_layers
        st = dm.new_state(2)
        dm.prefill(st, torch.randint(1, 500, (2, 6), generator=torch.Generator().manual_seed(0)))
        logits[impl] = torch.stack([dm.step(st, sparse=True) for _ in range(2)])
        x = torch.randn(2, s.hidden_size, generator=torch.Generator().manual_seed(1))
        sel = dm.select_all(x)
        assert len(sel) == 2 * adapter.num_layers
        logits[impl, "sel"] = [t.clone() for t in sel]
    torch.testing.assert_close(logits["fused"], logits["classic"], atol=1e-5, rtol=1e-5)
    for a, b in zip(logits["fused", "sel"], logits["classic", "sel"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter mode)")
def test_wide_topk_kernels_in_interpreter():
    run_interpreted('''
        from dejavu.runtime.kernels import triton_kernels as T
        torch.manual_seed(0)
        def exact(scores, k):
            best = scores.float().amax(0) + 0.0
            return torch.sort(-best, stable=True).indices[:k].sort().values
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            for B, n, k in ((1, 2100, 1000), (3, 1500, 7), (2, 100, 10), (1, 50, 50), (1, 1030, 1)):
                ws = T.TopkWorkspace(n, dt, "cpu")
                for trial in range(3):
                    s = torch.randn(B, n)
                    if trial == 1:
                        s = (s * 2).round() / 2  # ties, with -0 and +0
                    if trial == 2:
                        s = s.abs() * 1e-3 - 5e-4
                    s = s.to(dt)
                    out = T.select_topk_wide(s, k, ws=ws)
                    assert torch.equal(out, exact(s, k)), (dt, B, n, k, trial)
                    assert ws.hist[:256].abs().sum() == 0
        for dt in (torch.bfloat16, torch.float32):
            for B, n, r, k, relu in ((1, 700, 40, 300, False), (3, 300, 32, 50, True), (2, 33, 16, 5, True)):
                h = torch.randn(B, r + 5).to(dt)[:, 5:]
                w2, b2 = (torch.randn(n, r) * r ** -0.5).to(dt), (torch.randn(n) * 0.1).to(dt)
                out = T.predict_select(h, w2, b2, relu, k)
                hh = torch.relu(h) if relu else h
                best = (hh.double() @ w2.double().T + b2.double()).amax(0)
                ref = exact(best[None], k)
                tol = 1e-6 if dt == torch.float32 else 2e-2
                assert (best[out].sort().values - best[ref].sort().values).abs().max() <= tol * best.abs().max()
                assert out.unique().numel() == k and torch.equal(out, out.sort().values)
        from dejavu.runtime import reference as R
        for dt in (torch.bfloat16, torch.float32):  # exact-up: fp32 log|up| + w * logit, keyed in fp32
            for B, n, k, w in ((1, 2100, 1000, 0.4), (3, 1500, 7, 1.0), (2, 100, 10, 0.0), (2, 300, 150, None)):
                up = torch.randn(B, n).to(dt)
                up[0, 3] = 0
                logits = None if w is None else torch.randn(B, n).to(dt)
                best = R.exact_up_scores(up, logits, w or 0.0).amax(0)
                ref = R.select_topk(best[None], k)
                for key_dt, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):  # fp16 keys: rounded scores
                    ws = T.TopkWorkspace(n, key_dt, "cpu")
                    for _ in range(2):
                        out = T.select_exact_up(up, logits, w or 0.0, k, ws=ws)
                        assert (best[out].sort().values - best[ref].sort().values).abs().max() <= tol * best.abs().max()
                        assert out.unique().numel() == k and torch.equal(out, out.sort().values)
        print("ok")
    ''')


def test_static_selection_runs_without_predictors(tiny_model_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"), dtype=torch.float32).eval()
    adapter = adapter_for(model)
    s = adapter.shape()
    preds = PredictorSet.random(adapter.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, 8, 0.5, 0.5)
    dm = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=10, select_impl="static")
    before = [t.clone() for t in dm.select_all(torch.randn(1, s.hidden_size))]
    st = dm.new_state(1)
    dm.prefill(st, torch.randint(1, 500, (1, 4)))
    assert torch.isfinite(dm.step(st, sparse=True)).all()
    members = [m[2] for g in dm.pred_groups.values() for m in g.members]
    for sel, pred in zip(before, members, strict=True):
        assert sel.numel() == pred.k and torch.equal(sel, sel.sort().values) and sel.unique().numel() == pred.k
    with pytest.raises(ValueError):
        DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=10, select_impl="nope")


@pytest.mark.parametrize("order,joins_per_layer", [("heads-first", 1), ("consumption", 2)])
def test_heads_first_order_joins_the_side_stream_once_a_layer(tiny_model_factory, monkeypatch, order,
                                                              joins_per_layer):
    """With the next layer's heads queued before this layer's MLP, the MLP's join covers both: the
    step waits on one side-stream event a layer (the first layer's heads aside), not two."""
    from dejavu.runtime import decode

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"), dtype=torch.float32).eval()
    adapter = adapter_for(model)
    s = adapter.shape()
    preds = PredictorSet.random(adapter.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, 8, 0.5, 0.5)
    dm = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=10, join_order=order)
    waited = []

    class Stream:
        def wait_event(self, event):
            waited.append(event)

    monkeypatch.setattr(decode.torch.cuda, "current_stream", lambda *a: Stream())
    heads, mlp = {}, {}
    x = torch.randn(1, s.hidden_size)
    for layer in range(adapter.num_layers):
        dm.select(x, layer, heads, mlp)
        for entry in (heads.get(layer), mlp.get(layer)):
            if entry is not None:
                entry.event = entry.event or object()  # as if recorded on a side stream
        decode.DecodeModel._take(heads, layer)
        decode.DecodeModel._take(mlp, layer)
    layers = adapter.num_layers
    # heads lookahead: layer 0 reads its own input, so group 0 holds heads 0 and 1; its MLP join covers
    # heads 0 and 1 only in heads-first order, where heads 0 is then joined first on its own
    expected = layers + 1 if joins_per_layer == 1 else 2 * layers
    assert len(waited) == expected
    assert len(set(map(id, waited))) == len(waited)
