"""Two-stage MLP selection in the decode loop (CPU reference ops) against the reference runtime's
(runtime/apply.py, mask mode, same predictors, `mlp_candidate_density`), its c == d limit, and its
byte accounting."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dejavu.errors import DejavuError
from dejavu.models.adapters import adapter_for
from dejavu.predictor import PredictorSet, units_for_density
from dejavu.runtime.apply import SparseRuntime
from dejavu.runtime.decode import DecodeModel

PROMPT, STEPS = 6, 4


def _setup(tiny_model_factory, mlp=0.5, heads=0.5):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"), dtype=torch.float32).eval()
    adapter = adapter_for(model)
    s = adapter.shape()
    preds = PredictorSet.random(adapter.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, 8, mlp, heads,
                                seed=3)
    return model, adapter, preds


def _decode(model, adapter, preds, cand, batch=1, steps=STEPS):
    dm = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=PROMPT + steps + 2,
                     mlp_candidate_density=cand)
    st = dm.new_state(batch)
    prompt = torch.randint(1, 500, (batch, PROMPT), generator=torch.Generator().manual_seed(0))
    dm.prefill(st, prompt)
    ids = [prompt, st.tokens[:, None].clone()]
    logits = []
    for _ in range(steps):
        logits.append(dm.step(st, sparse=True).clone())
        ids.append(st.tokens[:, None].clone())
    return torch.cat(ids, 1), torch.stack(logits, 1)


@torch.no_grad()
@pytest.mark.parametrize("cand", [0.75, 1.0])
def test_two_stage_step_matches_reference_runtime(tiny_model_factory, cand):
    model, adapter, preds = _setup(tiny_model_factory)
    ids, logits = _decode(model, adapter, preds, cand)
    # The reference with the prompt dense and every generated token sparse is, token by token, what
    # the loop computes (dense prefill, sparse steps with a KV cache); batch 1: the loop's batch max
    # is the reference's per-token selection.
    with SparseRuntime(model, adapter, preds, mode="mask", mlp_candidate_density=cand) as rt:
        rt.token_mask = torch.arange(ids.shape[1] - 1)[None] >= PROMPT
        ref = model(ids[:, :-1]).logits[:, PROMPT:]
        summary = rt.stats.summary()
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(ids[:, PROMPT + 1:], ref.argmax(-1))
    n = adapter.shape().intermediate_size
    assert summary["mlp_kept"] == pytest.approx(units_for_density(0.5, n) / n)
    with torch.no_grad():  # sparsity really changed the output
        assert (ref - model(ids[:, :-1]).logits[:, PROMPT:]).abs().max() > 1e-3


@torch.no_grad()
def test_candidates_equal_final_is_one_stage(tiny_model_factory):
    model, adapter, preds = _setup(tiny_model_factory)
    one = _decode(model, adapter, preds, None, batch=2, steps=3)
    two = _decode(model, adapter, preds, 0.5, batch=2, steps=3)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    wider = _decode(model, adapter, preds, 0.8, batch=2, steps=3)
    assert not torch.equal(one[1], wider[1])


def test_two_stage_bytes_and_checks(tiny_model_factory):
    model, adapter, preds = _setup(tiny_model_factory, heads=1.0)
    s = adapter.shape()
    one = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=8)
    two = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=8, mlp_candidate_density=0.75)
    k_c, k_f = units_for_density(0.75, s.intermediate_size), units_for_density(0.5, s.intermediate_size)
    # gate/up rows for the candidates, down^T rows for the final set; the same predictor bytes
    extra = adapter.num_layers * 2 * (k_c - k_f) * s.hidden_size * 4
    b1, b2 = one.step_bytes(1, 8, True), two.step_bytes(1, 8, True)
    assert b2["weights"] - b1["weights"] == extra and b2["predictors"] == b1["predictors"]
    assert two.step_bytes(1, 8, False) == one.step_bytes(1, 8, False)
    assert all(lw.mlp_pred.k == k_c and lw.mlp_final.k == k_f for lw in two.layers)
    assert all(lw.mlp_final is None for lw in one.layers)
    with pytest.raises(DejavuError, match="below"):
        DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=8, mlp_candidate_density=0.3)
    with pytest.raises(DejavuError, match="must be in"):
        DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=8, mlp_candidate_density=1.5)


def test_speed_report_two_stage(tiny_model_factory):
    from dejavu.runtime.speed import speed_report

    model, adapter, preds = _setup(tiny_model_factory, heads=1.0)
    kw = dict(device="cpu", dtype=torch.float32, batch_sizes=[1], decode_tokens=2, warmup=1, hf_eager_tokens=1)
    one = speed_report(model, adapter, preds, **kw)["batches"]["1"]
    report = speed_report(model, adapter, preds, mlp_candidate_density=0.75, **kw)
    two = report["batches"]["1"]
    assert report["mlp_candidate_density"] == 0.75
    s = adapter.shape()
    k_c, k_f = units_for_density(0.75, s.intermediate_size), units_for_density(0.5, s.intermediate_size)
    assert two["sparse_weight_bytes"] - one["sparse_weight_bytes"] == adapter.num_layers * 2 * (k_c - k_f) * s.hidden_size * 4
    assert two["sparse_ms_per_token"] > 0 and two["bound_speedup"] < one["bound_speedup"]
