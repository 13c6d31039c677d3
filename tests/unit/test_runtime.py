"""The reference sparse runtime: exactness against dense, oracle semantics, gather == mask, decode
equivalence of the masked parallel forward, lookahead pairing and GQA head grouping."""

from __future__ import annotations

import pytest
import torch

from dejavu.errors import DejavuError
from dejavu.models.adapters import adapter_for
from dejavu.models.loading import load_model
from dejavu.predictor import PredictorSet, topk_mask
from dejavu.runtime.apply import SparseRuntime, skippable_kv_groups


def _load(path):
    model, tok, _ = load_model(str(path), device="cpu", dtype="float32")
    return model, adapter_for(model)


def _random_predictors(adapter, mlp_density=0.5, head_density=0.5, seed=0, **kw):
    s = adapter.shape()
    pset = PredictorSet.random(adapter.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, 8,
                               mlp_density, head_density, seed=seed)
    for key, value in kw.items():
        setattr(pset, key, value)
    return pset


def _ids(model, seq=24, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, seq), generator=g)


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["llama", "opt", "gpt2", "qwen3", "olmo2", "granite", "phi3"])
def test_density_one_equals_dense(tiny_model_factory, model_type):
    model, adapter = _load(tiny_model_factory(model_type))
    ids = _ids(model)
    dense = model(ids).logits
    for selection in ("predictor", "oracle", "dense"):
        preds = _random_predictors(adapter, 1.0, 1.0) if selection == "predictor" else None
        with SparseRuntime(model, adapter, preds, selection=selection, mlp_density=1.0, head_density=1.0):
            torch.testing.assert_close(model(ids).logits, dense)
    with SparseRuntime(model, adapter, _random_predictors(adapter), mode="gather"):
        pass  # removing the hooks restores the model
    torch.testing.assert_close(model(ids).logits, dense)


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])
def test_oracle_equals_dense_with_the_same_units_masked_by_hand(tiny_model_factory, model_type):
    model, adapter = _load(tiny_model_factory(model_type))
    ids = _ids(model)
    s = adapter.shape()
    with SparseRuntime(model, adapter, selection="oracle", mlp_density=0.5, head_density=0.5, record=True) as rt:
        oracle = model(ids).logits
        masks = dict(rt.masks)
    assert masks[("mlp", 0)].sum(-1).eq(s.intermediate_size // 2).all()
    assert masks[("attn", 0)].sum(-1).eq(s.num_heads // 2).all()

    # With heads dense, layer 0's MLP sees the dense activations: its oracle is their true top-k.
    with SparseRuntime(model, adapter, selection="oracle", mlp_density=0.5, head_density=1.0, record=True) as rt:
        model(ids)
        mlp0 = rt.masks[("mlp", 0)]
    seen = {}
    layer0 = adapter.decoder_layers()[0]
    h = adapter.down_proj(layer0).register_forward_pre_hook(lambda m, a: seen.setdefault("act", a[0]))
    dense = model(ids).logits
    h.remove()
    top = seen["act"].abs().topk(s.intermediate_size // 2, dim=-1).indices
    assert torch.equal(mlp0, torch.zeros_like(mlp0).scatter_(-1, top, True))

    # By hand: plain hooks zeroing exactly the recorded units reproduce the oracle's logits.
    handles = []
    for i, layer in enumerate(adapter.decoder_layers()):
        m, a = masks[("mlp", i)], masks[("attn", i)]
        handles.append(adapter.down_proj(layer).register_forward_pre_hook(
            lambda mod, args, m=m: (args[0] * m,)))
        handles.append(adapter.o_proj(layer).register_forward_pre_hook(
            lambda mod, args, a=a: ((args[0].unflatten(-1, (s.num_heads, s.head_dim)) * a[..., None]).flatten(-2),)))
    by_hand = model(ids).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(oracle, by_hand)
    assert not torch.allclose(oracle, dense)


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["llama", "opt", "gpt2", "gemma2", "phi3"])
def test_gather_equals_mask(tiny_model_factory, model_type):
    model, adapter = _load(tiny_model_factory(model_type))
    ids = _ids(model)
    preds = _random_predictors(adapter, 0.5, 0.5)
    with SparseRuntime(model, adapter, preds, mode="mask"):
        masked = model(ids).logits
    with SparseRuntime(model, adapter, preds, mode="gather") as rt:
        gathered = model(ids).logits
        assert rt.stats.mlp_kept == pytest.approx(0.5, abs=0.02)
    torch.testing.assert_close(gathered, masked)
    assert not torch.allclose(masked, model(ids).logits)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["mask", "gather"])
def test_parallel_forward_equals_token_by_token_sparse_decode(tiny_llama, mode):
    model, adapter = _load(tiny_llama)
    ids = _ids(model, seq=12, batch=1)
    preds = _random_predictors(adapter, 0.5, 0.5, mlp_pairing="lookahead")
    with SparseRuntime(model, adapter, preds, mode=mode) as rt:
        parallel = model(ids).logits
        past, steps = None, []
        for t in range(ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits)
        assert rt.enabled
    torch.testing.assert_close(torch.cat(steps, 1), parallel, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_dense_prefill_token_mask(tiny_llama):
    model, adapter = _load(tiny_llama)
    ids = _ids(model, seq=10, batch=1)
    preds = _random_predictors(adapter)
    dense = model(ids).logits
    with SparseRuntime(model, adapter, preds) as rt:
        rt.token_mask = torch.zeros(1, 10, dtype=torch.bool)
        rt.token_mask[:, 6:] = True
        mixed = model(ids).logits
    # Tokens before the first sparse one see only dense computation.
    torch.testing.assert_close(mixed[:, :6], dense[:, :6])
    assert not torch.allclose(mixed[:, 6:], dense[:, 6:])


@torch.no_grad()
def test_lookahead_reads_previous_block_input(tiny_llama):
    model, adapter = _load(tiny_llama)
    ids = _ids(model, seq=8, batch=1)
    preds = _random_predictors(adapter, 0.5, 0.5, head_pairing="lookahead", mlp_pairing="current")
    inputs = {}
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
               for i, layer in enumerate(adapter.decoder_layers())]
    with SparseRuntime(model, adapter, preds, record=True) as rt:
        model(ids)
        masks = dict(rt.masks)
    for h in handles:
        h.remove()
    for i in range(adapter.num_layers):
        src = inputs[max(i - 1, 0)]
        assert torch.equal(masks[("attn", i)], topk_mask(preds.layers[i].attn(src), 0.5))
        assert torch.equal(masks[("mlp", i)], topk_mask(preds.layers[i].mlp(inputs[i]), 0.5))


def test_gqa_head_grouping():
    # 4 query heads on 2 KV heads: heads 0,1 share KV 0 and heads 2,3 share KV 1 (HF repeat_kv).
    mask = torch.tensor([[True, False, False, False], [False, False, True, True], [False, False, False, False]])
    assert skippable_kv_groups(mask, 2).tolist() == [[False, True], [True, False], [True, True]]
    assert skippable_kv_groups(mask, 4).tolist() == (~mask).tolist()
    with pytest.raises(DejavuError):
        skippable_kv_groups(mask, 3)


@torch.no_grad()
def test_gqa_skippable_groups_reported(tiny_llama):
    model, adapter = _load(tiny_llama)
    preds = _random_predictors(adapter, 1.0, 0.25)  # one head of four: one of the two KV groups idle
    with SparseRuntime(model, adapter, preds, record=True) as rt:
        model(_ids(model))
        assert rt.stats.head_kept == pytest.approx(0.25)
        assert rt.stats.kv_groups_skippable == pytest.approx(0.5)


def test_runtime_rejects_bad_requests(tiny_llama):
    model, adapter = _load(tiny_llama)
    with pytest.raises(DejavuError, match="needs a bundle"):
        SparseRuntime(model, adapter, None, selection="predictor")
    with pytest.raises(DejavuError, match="oracle"):
        SparseRuntime(model, adapter, None, selection="oracle", mode="gather")


@torch.no_grad()
def test_layers_left_dense_count_in_the_shares_computed(tiny_llama):
    # a layer at density 1.0 installs no hook, but it computes every neuron and head: the reported shares
    # (and the bytes compare shows) are means over all layers
    model, adapter = _load(tiny_llama)
    preds = _random_predictors(adapter, 0.5, 0.5)
    preds.layers[0].mlp_density = 1.0
    preds.layers[1].head_density = 1.0
    with SparseRuntime(model, adapter, preds) as rt:
        model(_ids(model))
        kept = rt.stats.summary()
    layers = adapter.num_layers
    assert kept["mlp_kept"] == pytest.approx((1.0 + 0.5 * (layers - 1)) / layers, abs=0.02)
    assert kept["head_kept"] == pytest.approx((1.0 + 0.5 * (layers - 1)) / layers, abs=0.02)
