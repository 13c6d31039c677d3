"""Skipping the k/v of unselected KV groups (lazy_kv_fill): whatever the selection history, the cache
entries a selected head reads equal the dense path's, in the reference op, the Triton kernel (through
Triton's CPU interpreter) and the decode loop."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dejavu.errors import DejavuError
from dejavu.runtime import reference as R
from dejavu.runtime.decode import DecodeModel

from helpers import load_tiny, random_ids, random_predictors, rope_tables, run_interpreted


def _dense_kv(xs, w, bias, num_q, num_kv, hd, cos, sin):
    """k (rotated) and v of every group for inputs xs [B, T, d] at positions 0..T-1: [B, KV, T, hd]."""
    qkv = xs @ w.T + (0 if bias is None else bias)
    k = qkv[..., num_q * hd:(num_q + num_kv) * hd].view(*xs.shape[:2], num_kv, hd)
    v = qkv[..., (num_q + num_kv) * hd:].view(*xs.shape[:2], num_kv, hd)
    k = R._rotate(k, cos[:xs.shape[1], None], sin[:xs.shape[1], None])
    return k.transpose(1, 2), v.transpose(1, 2)


@pytest.mark.parametrize("group,with_bias", [(1, False), (3, True)])
def test_reference_fill_matches_dense_kv_for_every_read_group(group, with_bias):
    torch.manual_seed(group)
    B, d, hd, num_kv, T, plen = 2, 24, 8, 4, 20, 3
    num_q = num_kv * group
    w = torch.randn((num_q + 2 * num_kv) * hd, d)
    bias = torch.randn(w.shape[0]) if with_bias else None
    xs = torch.randn(B, T, d)
    cos, sin = rope_tables(T, hd)
    k_ref, v_ref = _dense_kv(xs, w, bias, num_q, num_kv, hd, cos, sin)
    kc, vc = torch.zeros(B, num_kv, T, hd), torch.zeros(B, num_kv, T, hd)
    kc[:, :, :plen], vc[:, :, :plen] = k_ref[:, :, :plen], v_ref[:, :, :plen]  # the dense prefill
    xcache = torch.zeros(B, T, d)
    last = torch.full((2, num_kv), plen - 1, dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    for p in range(plen, T):
        heads = torch.randperm(num_q, generator=gen)[:max(1, num_q // 3)].sort().values
        R.lazy_kv_fill(xs[:, p], xcache, w, bias, heads, group, kc, vc, last, cos, sin, torch.tensor([p]))
        for g in (heads // group).unique().tolist():
            torch.testing.assert_close(kc[:, g, :p + 1], k_ref[:, g, :p + 1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(vc[:, g, :p + 1], v_ref[:, g, :p + 1], atol=1e-4, rtol=1e-4)
            assert last[(p + 1) % 2, g] == p
    # groups never read since some step keep a gap (that is the saving): at least one was skipped
    assert (last[T % 2] < T - 1).any()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter mode)")
def test_lazy_kv_kernel_in_interpreter_matches_reference():
    run_interpreted('''
        from dejavu.runtime import reference as R
        from dejavu.runtime.kernels import triton_kernels as T
        from helpers import rope_tables
        torch.manual_seed(0)
        for B, group, with_bias, T_len, hd in ((1, 1, False, 40, 32), (3, 2, True, 24, 64), (2, 2, False, 12, 16)):
            d, num_kv, plen = 40, 3, 2
            num_q = num_kv * group
            w = torch.randn((num_q + 2 * num_kv) * hd, d)
            bias = torch.randn(w.shape[0]) if with_bias else None
            cos, sin = rope_tables(T_len, hd)
            state = {}
            for impl in ("ref", "triton"):
                kc, vc = torch.zeros(B, num_kv, T_len, hd), torch.zeros(B, num_kv, T_len, hd)
                xcache = torch.zeros(B, T_len, d)
                last = torch.full((2, num_kv), plen - 1, dtype=torch.int32)
                gen = torch.Generator().manual_seed(1)
                xgen = torch.Generator().manual_seed(2)
                for p in range(plen, T_len):
                    # some steps select nothing of a group for long runs (gaps longer than a row block)
                    k = 1 if p < T_len - 2 else num_q
                    heads = torch.randperm(num_q, generator=gen)[:k].sort().values
                    x = torch.randn(B, d, generator=xgen)
                    fn = R.lazy_kv_fill if impl == "ref" else T.lazy_kv_fill
                    fn(x, xcache, w, bias, heads, group, kc, vc, last, cos, sin, torch.tensor([p]))
                state[impl] = (kc, vc, xcache, last)
            for a, b in zip(state["ref"], state["triton"]):
                assert torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-4), (B, group, (a - b).abs().max())
        print("ok")
    ''')


# --- the decode loop (runtime/decode.py, CPU reference ops) -------------------------------------------
def _decode(model, adapter, preds, skip_kv, batch, steps, prompt=5, dense_at=()):
    dm = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=prompt + steps + 1, skip_kv=skip_kv)
    st = dm.new_state(batch)
    dm.prefill(st, random_ids(model, prompt, batch))
    logits = [dm.step(st, sparse=i not in dense_at).clone() for i in range(steps)]
    return torch.stack(logits, 1), dm, st


@torch.no_grad()
@pytest.mark.parametrize("model_type,kv_heads", [("llama", 4), ("llama", 2), ("qwen2", 2)])
def test_decode_loop_with_skipped_kv_equals_computing_every_group(tiny_model_factory, model_type, kv_heads):
    model, adapter = load_tiny(tiny_model_factory(model_type, num_key_value_heads=kv_heads))
    preds = random_predictors(adapter, head_density=0.25, seed=3)  # one head of four: groups skip often
    # a dense step in between: it computes every group, and later fills must still find its inputs
    plain, _, _ = _decode(model, adapter, preds, False, batch=2, steps=10, dense_at=(4,))
    lazy, dm, st = _decode(model, adapter, preds, True, batch=2, steps=10, dense_at=(4,))
    torch.testing.assert_close(lazy, plain, atol=1e-5, rtol=1e-5)
    # groups were skipped (the saving), and some gap was filled later, else the test proves little
    assert (st.kv_last[:, st.pos.item() % 2] < st.pos.item() - 1).any()
    plain_dm = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=8)
    assert dm.step_bytes(2, 16, sparse=True)["weights"] < plain_dm.step_bytes(2, 16, sparse=True)["weights"]


@torch.no_grad()
def test_dense_only_state_refuses_a_sparse_step(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    dm = DecodeModel(model, adapter, random_predictors(adapter, head_density=0.5), "cpu", torch.float32, max_len=8,
                     skip_kv=True)
    st = dm.new_state(1, dense_only=True)
    assert st.xcache is None
    dm.prefill(st, random_ids(model, 3, 1))
    dm.step(st, sparse=False)
    with pytest.raises(DejavuError, match="dense_only"):
        dm.step(st, sparse=True)


def test_models_that_normalise_q_and_k_per_head_refuse_skip_kv(tiny_model_factory):
    # the lazy fill splits a head's dimensions over programs and cannot normalise it: refused, not wrong
    model, adapter = load_tiny(tiny_model_factory("qwen3"))
    with pytest.raises(DejavuError, match="skip_kv is not supported for qwen3"):
        DecodeModel(model, adapter, random_predictors(adapter), "cpu", torch.float32, max_len=8, skip_kv=True)
