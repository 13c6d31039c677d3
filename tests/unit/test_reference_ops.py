"""runtime.reference (the CPU fallback and test oracle) against plain dense formulas, and the Triton
kernels run through Triton's CPU interpreter when Triton is installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dejavu.runtime import reference as R

from helpers import run_interpreted


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "relu"])
def test_sparse_mlp_equals_masked_dense(batch, act):
    torch.manual_seed(batch)
    d, n = 48, 600
    gate, up, down = torch.randn(n, d), torch.randn(n, d), torch.randn(d, n)
    x = torch.randn(batch, d)
    idx = torch.randperm(n)[:170]
    code = R.activation_code(act)
    hidden = R.apply_activation(x @ gate.T, code) * (x @ up.T)
    mask = torch.zeros(n)
    mask[idx] = 1
    expected = (hidden * mask) @ down.T
    torch.testing.assert_close(R.sparse_mlp(x, gate, up, down.T.contiguous(), idx, code), expected,
                               atol=1e-4, rtol=1e-4)


def test_gather_ops_heads_units_tail_and_chunks():
    torch.manual_seed(0)
    d, heads, hd = 40, 6, 8
    w = torch.randn(heads * hd + 2 * hd, d)  # q rows of 6 heads, then a 2-row-group "kv" tail
    x = torch.randn(2, d)
    idx = torch.tensor([4, 1])
    out = R.gather_matvec(x, w, idx, hd, None, 0, 2 * hd)
    rows = torch.cat([torch.arange(4 * hd, 5 * hd), torch.arange(hd, 2 * hd), torch.arange(heads * hd, w.shape[0])])
    torch.testing.assert_close(out, x @ w[rows].T)
    # the predictors' first layer: every row as the tail, a bias per output (the op the decode loop calls)
    from dejavu.runtime.kernels import ops

    b = torch.randn(w.shape[0])
    everything = ops.gather_matvec(x, w, idx[:0], 1, None, 0, w.shape[0], b, ops.split_workspace("cpu", w.shape[0]))
    torch.testing.assert_close(everything, torch.addmm(b, x, w.T))
    # more rows than one CPU chunk: the chunked gather path
    big = torch.randn(3 * R.CPU_CHUNK_ROWS, d)
    sel = torch.randperm(big.shape[0])[:2 * R.CPU_CHUNK_ROWS + 5]
    torch.testing.assert_close(R.gather_matvec(x, big, sel), x @ big[sel].T, atol=1e-5, rtol=1e-5)
    acc = torch.ones(2, d)
    h = torch.randn(2, sel.numel())
    R.gather_vecmat_acc(h, big, sel, 1, acc)
    torch.testing.assert_close(acc, 1 + h @ big[sel], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_row_sums_split_into_bags_per_thread_add_up(batch, monkeypatch):
    # a sequence's rows are split into bags to occupy every CPU thread (uneven last bag here); the
    # partial sums must add up to the one-bag result
    monkeypatch.setattr(R, "MIN_BAG_BYTES", 8 * 24 * 4)  # 8 rows of fp32
    before = torch.get_num_threads()
    torch.set_num_threads(6)
    try:
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            w = torch.randn(200, 24).to(dtype)
            idx = torch.randperm(200)[:61]
            h = torch.randn(batch, idx.numel()).to(dtype)
            acc = torch.ones(batch, 24)
            R.gather_vecmat_acc(h, w, idx, 1, acc)
            torch.testing.assert_close(acc, 1 + h.double() @ w[idx].double(), atol=tol * 10, rtol=tol,
                                       check_dtype=False)
    finally:
        torch.set_num_threads(before)


def test_select_topk_is_batch_max_topk_sorted():
    scores = torch.tensor([[0.1, 5.0, -1.0, 2.0], [3.0, 0.0, -2.0, 1.0]])
    assert R.select_topk(scores, 2).tolist() == [0, 1]
    assert R.select_topk(scores[:1], 3).tolist() == [0, 1, 3]


def test_residual_norm_rope_attention():
    torch.manual_seed(0)
    h, delta, w = torch.randn(2, 16), torch.randn(2, 16), torch.randn(16)
    h_before, delta_before = h.clone(), delta.clone()
    out, h_out = torch.empty(2, 16), torch.empty(2, 16)
    R.residual_rmsnorm(h, delta, w, out, 1e-6, 0.0, True, h_out)
    torch.testing.assert_close(h, h_before)  # the block input stays for the predictors
    torch.testing.assert_close(h_out, h_before + delta_before)
    assert delta.abs().max() == 0
    xf = h_out / torch.sqrt(h_out.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out, w * xf)
    # attention over positions 0..pos for a subset of q heads, GQA groups of 2
    B, KV, T, hd = 1, 2, 10, 4
    kc, vc = torch.randn(B, KV, T, hd), torch.randn(B, KV, T, hd)
    q = torch.randn(B, 2, hd)
    heads = torch.tensor([3, 0])
    pos = torch.tensor([6])
    att = R.decode_attention(q, kc, vc, heads, 2, pos, 0.5)
    for j, head in enumerate(heads.tolist()):
        k, v = kc[0, head // 2, :7], vc[0, head // 2, :7]
        expected = F.softmax(q[0, j] @ k.T * 0.5, -1) @ v
        torch.testing.assert_close(att[0, j], expected)
    # every head (each KV head read once for its group); cache positions past pos are never read
    kc[:, :, 7:], vc[:, :, 7:] = float("nan"), float("nan")
    q4 = torch.randn(B, 4, hd)
    every = R.decode_attention(q4, kc, vc, torch.arange(4), 2, pos, 0.5)
    for head in range(4):
        k, v = kc[0, head // 2, :7], vc[0, head // 2, :7]
        torch.testing.assert_close(every[0, head], F.softmax(q4[0, head] @ k.T * 0.5, -1) @ v)


def test_attention_from_each_sequences_start_equals_attention_over_its_own_positions():
    # left padding: sequence b's positions before start[b] hold the padding's k/v (here large enough to take
    # all the weight if read), which must weigh nothing; the result equals attention over the sequence's
    # positions alone
    torch.manual_seed(0)
    B, KV, T, hd, group = 3, 2, 12, 4, 2
    kc, vc = torch.randn(B, KV, T, hd), torch.randn(B, KV, T, hd)
    start, pos = torch.tensor([0, 3, 8]), torch.tensor([9])
    for b, s in enumerate(start.tolist()):
        kc[b, :, :s], vc[b, :, :s] = 1e4, 1e4
    for heads in (torch.arange(4), torch.tensor([3, 0])):
        q = torch.randn(B, heads.numel(), hd)
        att = R.decode_attention(q, kc, vc, heads, group, pos, 0.5, start)
        for b, s in enumerate(start.tolist()):
            own = R.decode_attention(q[b:b + 1], kc[b:b + 1, :, s:], vc[b:b + 1, :, s:], heads, group, pos - s, 0.5)
            torch.testing.assert_close(att[b], own[0])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter mode)")
def test_triton_kernels_in_interpreter_match_reference():
    run_interpreted('''
        from dejavu.runtime import reference as R
        from dejavu.runtime.kernels import triton_kernels as T
        torch.manual_seed(0)
        def rel(a, b):
            return ((a.float() - b.float()).norm() / b.float().norm()).item()
        for B in (1, 3):
            for unit, act, gated, d in ((1, 1, True, 96), (1, 2, True, 128), (8, 0, False, 96)):
                rows = 64 * unit if unit > 1 else 200
                x, w, g = torch.randn(B, d), torch.randn(rows, d), torch.randn(rows, d)
                idx = torch.randperm(rows // unit)[: rows // unit // 3]
                gg = g if gated else None
                assert rel(T.gather_matvec(x, w, idx, unit, gg, act), R.gather_matvec(x, w, idx, unit, gg, act)) < 1e-5
                # d split over programs (partial sums, finished by the last program); twice, as the
                # partial sums must be left zeroed for the next call
                for cfg in ((16, 32, 4, 2), (16, 32, 4, 3), (16, 32, 4, 2)):
                    out = T.gather_matvec(x, w, idx, unit, gg, act, config=cfg)
                    assert rel(out, R.gather_matvec(x, w, idx, unit, gg, act)) < 1e-5
                if not gated:  # selected units must lie before the tail rows
                    head = idx[idx < (rows - 16) // unit]
                    assert rel(T.gather_matvec(x, w, head, unit, None, 0, 16), R.gather_matvec(x, w, head, unit, None, 0, 16)) < 1e-5
                    # w's bias, each read row's (the predictors' first layer, OPT's q/k/v and fc1): one
                    # program, split d, no split
                    bias = torch.randn(w.shape[0])
                    ref = R.gather_matvec(x, w, head, unit, None, act, 16, bias)
                    read = torch.cat([R.expand_rows(head, unit), torch.arange(w.shape[0] - 16, w.shape[0])])
                    assert rel(ref, R.gather_matvec(x, w, head, unit, None, 0, 16) + bias[read]) < 1e-6
                    for cfg in (None, (16, 32, 4, 2), (16, 32, 4, 1)):
                        assert rel(T.gather_matvec(x, w, head, unit, None, act, 16, config=cfg, bias=bias), ref) < 1e-5
                h = torch.randn(B, idx.numel() * unit)
                a1, a2 = torch.randn(B, d), None
                a2 = a1.clone()
                R.gather_vecmat_acc(h, w, idx, unit, a1)
                T.gather_vecmat_acc(h, w, idx, unit, a2)
                assert rel(a2, a1) < 1e-5
                if unit == 1:  # exact-up: each activation times its neuron's up on the way in
                    up = torch.randn(B, rows)
                    a1, a2 = torch.zeros(B, d), torch.zeros(B, d)
                    R.gather_vecmat_acc(h * up[:, idx], w, idx, 1, a1)
                    T.gather_vecmat_acc(h, w, idx, 1, a2, scale=up)
                    assert rel(a2, a1) < 1e-5
        # batch 1's one-launch MLP: whole rows a program, rows split evenly (or not) over programs
        for d, n, k, act in ((96, 200, 70, 1), (128, 64, 64, 2), (40, 90, 1, 3)):
            x, gate, up, down_t = torch.randn(1, d), torch.randn(n, d), torch.randn(n, d), torch.randn(n, d)
            idx = torch.randperm(n)[:k]
            ref = torch.full((1, d), 0.5)
            R.gather_vecmat_acc(R.gather_matvec(x, up, idx, 1, gate, act), down_t, idx, 1, ref)
            for cfg in (None, (1, 4, 7), (4, 4, 3), (2, 4, 1)):
                acc = torch.full((1, d), 0.5)
                T.sparse_mlp_gemv(x, gate, up, down_t, idx, act, acc, config=cfg)
                assert rel(acc, ref) < 1e-5
        for dt in (torch.float32, torch.bfloat16):
            for B, n, k in ((1, 3000, 1500), (3, 100, 10), (1, 50, 1)):
                s = torch.randn(B, n).to(dt)
                out, ref = T.select_topk(s, k), R.select_topk(s, k)
                m = s.float().amax(0)
                assert torch.equal(m[out].sort().values, m[ref].sort().values) and torch.equal(out, out.sort().values)
        h, dl, w = torch.randn(2, 100), torch.randn(2, 100), torch.randn(100)
        o1, o2, h1, h2 = (torch.empty(2, 100) for _ in range(4))
        R.residual_rmsnorm(h, dl.clone(), w, o1, 1e-6, 1.0, True, h1)
        T.residual_rmsnorm(h, dl.clone(), w, o2, 1e-6, 1.0, True, h2)
        assert rel(o2, o1) < 1e-5 and rel(h2, h1) < 1e-5
        B, H, KV, hd, Tm = 2, 4, 2, 16, 40
        ang = torch.randn(Tm, hd // 2)
        cos, sin = torch.cat([ang.cos()] * 2, 1).contiguous(), torch.cat([ang.sin()] * 2, 1).contiguous()
        qkv = torch.randn(B, (H + 2 * KV) * hd)
        kc, vc = torch.randn(B, KV, Tm, hd), torch.randn(B, KV, Tm, hd)
        kc2, vc2 = kc.clone(), vc.clone()
        pos, heads = torch.tensor([30]), torch.tensor([3, 0])
        q1 = qkv[:, :H * hd].view(B, H, hd)[:, heads].contiguous()
        q2 = q1.clone()
        k, v = qkv[:, H * hd:(H + KV) * hd].view(B, KV, hd), qkv[:, (H + KV) * hd:].view(B, KV, hd)
        R.rope_cache_write(q1, k, v, kc, vc, cos, sin, pos)
        T.rope_cache_write(q2, k, v, kc2, vc2, cos, sin, pos)
        assert rel(q2, q1) < 1e-5 and rel(kc2, kc) < 1e-5 and rel(vc2, vc) < 1e-5
        # q and k RMS-normalised per head before rope (Qwen3), straight and from the fp32 accumulator
        qn, kn = torch.rand(hd) + 0.5, torch.rand(hd) + 0.5
        q3, q4, kc3, vc3, kc4, vc4 = q1.clone(), q1.clone(), kc.clone(), vc.clone(), kc.clone(), vc.clone()
        R.rope_cache_write(q3, k, v, kc3, vc3, cos, sin, pos, qn, kn, 1e-6)
        T.rope_cache_write(q4, k, v, kc4, vc4, cos, sin, pos, qn, kn, 1e-6)
        assert rel(q4, q3) < 1e-5 and rel(kc4, kc3) < 1e-5 and rel(vc4, vc3) < 1e-5 and rel(q3, q1) > 1e-2
        acc = qkv.clone()
        qa, qb = torch.empty(B, H, hd), torch.empty(B, H, hd)
        kc5, vc5 = kc.clone(), vc.clone()
        qa.copy_(acc[:, :H * hd].view(B, H, hd))
        R.rope_cache_write(qa, k, v, kc5, vc5, cos, sin, pos, qn, kn, 1e-6)
        kc6, vc6 = kc.clone(), vc.clone()
        T.rope_cache_write_acc(acc, qb, kc6, vc6, cos, sin, pos, qn, kn, 1e-6)
        assert rel(qb, qa) < 1e-5 and rel(kc6, kc5) < 1e-5 and rel(vc6, vc5) < 1e-5 and acc.abs().max() == 0
        assert rel(T.decode_attention(q1, kc, vc, heads, 2, pos, 0.25), R.decode_attention(q1, kc, vc, heads, 2, pos, 0.25)) < 1e-5
        # split over the positions (flash-decoding): runs past the end, one position, one run a block
        for at in (0, 7, 39):
            where = torch.tensor([at])
            ref = R.decode_attention(q1, kc, vc, heads, 2, where, 0.25)
            for splits, block in ((2, 16), (3, 8), (7, 16), (5, 8)):
                got = T.decode_attention(q1, kc, vc, heads, 2, where, 0.25, splits=splits, block_t=block)
                assert rel(got, ref) < 1e-5, (at, splits, block)
            # one program a KV head for its selected q heads (GQA), whole or split: every head, the subset
            # above, and an unsorted subset that leaves KV head 0 unread
            qa = qkv[:, :H * hd].view(B, H, hd).contiguous()
            for sel in (torch.arange(H), heads, torch.tensor([3, 2])):
                qs = qa[:, sel].contiguous()
                ref = R.decode_attention(qs, kc, vc, sel, 2, where, 0.25)
                for splits in (1, 3):
                    got = T.decode_attention(qs, kc, vc, sel, 2, where, 0.25, splits=splits, block_t=16, grouped=True)
                    assert rel(got, ref) < 1e-5, (at, sel, splits)
        # each sequence from its own first position (left padding), every run layout, both kernels
        where = torch.tensor([33])
        for first in ((0, 5), (9, 33), (17, 1)):
            start = torch.tensor(first)
            for sel, grouped in ((heads, False), (torch.arange(H), True), (heads, True)):
                qs = qkv[:, :H * hd].view(B, H, hd)[:, sel].contiguous()
                ref = R.decode_attention(qs, kc, vc, sel, 2, where, 0.25, start)
                for splits, block in ((1, 16), (3, 8), (7, 16)):
                    got = T.decode_attention(qs, kc, vc, sel, 2, where, 0.25, splits=splits, block_t=block,
                                             grouped=grouped, start=start)
                    assert rel(got, ref) < 1e-5, (first, sel, grouped, splits, block)
        print("ok")
    ''')


def test_fused_cpu_gather_matches_chunked(monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(700, 64)
    x = torch.randn(2, 64)
    rows = torch.randperm(700)[:400].sort().values
    fused = R._fused_rows_dot(x, w, rows)
    if fused is None:
        pytest.skip("torch.compile unavailable here; the chunked path is used")
    torch.testing.assert_close(fused, x @ w[rows].T, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_programmatic_dependent_launch_only_on_cuda_tensors(monkeypatch):
    """PDL is a launch option of CUDA kernels (Hopper+): CPU tensors (the interpreter) never get it, and
    DEJAVU_PDL=0 / USE_PDL turns it off everywhere."""
    from dejavu.runtime.kernels import triton_kernels as T

    assert T._pdl(torch.zeros(1)) == {"PDL": False, "launch_pdl": False}
    monkeypatch.setattr(T, "USE_PDL", False)
    assert T._pdl(torch.zeros(1)) == {"PDL": False, "launch_pdl": False}
    code = "import os; os.environ['DEJAVU_PDL'] = '0'; from dejavu.runtime.kernels import triton_kernels as T; " \
           "print(T.USE_PDL)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


def test_cpu_calls_skip_the_dispatcher_but_the_registered_ops_remain():
    # eager CPU code runs an op's body directly; the registered op (what CUDA, CUDA graphs and
    # torch.compile use) gives the same result
    from dejavu.runtime.kernels import ops

    torch.manual_seed(0)
    h, delta, w = torch.randn(2, 16), torch.randn(2, 16), torch.randn(16)
    outs = []
    for fn in (ops.residual_rmsnorm, torch.ops.dejavu.residual_rmsnorm):
        out, h_out, d = torch.empty(2, 16), torch.empty(2, 16), delta.clone()
        fn(h, d, w, out, 1e-6, 0.0, True, h_out)
        outs.append((out, h_out, d))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b)
    assert ops.residual_rmsnorm.op is not None and ops.residual_rmsnorm.__name__ == "residual_rmsnorm"
