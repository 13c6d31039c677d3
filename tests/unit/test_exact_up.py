"""Exact-up MLP selection (runtime/apply.py, `mlp_up_weight`): neurons ranked by log|up| plus a
weighted predictor logit. Its limits (weight 0 = exact top-k of |up|, a huge weight = the predictor's
own top-k), the bytes it reads, and the combinations it refuses."""

from __future__ import annotations

import pytest
import torch

from dejavu.errors import DejavuError
from dejavu.predictor import topk_mask, units_for_density
from dejavu.runtime.apply import SparseRuntime

from helpers import load_tiny, random_ids, random_predictors


def _reference_masks(model, adapter, ids, rank_by):
    """Per layer, the top-half mask of `rank_by(layer index, up output, block input)` in a sparse forward
    whose down inputs are masked the same way (as the runtime does)."""
    masks, inputs, handles = {}, {}, []
    for l, layer in enumerate(adapter.decoder_layers()):  # noqa: E741
        def pre(module, args, kwargs, l=l):  # noqa: E741
            inputs[l] = args[0] if args else kwargs["hidden_states"]

        def up_hook(module, args, out, l=l):  # noqa: E741
            masks[l] = topk_mask(rank_by(l, adapter.up_output(out), inputs[l]), 0.5)

        def down_pre(module, args, l=l):  # noqa: E741
            return (args[0] * masks[l].to(args[0].dtype),) + tuple(args[1:])

        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True),
                    adapter.up_proj(layer).register_forward_hook(up_hook),
                    adapter.down_proj(layer).register_forward_pre_hook(down_pre)]
    try:
        logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, masks


@torch.no_grad()
@pytest.mark.parametrize("weight,model_type", [(0.0, "llama"), (0.4, "llama"), (1e6, "llama"), (0.4, "phi3")])
def test_exact_up_matches_a_hand_written_ranking(tiny_model_factory, weight, model_type):
    # phi3: up is the second half of one [gate | up] projection's output
    model, adapter = load_tiny(tiny_model_factory(model_type))
    preds = random_predictors(adapter)
    ids = random_ids(model)

    def rank_by(l, up, x):  # noqa: E741
        logits = preds.layers[l].mlp(x).float()
        return up.float().abs().clamp_min(1e-30).log() + weight * logits

    expected, masks = _reference_masks(model, adapter, ids, rank_by)
    with SparseRuntime(model, adapter, preds, mlp_density=0.5, head_density=1.0, mlp_up_weight=weight,
                       record=True) as rt:
        got = model(ids).logits
        summary = rt.stats.summary()
    torch.testing.assert_close(got, expected)
    for l, mask in masks.items():  # noqa: E741
        assert torch.equal(rt.masks[("mlp", l)].reshape(mask.shape), mask)
    # all of up, then gate and down for half the neurons
    assert summary["mlp_kept"] == pytest.approx(0.5, abs=0.01)
    assert summary["mlp_weight_share"] == pytest.approx(1 / 3 + 2 / 3 * summary["mlp_kept"])


@torch.no_grad()
def test_huge_weight_is_the_predictor_and_zero_weight_is_exact_up(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter)
    ids = random_ids(model)
    with SparseRuntime(model, adapter, preds, mlp_density=0.5, head_density=1.0):
        plain = model(ids).logits
    with SparseRuntime(model, adapter, preds, mlp_density=0.5, head_density=1.0, mlp_up_weight=1e9):
        huge = model(ids).logits
    torch.testing.assert_close(huge, plain)
    exact, _ = _reference_masks(model, adapter, ids, lambda layer, up, x: up.float().abs())
    with SparseRuntime(model, adapter, preds, mlp_density=0.5, head_density=1.0, mlp_up_weight=0.0):
        zero = model(ids).logits
    torch.testing.assert_close(zero, exact)


def test_refusals(tiny_llama, tiny_model_factory):
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter)
    with pytest.raises(DejavuError, match="mask mode"):
        SparseRuntime(model, adapter, preds, mode="gather", mlp_up_weight=0.4)
    with pytest.raises(DejavuError, match="choose one MLP rule"):
        SparseRuntime(model, adapter, preds, mlp_density=0.5, mlp_candidate_density=0.8, mlp_up_weight=0.4)
    with pytest.raises(DejavuError, match="selection 'predictor'"):
        SparseRuntime(model, adapter, None, selection="oracle", mlp_up_weight=0.4)
    with pytest.raises(DejavuError, match=">= 0"):
        SparseRuntime(model, adapter, preds, mlp_up_weight=-1.0)
    plain_model, plain_adapter = load_tiny(tiny_model_factory("opt"))
    with pytest.raises(DejavuError, match="gated MLP"):
        SparseRuntime(plain_model, plain_adapter, random_predictors(plain_adapter), mlp_up_weight=0.4)


# --- the decode loop (runtime/decode.py, CPU reference ops) -------------------------------------------
PROMPT, STEPS = 6, 4


def _loop(model, adapter, preds, weight, batch=1, steps=STEPS, **kw):
    from dejavu.runtime.decode import DecodeModel

    dm = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=PROMPT + steps + 2, mlp_up_weight=weight,
                     **kw)
    st = dm.new_state(batch)
    dm.prefill(st, random_ids(model, PROMPT, batch))
    ids, logits = [st.tokens[:, None].clone()], []
    for _ in range(steps):
        logits.append(dm.step(st, sparse=True).clone())
        ids.append(st.tokens[:, None].clone())
    return torch.cat(ids, 1), torch.stack(logits, 1), dm


@torch.no_grad()
@pytest.mark.parametrize("weight", [0.0, 0.4])
@pytest.mark.parametrize("heads", [1.0, 0.5])
def test_decode_loop_matches_reference_runtime(tiny_llama, weight, heads):
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, head_density=heads)
    gen, logits, _ = _loop(model, adapter, preds, weight)
    # Dense prompt, every generated token sparse: at batch 1 the loop's batch max is the reference's
    # per-token selection, so the two compute the same neurons and heads.
    ids = torch.cat([random_ids(model, PROMPT, 1), gen], 1)
    with SparseRuntime(model, adapter, preds, mlp_up_weight=weight) as rt:
        rt.token_mask = torch.arange(ids.shape[1] - 1)[None] >= PROMPT
        ref = model(ids[:, :-1]).logits[:, PROMPT:]
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert (ref - model(ids[:, :-1]).logits[:, PROMPT:]).abs().max() > 1e-3  # sparsity changed the output


@torch.no_grad()
def test_decode_loop_batch_selection_and_bytes(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter)
    # a huge weight ranks by the predictor alone: the plain loop's selection, up computed in full
    _, huge, dm = _loop(model, adapter, preds, 1e6, batch=3, steps=3)
    _, plain, dm_plain = _loop(model, adapter, preds, None, batch=3, steps=3)
    torch.testing.assert_close(huge, plain, atol=1e-5, rtol=1e-5)
    s = adapter.shape()
    k = units_for_density(0.5, s.intermediate_size)
    extra = adapter.num_layers * (s.intermediate_size - k) * s.hidden_size * 4  # the up rows not selected
    got, base = dm.step_bytes(3, 8, True), dm_plain.step_bytes(3, 8, True)
    assert got["weights"] - base["weights"] == extra and got["predictors"] == base["predictors"]
    assert dm.step_bytes(3, 8, False) == dm_plain.step_bytes(3, 8, False)
    # static selection (no predictor runs): ranked by |up| alone, still a valid step
    _, static, _ = _loop(model, adapter, preds, 0.4, batch=2, steps=2, select_impl="static")
    assert torch.isfinite(static).all()
    with pytest.raises(DejavuError, match="choose one MLP rule"):
        _loop(model, adapter, preds, 0.4, mlp_candidate_density=0.8)
    with pytest.raises(DejavuError, match=">= 0"):
        _loop(model, adapter, preds, float("nan"))
