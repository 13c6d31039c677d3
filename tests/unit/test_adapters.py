"""Every adapter on a tiny random model of its family: structure, shapes and the two hook facts
(down-projection input = neuron activations, o-projection input = concatenated head outputs)."""

from __future__ import annotations

import pytest
import torch

from dejavu.errors import DejavuError
from dejavu.models.adapters import adapter_for
from dejavu.models.identity import check_identity, model_identity
from dejavu.models.loading import load_model

from helpers import TINY_CONFIGS


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_adapter_structure_and_weights(tiny_model_factory, model_type):
    model, _, _ = load_model(str(tiny_model_factory(model_type)), device="cpu", dtype="float32")
    adapter = adapter_for(model)
    shape = adapter.shape()
    assert adapter.num_layers == model.config.num_hidden_layers
    layer = adapter.decoder_layers()[0]
    mlp = adapter.mlp_weights(layer)
    assert mlp.up.shape == (shape.intermediate_size, shape.hidden_size)
    assert mlp.down.shape == (shape.hidden_size, shape.intermediate_size)
    assert (mlp.gate is not None) == adapter.gated
    attn = adapter.attention_weights(layer)
    assert attn.q.shape == (shape.num_heads * shape.head_dim, shape.hidden_size)
    assert attn.k.shape == (shape.num_kv_heads * shape.head_dim, shape.hidden_size)
    assert attn.o.shape == (shape.hidden_size, shape.num_heads * shape.head_dim)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_hook_points_carry_neurons_and_heads(tiny_model_factory, model_type):
    """The down projection's input recomputed from canonical weights equals what the model feeds it."""
    model, _, _ = load_model(str(tiny_model_factory(model_type)), device="cpu", dtype="float32")
    adapter = adapter_for(model)
    shape = adapter.shape()
    layer = adapter.decoder_layers()[0]
    seen = {}
    mlp_mod = adapter.mlp_module(layer)
    h1 = adapter.down_proj(layer).register_forward_pre_hook(lambda m, a: seen.__setitem__("down_in", a[0]))
    h2 = adapter.o_proj(layer).register_forward_pre_hook(lambda m, a: seen.__setitem__("o_in", a[0]))
    # Recompute the MLP activation from the MLP's own input, captured at its first projection.
    h3 = adapter.up_proj(layer).register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp_in", a[0]))
    with torch.no_grad():
        model(torch.randint(0, 100, (2, 10)))
    for h in (h1, h2, h3):
        h.remove()
    assert seen["down_in"].shape[-1] == shape.intermediate_size
    assert seen["o_in"].shape[-1] == shape.num_heads * shape.head_dim
    w = adapter.mlp_weights(layer)
    x = seen["mlp_in"]
    up = torch.nn.functional.linear(x, w.up, w.up_bias)
    act = adapter.activation(layer)
    expected = act(torch.nn.functional.linear(x, w.gate, w.gate_bias)) * up if w.gate is not None else act(up)
    torch.testing.assert_close(seen["down_in"], expected)
    assert mlp_mod is not None


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("bloom", vocab_size=64, hidden_size=32, n_head=4, n_layer=1)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(DejavuError, match="no adapter for model type 'bloom'"):
        adapter_for(model)


def test_identity_refuses_other_weights(tiny_model_factory):
    a, _, _ = load_model(str(tiny_model_factory("llama")), device="cpu", dtype="float32")
    b, _, _ = load_model(str(tiny_model_factory("llama", seed=1)), device="cpu", dtype="float32")
    ident = model_identity(adapter_for(a), "tiny-a")
    check_identity(ident, adapter_for(a))
    # A bf16 copy of the same weights still matches.
    check_identity(ident, adapter_for(a.to(torch.bfloat16)))
    with pytest.raises(DejavuError, match="other weights"):
        check_identity(ident, adapter_for(b))
    c, _, _ = load_model(str(tiny_model_factory("llama", num_hidden_layers=2)), device="cpu", dtype="float32")
    with pytest.raises(DejavuError, match="num_layers=3"):
        check_identity(ident, adapter_for(c))
