"""Exact-up MLP selection (runtime/apply.py, `mlp_up_weight`): neurons ranked by log|up| plus a
weighted predictor logit. Its limits (weight 0 = exact top-k of |up|, a huge weight = the predictor's
own top-k), the bytes it reads, and the combinations it refuses."""

from __future__ import annotations

import pytest
import torch

from dejavu.errors import DejavuError
from dejavu.predictor import topk_mask
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
            masks[l] = topk_mask(rank_by(l, out, inputs[l]), 0.5)

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
@pytest.mark.parametrize("weight", [0.0, 0.4, 1e6])
def test_exact_up_matches_a_hand_written_ranking(tiny_llama, weight):
    model, adapter = load_tiny(tiny_llama)
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
