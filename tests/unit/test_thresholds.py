"""TEAL-style MLP thresholds: calibration, the decode loop against hand-masked Hugging Face, and the
Triton kernels in the interpreter."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from dejavu.errors import DejavuError
from dejavu.models.adapters import adapter_for
from dejavu.runtime.decode import DecodeModel
from dejavu.runtime.thresholds import calibrate_mlp_thresholds

from helpers import run_interpreted


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, adapter_for(model)


def _masked_last_position(model, adapter, ids, thresholds):
    """HF logits of the last position with that position's MLP inputs and down inputs thresholded
    (earlier positions dense, as the decode loop's dense prefill leaves them)."""
    def keep_above(threshold):
        def hook(module, args):
            x = args[0].clone()
            last = x[:, -1]
            x[:, -1] = torch.where(last.abs() > threshold, last, torch.zeros_like(last))
            return (x,) + tuple(args[1:])
        return hook

    handles = []
    for i, layer in enumerate(adapter.decoder_layers()):
        for proj in (adapter.gate_proj(layer), adapter.up_proj(layer)):
            handles.append(proj.register_forward_pre_hook(keep_above(thresholds.x[i])))
        handles.append(adapter.down_proj(layer).register_forward_pre_hook(keep_above(thresholds.h[i])))
    try:
        with torch.no_grad():
            return model(ids).logits[:, -1]
    finally:
        for h in handles:
            h.remove()


def test_calibrated_thresholds_keep_the_asked_shares(tiny_model_factory):
    model, adapter = _load(tiny_model_factory("llama"))
    tokens = torch.randint(1, 500, (256,), generator=torch.Generator().manual_seed(0))
    t = calibrate_mlp_thresholds(model, adapter, tokens, 0.7, 0.4, window=64)
    assert len(t.x) == len(t.h) == adapter.num_layers and (t.keep_x, t.keep_h) == (0.7, 0.4)
    seen = {"x": [], "h": []}
    handles = []
    for i, layer in enumerate(adapter.decoder_layers()):
        handles.append(adapter.gate_proj(layer).register_forward_pre_hook(
            lambda m, a, i=i: seen["x"].append((a[0].abs() > t.x[i]).float().mean().item())))
        handles.append(adapter.down_proj(layer).register_forward_pre_hook(
            lambda m, a, i=i: seen["h"].append((a[0].abs() > t.h[i]).float().mean().item())))
    with torch.no_grad():
        for start in range(0, 256, 64):
            model(tokens[start:start + 64][None])
    for h in handles:
        h.remove()
    assert abs(sum(seen["x"]) / len(seen["x"]) - 0.7) < 0.01
    assert abs(sum(seen["h"]) / len(seen["h"]) - 0.4) < 0.01
    everything = calibrate_mlp_thresholds(model, adapter, tokens, 1.0, 1.0, window=64)
    assert set(everything.x) == set(everything.h) == {-1.0}


@pytest.mark.parametrize("batch", [1, 2])
def test_threshold_decode_step_matches_masked_hf(tiny_model_factory, batch):
    model, adapter = _load(tiny_model_factory("llama"))
    calib = torch.randint(1, 500, (256,), generator=torch.Generator().manual_seed(1))
    t = calibrate_mlp_thresholds(model, adapter, calib, 0.6, 0.5, window=64)
    prompt = torch.randint(1, 500, (batch, 6), generator=torch.Generator().manual_seed(2))
    dm = DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=12, mlp_thresholds=t)
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
    by = dm.step_bytes(batch, 8, True)["weights"] / dm.step_bytes(batch, 8, False)["weights"]
    assert by < 1


def test_thresholds_that_keep_everything_equal_dense(tiny_model_factory):
    model, adapter = _load(tiny_model_factory("llama"))
    t = calibrate_mlp_thresholds(model, adapter, torch.arange(1, 65), 1.0, 1.0, window=64)
    prompt = torch.randint(1, 500, (1, 5), generator=torch.Generator().manual_seed(3))
    dm = DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=10, mlp_thresholds=t)
    st = dm.new_state(1)
    dm.prefill(st, prompt)
    ids = torch.cat([prompt, st.tokens[:, None]], 1)
    with torch.no_grad():
        dense = model(ids).logits[:, -1]
    torch.testing.assert_close(dm.step(st, sparse=True), dense, atol=1e-4, rtol=1e-4)


def test_thresholds_refuse_a_second_mlp_rule_or_other_layer_count(tiny_model_factory):
    model, adapter = _load(tiny_model_factory("llama"))
    t = calibrate_mlp_thresholds(model, adapter, torch.arange(1, 65), 0.5, 0.5, window=64)
    with pytest.raises(DejavuError, match="one MLP rule"):
        DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=8, mlp_thresholds=t, mlp_up_weight=0.4)
    t.x, t.h = t.x[:1], t.h[:1]
    with pytest.raises(DejavuError, match="cover 1 layers"):
        DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=8, mlp_thresholds=t)


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
        print("ok")
    ''')
