"""The greedy split of a layer's byte budget over its thresholded inputs (runtime/allocation.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dejavu.errors import DejavuError
from dejavu.models.adapters import adapter_for
from dejavu.runtime import allocation as A
from dejavu.runtime.apply import SparseRuntime
from dejavu.runtime.thresholds import Thresholds, thresholds_from_tensors, thresholds_to_tensors


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, adapter_for(model)


def _tokens(model, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_a_layer_run_alone_reproduces_the_model(tiny_model_factory, model_type):
    """The search runs each layer alone on its recorded input: that must be what the model computes."""
    model, adapter = _load(tiny_model_factory(model_type))
    layers = adapter.decoder_layers()
    inputs, calls = A._record_layer_calls(model, layers, _tokens(model, 64), window=32)
    assert inputs[0].shape[:2] == (2, 32)
    with torch.no_grad():
        for i in range(len(layers) - 1):
            assert torch.equal(A._layer_output(layers[i], inputs[i], calls[i]), inputs[i + 1])


def test_the_search_lowers_the_cheapest_input_per_byte():
    """With an error that grows with one input's dropped share only, every step lowers the others."""
    weights = {"attn_x": 3, "attn_o": 1, "x": 8, "h": 4}
    total = sum(weights.values())
    grid = [1.0, 0.75, 0.5, 0.25]

    def error(position):  # dropping x costs, the rest is free
        return 10.0 * position["x"]

    path = A._greedy_path(error, weights, total, grid, 0.25, lowest_target=0.65)
    assert all(s["x"] == 1.0 for s in path.shares)
    assert path.bytes_share == sorted(path.bytes_share, reverse=True)
    assert path.bytes_share[-1] <= 0.65 + 1e-9
    assert path.at(0.65)["h"] < 1.0
    # every byte counted: a step of one grid share of an input removes its weights x step
    final = path.shares[-1]
    assert sum(weights[k] * final[k] for k in weights) / total == pytest.approx(path.bytes_share[-1])
    with pytest.raises(DejavuError, match="asks for less"):
        path.at(0.1)


def test_allocation_keeps_the_budget_and_the_planned_shares(tiny_model_factory):
    model, adapter = _load(tiny_model_factory("llama"))
    tokens = _tokens(model, 256)
    alloc = A.greedy_allocation(model, adapter, tokens, 0.5, window=64, step=0.1, search_tokens=128,
                                search_window=64)
    weights = A.input_weights(adapter)
    total = sum(weights.values())
    t = alloc.thresholds(0.6)
    assert t.attention and t.layer_bytes == 0.6
    for i in range(len(adapter.decoder_layers())):
        planned = sum(weights[k] * t.layer_shares[k][i] for k in weights) / total
        assert 0.5 < planned <= 0.6 + 1e-9
    # on the calibration text itself the shares kept are about the planned ones (quantiles of its dense
    # inputs; the sparse model's inputs differ a little)
    with SparseRuntime(model, adapter, None, selection="dense", thresholds=t) as runtime, torch.no_grad():
        model(tokens.view(-1, 64))
        stats = runtime.stats.summary()
    for key, name in (("mlp_candidates_kept", "x"), ("mlp_kept", "h"), ("attn_input_kept", "attn_x"),
                      ("attn_o_kept", "attn_o")):
        assert stats[key] == pytest.approx(sum(t.layer_shares[name]) / len(t.x), abs=0.05), key


def test_keeping_everything_is_dense(tiny_model_factory):
    model, adapter = _load(tiny_model_factory("llama"))
    tokens = _tokens(model, 64)
    t = A.greedy_allocation(model, adapter, tokens, 1.0, window=32, search_tokens=32).thresholds(1.0)
    assert all(v == 1.0 for shares in t.layer_shares.values() for v in shares)
    ids = tokens.view(1, -1)
    with torch.no_grad():
        dense = model(ids).logits
        with SparseRuntime(model, adapter, None, selection="dense", thresholds=t):
            sparse = model(ids).logits
    assert torch.equal(dense, sparse)


def test_per_layer_shares_survive_a_bundle_round_trip():
    t = Thresholds(x=[0.125, 0.25], h=[0.375, 0.5], keep_x=0.75, keep_h=0.5, attn_x=[0.625, 0.75], attn_o=[1.5, 2.0],
                   keep_attn=0.85, layer_shares={"x": [0.8, 0.7], "h": [0.5, 0.5], "attn_x": [0.9, 0.8],
                                                 "attn_o": [1.0, 0.6]}, layer_bytes=0.6)
    back = thresholds_from_tensors(thresholds_to_tensors(t), t.describe(), 2, "bundle")
    assert back == t
    assert back.share("attn_o", 1) == 0.6
    broken = t.describe()
    broken["allocation"]["layer_shares"]["x"] = [0.8]
    with pytest.raises(DejavuError, match="layer_shares"):
        thresholds_from_tensors(thresholds_to_tensors(t), broken, 2, "bundle")


def test_bad_targets_are_refused(tiny_model_factory):
    model, adapter = _load(tiny_model_factory("llama"))
    with pytest.raises(DejavuError, match="target"):
        A.greedy_allocation(model, adapter, _tokens(model, 64), 0.0)
    with pytest.raises(DejavuError, match="at least one window"):
        A._record_layer_calls(model, adapter.decoder_layers(), _tokens(model, 16), window=32)
