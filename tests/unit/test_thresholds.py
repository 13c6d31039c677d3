"""TEAL-style thresholds (MLP, and attention's inputs): calibration, the decode loop against hand-masked Hugging Face, and the
Triton kernels in the interpreter."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from dejavu.errors import DejavuError
from dejavu.models.adapters import adapter_for
from dejavu.runtime.decode import DecodeModel
from dejavu.runtime.thresholds import calibrate_thresholds

from helpers import run_interpreted


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, adapter_for(model)


def _masked_last_position(model, adapter, ids, thresholds):
    """HF logits of the last position with that position's MLP inputs and down inputs thresholded, and
    with attention thresholds its attention input and o input (earlier positions dense, as the decode
    loop's dense prefill leaves them)."""
    def last_above(x, threshold):
        x = x.clone()
        last = x[:, -1]
        x[:, -1] = torch.where(last.abs() > threshold, last, torch.zeros_like(last))
        return x

    def keep_above(threshold):
        def hook(module, args):
            return (last_above(args[0], threshold),) + tuple(args[1:])
        return hook

    def attention_input_above(threshold):
        def hook(module, args, kwargs):
            return args, {**kwargs, "hidden_states": last_above(kwargs["hidden_states"], threshold)}
        return hook

    handles = []
    for i, layer in enumerate(adapter.decoder_layers()):
        for proj in adapter.mlp_input_projections(layer):
            handles.append(proj.register_forward_pre_hook(keep_above(thresholds.x[i])))
        handles.append(adapter.down_proj(layer).register_forward_pre_hook(keep_above(thresholds.h[i])))
        if thresholds.attention:
            handles.append(adapter.attention_module(layer).register_forward_pre_hook(
                attention_input_above(thresholds.attn_x[i]), with_kwargs=True))
            handles.append(adapter.o_proj(layer).register_forward_pre_hook(keep_above(thresholds.attn_o[i])))
    try:
        with torch.no_grad():
            return model(ids).logits[:, -1]
    finally:
        for h in handles:
            h.remove()


def _forward_in_windows(model, tokens, handles, window: int = 64) -> None:
    """The dense forward the calibration ran (same windows), with hooks that measure it; removes them."""
    try:
        with torch.no_grad():
            for start in range(0, tokens.numel(), window):
                model(tokens[start:start + window][None])
    finally:
        for h in handles:
            h.remove()


def test_calibrated_thresholds_keep_the_asked_shares(tiny_model_factory):
    model, adapter = _load(tiny_model_factory("llama"))
    tokens = torch.randint(1, 500, (256,), generator=torch.Generator().manual_seed(0))
    t = calibrate_thresholds(model, adapter, tokens, 0.7, 0.4, window=64)
    assert len(t.x) == len(t.h) == adapter.num_layers and (t.keep_x, t.keep_h) == (0.7, 0.4)
    seen = {"x": [], "h": []}
    handles = []
    for i, layer in enumerate(adapter.decoder_layers()):
        handles.append(adapter.gate_proj(layer).register_forward_pre_hook(
            lambda m, a, i=i: seen["x"].append((a[0].abs() > t.x[i]).float().mean().item())))
        handles.append(adapter.down_proj(layer).register_forward_pre_hook(
            lambda m, a, i=i: seen["h"].append((a[0].abs() > t.h[i]).float().mean().item())))
    _forward_in_windows(model, tokens, handles)
    assert abs(sum(seen["x"]) / len(seen["x"]) - 0.7) < 0.01
    assert abs(sum(seen["h"]) / len(seen["h"]) - 0.4) < 0.01
    everything = calibrate_thresholds(model, adapter, tokens, 1.0, 1.0, window=64)
    assert set(everything.x) == set(everything.h) == {-1.0} and not everything.attention


def test_calibrated_attention_thresholds_keep_the_asked_share(tiny_model_factory):
    model, adapter = _load(tiny_model_factory("llama"))
    tokens = torch.randint(1, 500, (256,), generator=torch.Generator().manual_seed(0))
    t = calibrate_thresholds(model, adapter, tokens, 1.0, 1.0, window=64, keep_attn=0.6)
    assert t.attention and len(t.attn_x) == len(t.attn_o) == adapter.num_layers and t.keep_attn == 0.6
    seen = {"attn_x": [], "attn_o": []}
    handles = []
    for i, layer in enumerate(adapter.decoder_layers()):
        handles.append(adapter.attention_module(layer).register_forward_pre_hook(
            lambda m, a, kw, i=i: seen["attn_x"].append((kw["hidden_states"].abs() > t.attn_x[i]).float().mean().item()),
            with_kwargs=True))
        handles.append(adapter.o_proj(layer).register_forward_pre_hook(
            lambda m, a, i=i: seen["attn_o"].append((a[0].abs() > t.attn_o[i]).float().mean().item())))
    _forward_in_windows(model, tokens, handles)
    for key in seen:
        assert abs(sum(seen[key]) / len(seen[key]) - 0.6) < 0.01, key


@pytest.mark.parametrize("model_type,batch,keep_attn", [("llama", 1, None), ("llama", 2, None), ("llama", 1, 0.6),
                                                      ("llama", 2, 0.5), ("qwen2", 2, 0.6), ("phi3", 2, 0.6),
                                                      ("qwen3", 1, 0.6), ("gemma2", 2, 0.6), ("gemma3_text", 1, 0.6),
                                                      ("granite", 2, 0.6), ("olmo2", 2, 0.6), ("olmo2", 1, None)])
def test_threshold_decode_step_matches_masked_hf(tiny_model_factory, model_type, batch, keep_attn):
    # qwen2: q/k/v biases, added after the thresholded projection (its own path in the decode loop)
    model, adapter = _load(tiny_model_factory(model_type))
    calib = torch.randint(1, 500, (256,), generator=torch.Generator().manual_seed(1))
    t = calibrate_thresholds(model, adapter, calib, 0.6, 0.5, window=64, keep_attn=keep_attn)
    prompt = torch.randint(1, 500, (batch, 6), generator=torch.Generator().manual_seed(2))
    dm = DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=12, thresholds=t)
    st = dm.new_state(batch)
    dm.prefill(st, prompt)
    ids = torch.cat([prompt, st.tokens[:, None]], 1)
    logits = dm.step(st, sparse=True)
    # each sequence drops its own small entries: the same as masking each one alone
    for b in range(batch):
        want = _masked_last_position(model, adapter, ids[b:b + 1], t)
        torch.testing.assert_close(logits[b:b + 1], want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        dense = model(ids).logits[:, -1]
    assert (logits - dense).abs().max() > 1e-3  # the thresholds did drop something
    # a dense step of the same model (gate/up stored transposed) is still the dense model
    st2 = dm.new_state(batch)
    dm.prefill(st2, prompt)
    torch.testing.assert_close(dm.step(st2, sparse=False), dense, atol=1e-4, rtol=1e-4)
    sparse_bytes, dense_bytes = dm.step_bytes(batch, 8, True)["weights"], dm.step_bytes(batch, 8, False)["weights"]
    assert sparse_bytes < dense_bytes
    if keep_attn is not None:  # attention's share of the bytes is counted at its keep share too
        s = adapter.shape()
        qkv_o = ((s.num_heads + 2 * s.num_kv_heads) * s.head_dim * s.hidden_size + s.num_heads * s.head_dim * s.hidden_size)
        mlp_only = DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=12,
                               thresholds=calibrate_thresholds(model, adapter, calib, 0.6, 0.5, window=64))
        saved = (mlp_only.step_bytes(batch, 8, True)["weights"] - sparse_bytes) / 4  # fp32
        assert abs(saved - (1 - keep_attn) * qkv_o * adapter.num_layers) < 0.02 * qkv_o * adapter.num_layers


def test_thresholds_that_keep_everything_equal_dense(tiny_model_factory):
    model, adapter = _load(tiny_model_factory("llama"))
    t = calibrate_thresholds(model, adapter, torch.arange(1, 65), 1.0, 1.0, window=64)
    prompt = torch.randint(1, 500, (1, 5), generator=torch.Generator().manual_seed(3))
    dm = DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=10, thresholds=t)
    st = dm.new_state(1)
    dm.prefill(st, prompt)
    ids = torch.cat([prompt, st.tokens[:, None]], 1)
    with torch.no_grad():
        dense = model(ids).logits[:, -1]
    torch.testing.assert_close(dm.step(st, sparse=True), dense, atol=1e-4, rtol=1e-4)


def test_thresholds_refuse_a_second_mlp_rule_or_other_layer_count(tiny_model_factory):
    model, adapter = _load(tiny_model_factory("llama"))
    t = calibrate_thresholds(model, adapter, torch.arange(1, 65), 0.5, 0.5, window=64)
    with pytest.raises(DejavuError, match="one MLP rule"):
        DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=8, thresholds=t, mlp_up_weight=0.4)
    t.x, t.h = t.x[:1], t.h[:1]
    with pytest.raises(DejavuError, match="cover 1 layers"):
        DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=8, thresholds=t)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter mode)")
def test_threshold_kernels_in_interpreter_match_reference():
    run_interpreted('''
        from dejavu.runtime import reference as R
        from dejavu.runtime.kernels import triton_kernels as T
        torch.manual_seed(0)
        for B, rows, n in ((1, 100, 300), (3, 64, 40)):
            h, wt = torch.randn(B, rows), torch.randn(rows, n)
            for threshold in (-1.0, 0.0, 0.8, 10.0):
                a1, a2 = torch.full((B, n), 0.5), torch.full((B, n), 0.5)
                R.threshold_vecmat_acc(h, wt, threshold, a1)
                T.threshold_vecmat_acc(h, wt, threshold, a2)
                assert torch.allclose(a1, a2, atol=1e-4), (B, threshold)
            acc = torch.randn(B, 2 * n)
            out, want = torch.empty(B, n), (torch.nn.functional.silu(acc[:, :n]) * acc[:, n:])
            T.act_mul_acc(acc, 1, out)
            assert torch.allclose(out, want, atol=1e-6) and acc.abs().max() == 0
            acc, out = torch.randn(B, n), torch.empty(B, n)
            want = acc.clone()
            T.drain_acc(acc, out)
            assert torch.equal(out, want) and acc.abs().max() == 0
        # drain + rope + cache write in one launch, against the CPU op (drain, then rope_cache_write)
        from dejavu.runtime.kernels import ops
        for B, nq, nkv, hd, dt in ((1, 4, 2, 16, torch.float32), (2, 4, 4, 8, torch.bfloat16)):
            acc = torch.randn(B, (nq + 2 * nkv) * hd)
            # rope tables repeat their first half, as Hugging Face builds them (the kernel reads one half)
            cos, sin = torch.randn(10, hd // 2).repeat(1, 2), torch.randn(10, hd // 2).repeat(1, 2)
            pos = torch.tensor([3])
            outs = []
            for fn in (T.rope_cache_write_acc, ops.rope_cache_write_acc):
                a, q = acc.clone(), torch.empty(B, nq, hd, dtype=dt)
                kc, vc = torch.zeros(B, nkv, 10, hd, dtype=dt), torch.zeros(B, nkv, 10, hd, dtype=dt)
                fn(a, q, kc, vc, cos, sin, pos)
                assert a.abs().max() == 0
                outs.append((q, kc, vc))
            for got, want in zip(*outs):
                # bf16: the interpreter truncates where the GPU rounds to nearest, so up to 2 ulp apart
                assert torch.allclose(got.float(), want.float(), atol=1e-2, rtol=3e-2), (B, dt)
        print("ok")
    ''')


@pytest.mark.parametrize("model_type", ["opt", "gpt2", "gpt_neox", "gemma", "gemma2", "mistral", "phi3", "olmo2"])
def test_attention_thresholds_in_every_family(tiny_model_factory, model_type):
    """Mask mode reaches each family's attention input and o input through the adapter (GPT-2 and OPT
    pass hidden_states positionally, Llama-style families by keyword)."""
    from dejavu.runtime.apply import SparseRuntime

    model, adapter = _load(tiny_model_factory(model_type))
    tokens = torch.randint(1, 200, (128,), generator=torch.Generator().manual_seed(4))
    t = calibrate_thresholds(model, adapter, tokens, 1.0, 1.0, window=64, keep_attn=0.6)
    with torch.no_grad():
        dense = model(tokens[None, :32]).logits
        with SparseRuntime(model, adapter, None, selection="dense", thresholds=t) as runtime:
            sparse = model(tokens[None, :32]).logits
            kept = runtime.stats.summary()
    assert abs(kept["attn_input_kept"] - 0.6) < 0.1 and 0.4 < kept["attn_o_kept"] < 0.85
    assert (sparse - dense).abs().max() > 1e-4  # attention alone changed the output


def test_greedy_thresholds_in_the_decode_step(tiny_model_factory):
    """Per-layer shares from the greedy search (runtime/allocation.py): the step equals hand-masked HF, and its
    bytes follow each layer's own shares."""
    from dejavu.runtime.allocation import greedy_allocation, input_weights

    model, adapter = _load(tiny_model_factory("llama"))
    calib = torch.randint(1, 500, (256,), generator=torch.Generator().manual_seed(1))
    t = greedy_allocation(model, adapter, calib, 0.5, window=64, step=0.1, search_tokens=128,
                          search_window=64).thresholds(0.5)
    prompt = torch.randint(1, 500, (2, 6), generator=torch.Generator().manual_seed(2))
    dm = DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=12, thresholds=t)
    st = dm.new_state(2)
    dm.prefill(st, prompt)
    ids = torch.cat([prompt, st.tokens[:, None]], 1)
    logits = dm.step(st, sparse=True)
    for b in range(2):
        torch.testing.assert_close(logits[b:b + 1], _masked_last_position(model, adapter, ids[b:b + 1], t),
                                   atol=1e-4, rtol=1e-4)
    weights = input_weights(adapter)
    planned = sum(weights[k] * t.share(k, i) for k in weights for i in range(adapter.num_layers))
    # rows are whole: each layer's count rounds its share of rows
    assert dm.step_bytes(1, 8, True)["weights"] / 4 == pytest.approx(planned, rel=0.02)
