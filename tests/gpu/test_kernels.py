"""Triton kernels vs runtime.reference, and the graph-captured decode step vs eager (CUDA only)."""

from __future__ import annotations

import pytest
import torch

from dejavu.runtime import reference as R

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("d,n,unit,act,gated", [(4096, 11008, 1, 1, True), (576, 1536, 1, 2, True),
                                                 (1000, 700, 1, 3, False), (4096, 32, 128, 0, False),
                                                 (896, 14, 64, 0, False)])
def test_gather_kernels_match_reference(dtype, batch, d, n, unit, act, gated):
    from dejavu.runtime.kernels import triton_kernels as T

    torch.manual_seed(batch + d)
    dev = "cuda"
    w = torch.randn(n * unit, d, device=dev, dtype=dtype) * d ** -0.5
    g = torch.randn(n * unit, d, device=dev, dtype=dtype) * d ** -0.5 if gated else None
    wt = torch.randn(n * unit, d, device=dev, dtype=dtype)
    x = torch.randn(batch, d, device=dev, dtype=dtype)
    for density in (0.1, 0.5, 1.0):
        k = max(1, int(n * density))
        idx = torch.randperm(n, device=dev)[:k]
        out = T.gather_matvec(x, w, idx, unit, g, act)
        ref = R.gather_matvec(x.double(), w.double(), idx, unit, None if g is None else g.double(), act)
        assert torch.isfinite(out).all() and _rel(out, ref) < 1e-2
        if not gated:  # the selected units lie before the tail rows (q heads, then all of k and v)
            tail = unit * max(1, n // 4)
            head = idx[idx < (n * unit - tail) // unit]
            out = T.gather_matvec(x, w, head, unit, None, act, tail)
            ref = R.gather_matvec(x.double(), w.double(), head, unit, None, act, tail)
            assert out.shape == (batch, head.numel() * unit + tail) and _rel(out, ref) < 1e-2
            bias = torch.randn(w.shape[0], device=dev, dtype=dtype)  # w's: each read row's is added
            out = T.gather_matvec(x, w, head, unit, None, act, tail, bias=bias)
            ref = R.gather_matvec(x.double(), w.double(), head, unit, None, act, tail, bias.double())
            assert _rel(out, ref) < 1e-2
        h = torch.randn(batch, k * unit, device=dev, dtype=dtype)
        acc = torch.full((batch, d), 0.5, device=dev)
        T.gather_vecmat_acc(h, wt, idx, unit, acc)
        ref_acc = torch.full((batch, d), 0.5, device=dev, dtype=torch.float64)
        R.gather_vecmat_acc(h.double(), wt.double(), idx, unit, ref_acc)
        assert _rel(acc, ref_acc) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d,n,act", [(4096, 11008, 1), (576, 1536, 2), (1000, 700, 3), (8192, 2000, 4)])
def test_one_launch_mlp_matches_reference(dtype, d, n, act):
    from dejavu.runtime.kernels import ops
    from dejavu.runtime.kernels import triton_kernels as T

    torch.manual_seed(d)
    dev = "cuda"
    gate, up = (torch.randn(n, d, device=dev, dtype=dtype) * d ** -0.5 for _ in range(2))
    down_t = torch.randn(n, d, device=dev, dtype=dtype) * n ** -0.5
    x = torch.randn(1, d, device=dev, dtype=dtype)
    for k in (1, max(1, n // 10), n // 2, n):
        idx = torch.randperm(n, device=dev)[:k]
        ref = torch.full((1, d), 0.5, device=dev, dtype=torch.float64)
        R.gather_vecmat_acc(R.gather_matvec(x.double(), up.double(), idx, 1, gate.double(), act), down_t.double(),
                            idx, 1, ref)
        acc = torch.full((1, d), 0.5, device=dev)
        T.sparse_mlp_gemv(x, gate, up, down_t, idx, act, acc)
        assert torch.isfinite(acc).all() and _rel(acc, ref) < 1e-2
        # the op the decode loop calls: this kernel at batch 1, the two gather kernels at batch 3
        for batch in (1, 3):
            xb = torch.randn(batch, d, device=dev, dtype=dtype)
            acc = torch.full((batch, d), 0.5, device=dev)  # not 0: relu may leave a single neuron's output 0
            ops.sparse_mlp_acc(xb, gate, up, down_t, idx, act, acc)
            want = 0.5 + R.sparse_mlp(xb.double(), gate.double(), up.double(), down_t.double(), idx, act)
            assert _rel(acc, want) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_rope_attention_match_reference(dtype):
    from dejavu.runtime.kernels import triton_kernels as T

    torch.manual_seed(0)
    dev, B, H, KV, hd, Tm, d = "cuda", 3, 8, 2, 128, 300, 4096
    h = torch.randn(B, d, device=dev, dtype=dtype)
    delta = torch.randn(B, d, device=dev)
    w = torch.randn(d, device=dev, dtype=dtype)
    for offset in (0.0, 1.0):
        h1, h2, d1, d2 = h.clone(), h.clone(), delta.clone(), delta.clone()
        o1, o2 = torch.empty_like(h), torch.empty_like(h)
        R.residual_rmsnorm(h1, d1, w, o1, 1e-5, offset, True)
        T.residual_rmsnorm(h2, d2, w, o2, 1e-5, offset, True)
        assert _rel(o2, o1) < 1e-2 and _rel(h2, h1) < 1e-2 and d2.abs().max() == 0
    ang = torch.randn(Tm, hd // 2, device=dev)
    cos, sin = torch.cat([ang.cos()] * 2, 1).contiguous(), torch.cat([ang.sin()] * 2, 1).contiguous()
    qkv = torch.randn(B, (H + 2 * KV) * hd, device=dev, dtype=dtype)
    kc = torch.randn(B, KV, Tm, hd, device=dev, dtype=dtype)
    vc = torch.randn_like(kc)
    kc2, vc2 = kc.clone(), vc.clone()
    pos = torch.tensor([250], device=dev)
    heads = torch.tensor([7, 0, 3], device=dev)
    q1 = qkv[:, :H * hd].view(B, H, hd)[:, heads].contiguous()
    q2 = q1.clone()
    k = qkv[:, H * hd:(H + KV) * hd].view(B, KV, hd)
    v = qkv[:, (H + KV) * hd:].view(B, KV, hd)
    # q and k RMS-normalised per head first (Qwen3), rounded as HF rounds them
    qn, kn = (torch.rand(hd, device=dev, dtype=dtype) + 0.5 for _ in range(2))
    q3, q4, kc3, vc3, kc4, vc4 = q1.clone(), q1.clone(), kc.clone(), vc.clone(), kc.clone(), vc.clone()
    R.rope_cache_write(q3, k, v, kc3, vc3, cos, sin, pos, qn, kn, 1e-6)
    T.rope_cache_write(q4, k, v, kc4, vc4, cos, sin, pos, qn, kn, 1e-6)
    assert _rel(q4, q3) < 1e-2 and _rel(kc4, kc3) < 1e-2 and _rel(vc4, vc3) < 1e-2 and _rel(q3, q1) > 0.1
    R.rope_cache_write(q1, k, v, kc, vc, cos, sin, pos)
    T.rope_cache_write(q2, k, v, kc2, vc2, cos, sin, pos)
    assert _rel(q2, q1) < 1e-2 and _rel(kc2, kc) < 1e-2 and _rel(vc2, vc) < 1e-2
    a1 = R.decode_attention(q1, kc, vc, heads, H // KV, pos, hd ** -0.5)
    a2 = T.decode_attention(q1, kc, vc, heads, H // KV, pos, hd ** -0.5)
    assert _rel(a2, a1) < 1e-2
    # positions split over programs (flash-decoding), including runs past the end and one position
    for at in (0, 1, 63, 250, Tm - 1):
        where = torch.tensor([at], device=dev)
        ref = R.decode_attention(q1, kc, vc, heads, H // KV, where, hd ** -0.5)
        for splits, block in ((None, None), (1, 64), (2, 32), (5, 16), (32, 64)):
            got = T.decode_attention(q1, kc, vc, heads, H // KV, where, hd ** -0.5, splits=splits, block_t=block)
            assert _rel(got, ref) < 1e-2, (at, splits, block)
        # one program a KV head for its selected q heads (GQA) against one program a q head: every head,
        # the subset above, one that leaves KV heads unread
        qa = qkv[:, :H * hd].view(B, H, hd).contiguous()
        for sel in (torch.arange(H, device=dev), heads, torch.tensor([5, 4], device=dev)):
            qs = qa[:, sel].contiguous()
            ref = R.decode_attention(qs, kc, vc, sel, H // KV, where, hd ** -0.5)
            for splits, grouped in ((None, None), (1, True), (7, True), (None, False)):
                got = T.decode_attention(qs, kc, vc, sel, H // KV, where, hd ** -0.5, splits=splits, grouped=grouped)
                assert _rel(got, ref) < 1e-2, (at, sel.tolist(), splits, grouped)
    gu = torch.randn(B, 2 * 700, device=dev, dtype=dtype)
    ref = (torch.nn.functional.silu(gu[:, :700].float()) * gu[:, 700:].float())
    assert _rel(T.act_mul(gu, 1), ref) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_output_norms_and_missing_input_norms_match_reference(dtype):
    # Gemma 2/3 and OLMo 2 normalise a block's output before the residual add; OLMo 2 has no input norm
    from dejavu.runtime.kernels import triton_kernels as T

    torch.manual_seed(0)
    dev, B, d = "cuda", 3, 2304
    h = torch.randn(B, d, device=dev, dtype=dtype)
    delta = torch.randn(B, d, device=dev) * 40
    w, post = (torch.randn(d, device=dev, dtype=dtype) for _ in range(2))
    bias, norm_bias = (torch.randn(d, device=dev, dtype=dtype) for _ in range(2))
    cases = [(w, post, 1.0, None, None, False, False), (None, post, 0.0, None, None, False, False),
             (None, None, 0.0, None, None, False, False), (w, None, 0.0, None, None, False, False),
             # OPT: LayerNorm with a bias, and the block's output bias
             (w, None, 0.0, bias, norm_bias, True, False), (w, None, 0.0, None, None, True, False),
             # GPT-NeoX's parallel block: the norm reads the block input, the residual gets the sum
             (w, None, 0.0, bias, norm_bias, True, True)]
    # three rounds: without a barrier before the kernel zeroes delta, a warp's zeros could overtake another
    # warp's load of the same elements; it showed in the second round in about one process in three
    for weight, delta_norm, offset, delta_bias, nb, centered, norm_input in cases * 3:
        h1, h2, d1, d2 = h.clone(), h.clone(), delta.clone(), delta.clone()
        o1, o2, n1, n2 = (torch.empty_like(h) for _ in range(4))
        R.residual_rmsnorm(h1, d1, weight, o1, 1e-6, offset, True, n1, delta_norm, delta_bias, nb, centered,
                           norm_input)
        T.residual_rmsnorm(h2, d2, weight, o2, 1e-6, offset, True, n2, delta_norm, delta_bias, nb, centered,
                           norm_input)
        assert _rel(o2, o1) < 1e-2 and _rel(n2, n1) < 1e-2 and d2.abs().max() == 0, (weight is None, delta_norm is None,
                                                                                 centered)
        if weight is None:
            assert torch.equal(o2, n2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_attention_in_a_sliding_window_with_capped_scores_matches_reference(dtype, kv_heads):
    # positions before the window hold k/v large enough to take all the weight if they were read
    from dejavu.runtime.kernels import triton_kernels as T

    torch.manual_seed(0)
    dev, B, H, hd, Tm = "cuda", 3, 8, 128, 700
    kc = torch.randn(B, kv_heads, Tm, hd, device=dev, dtype=dtype)
    vc = torch.randn_like(kc)
    start = torch.tensor([0, 3, 400], device=dev)
    for window in (1, 64, 100, 4096):
        for at in (0, 63, 450, Tm - 1):
            kw, vw = kc.clone(), vc.clone()
            kw[:, :, :max(0, at + 1 - window)] = 30.0
            vw[:, :, :max(0, at + 1 - window)] = 30.0
            where = torch.tensor([at], device=dev)
            for sel in (torch.arange(H, device=dev), torch.tensor([6, 1, 2], device=dev)):
                q = torch.randn(B, sel.numel(), hd, device=dev, dtype=dtype) * 4
                for softcap, st in ((0.0, None), (50.0, None), (0.0, start), (20.0, start)):
                    if st is not None and at < 400:
                        continue  # a sequence's position is never before its start
                    ref = R.decode_attention(q, kw, vw, sel, H // kv_heads, where, hd ** -0.5, st, window, softcap)
                    for splits, grouped in ((None, None), (1, None), (7, True), (None, False)):
                        got = T.decode_attention(q, kw, vw, sel, H // kv_heads, where, hd ** -0.5, splits=splits,
                                                 grouped=grouped, start=st, window=window, softcap=softcap)
                        assert _rel(got, ref) < 1e-2, (window, at, sel.tolist(), softcap, splits, grouped)
    # the cap changes the result (scores large enough to reach it)
    q = torch.randn(B, H, hd, device=dev, dtype=dtype) * 8
    sel, where = torch.arange(H, device=dev), torch.tensor([300], device=dev)
    assert _rel(T.decode_attention(q, kc, vc, sel, H // kv_heads, where, hd ** -0.5, softcap=5.0),
                T.decode_attention(q, kc, vc, sel, H // kv_heads, where, hd ** -0.5)) > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_attention_from_each_sequences_start_matches_reference(dtype, kv_heads):
    # left-padded batches: sequence b attends from its own first position; the padding before it holds
    # k/v large enough to take all the weight if it were read
    from dejavu.runtime.kernels import triton_kernels as T

    torch.manual_seed(0)
    dev, B, H, hd, Tm = "cuda", 4, 8, 128, 600
    kc = torch.randn(B, kv_heads, Tm, hd, device=dev, dtype=dtype)
    vc = torch.randn_like(kc)
    start = torch.tensor([0, 1, 130, 511], device=dev)
    for b, first in enumerate(start.tolist()):
        kc[b, :, :first], vc[b, :, :first] = 30.0, 30.0
    for at in (511, 520, Tm - 1):
        where = torch.tensor([at], device=dev)
        for sel in (torch.arange(H, device=dev), torch.tensor([6, 1, 2], device=dev)):
            q = torch.randn(B, sel.numel(), hd, device=dev, dtype=dtype)
            ref = R.decode_attention(q, kc, vc, sel, H // kv_heads, where, hd ** -0.5, start)
            for splits, grouped in ((None, None), (1, None), (7, True), (None, False), (32, False)):
                got = T.decode_attention(q, kc, vc, sel, H // kv_heads, where, hd ** -0.5, splits=splits,
                                         grouped=grouped, start=start)
                assert _rel(got, ref) < 1e-2, (at, sel.tolist(), splits, grouped)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch,n,k", [(1, 11008, 5504), (1, 11008, 1100), (8, 14336, 7168), (3, 32, 16), (1, 9, 9)])
def test_select_topk_matches_reference(dtype, batch, n, k):
    from dejavu.runtime.kernels import triton_kernels as T

    torch.manual_seed(n + k)
    scores = torch.randn(batch, n, device="cuda").to(dtype)
    out = T.select_topk(scores, k)
    ref = R.select_topk(scores, k)
    best = scores.float().amax(0)
    assert out.unique().numel() == k and torch.equal(out, out.sort().values)
    torch.testing.assert_close(best[out].sort().values, best[ref].sort().values)


def _exact_topk(scores, k):
    """The selection's contract: the k largest per-unit maxima over the batch, ties to the lowest index,
    returned ascending (-0 and +0 are equal)."""
    best = scores.float().amax(0) + 0.0
    return torch.sort(-best, stable=True).indices[:k].sort().values


def _decode_keys(keys, dtype):
    """Values back from the wide top-k's ordered integer keys."""
    keys = keys.long()
    sign = -(1 << 15) if dtype != torch.float32 else -(1 << 31)
    bits = torch.where(keys >= 0, keys, (-1 - keys) | sign)
    if dtype == torch.float32:
        return bits.to(torch.int32).view(torch.float32)
    return bits.to(torch.int16).view(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch,n,k", [(1, 11008, 5504), (1, 11008, 1101), (8, 14336, 7168), (3, 18944, 1),
                                       (2, 300, 299), (3, 32, 16), (1, 9, 9), (5, 1025, 512)])
def test_select_topk_wide_is_exact(dtype, batch, n, k):
    from dejavu.runtime.kernels import triton_kernels as T

    torch.manual_seed(n + k + batch)
    ws = T.TopkWorkspace(n, dtype, "cuda")
    for trial in range(3):  # the workspace is reused: its histograms must be back to zero each call
        scores = torch.randn(batch, n, device="cuda")
        if trial == 1:  # heavy ties, +0 and -0 among them
            scores = (scores * 2).round() / 2
        if trial == 2:
            scores = scores.abs() * 1e-3 - 5e-4
        scores = scores.to(dtype)
        out = torch.full((k,), -7, dtype=torch.long, device="cuda")
        T.select_topk_wide(scores, k, out, ws)
        assert torch.equal(out, _exact_topk(scores, k)), (trial, out[:8], _exact_topk(scores, k)[:8])
        assert int(ws.hist[:T.TOPK_BINS].abs().sum()) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch,n,rank,k,relu", [(1, 11008, 256, 5504, False), (8, 11008, 256, 1101, True),
                                                 (3, 1000, 40, 100, False), (1, 32, 256, 16, False),
                                                 (4, 200, 32, 50, True)])
def test_predict_select_matches_reference(dtype, batch, n, rank, k, relu):
    from dejavu.runtime.kernels import triton_kernels as T

    torch.manual_seed(n + rank)
    dev = "cuda"
    h = torch.randn(batch, 2 * rank + 3, device=dev).to(dtype)[:, 3:3 + rank]  # a strided view, as in a group
    w2 = (torch.randn(n, rank, device=dev) * rank ** -0.5).to(dtype)
    b2 = (torch.randn(n, device=dev) * 0.1).to(dtype)
    ws = T.TopkWorkspace(n, dtype, dev)
    ref_scores = torch.nn.functional.linear((torch.relu(h) if relu else h).double(), w2.double(), b2.double())
    best = ref_scores.amax(0)
    for _ in range(2):
        out = T.predict_select(h, w2, b2, relu, k, ws=ws)
        assert out.unique().numel() == k and torch.equal(out, out.sort().values)
        # the chosen units' true scores match the reference top-k's up to the scores' rounding
        ref = R.select_topk(ref_scores, k)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        assert (best[out].sort().values - best[ref].sort().values).abs().max() < tol * best.abs().max()
        if n > T.WIDE_SINGLE_MAX:  # wide path: its keys are the rounded scores, and the selection is exact on them
            keys = _decode_keys(ws.keys, dtype)
            assert _rel(keys, best) < (1e-5 if dtype == torch.float32 else 1e-2)
            assert torch.equal(out, _exact_topk(keys[None], k))


def _tiny_with_predictors(model_type: str = "llama", **overrides):
    """A tiny random model of the family, its adapter and random predictors at MLP 0.5 / heads 0.5."""
    from dejavu.models.adapters import adapter_for
    from dejavu.predictor import PredictorSet

    from helpers import build_tiny_model

    model = build_tiny_model(model_type, seed=0, **overrides)
    adapter = adapter_for(model)
    s = adapter.shape()
    preds = PredictorSet.random(adapter.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, 8, 0.5, 0.5)
    return model, adapter, preds


def _three_steps(dm, prompt: torch.Tensor, sparse: bool, steps: int = 3) -> torch.Tensor:
    """Logits of three (or `steps`) decode steps after a dense prefill: a captured graph on CUDA, eager
    on the CPU."""
    from dejavu.runtime.decode import GraphedStep

    st = dm.new_state(prompt.shape[0])
    dm.prefill(st, prompt)
    if dm.device.type == "cuda":
        step = GraphedStep(dm, st, sparse)
        logits = [step().clone() for _ in range(steps)]
    else:
        logits = [dm.step(st, sparse).clone() for _ in range(steps)]
    return torch.stack(logits).cpu()


@pytest.mark.parametrize("select_impl", ["fused", "classic"])
@pytest.mark.parametrize("dense_impl", ["cublas", "triton"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text",
                                        "granite", "olmo", "olmo2", "opt", "gpt2", "gpt_neox"])
def test_graphed_decode_matches_cpu_reference(model_type, dense_impl, select_impl):
    from dejavu.runtime.decode import DecodeModel

    if select_impl == "classic" and dense_impl == "triton":
        pytest.skip("covered by the other three combinations")
    # llama: a wide MLP (1200 neurons > one program of the wide top-k) so the multi-program path runs;
    # Gemma 2/3: sliding windows shorter than the decode, so the kernels' windows are exercised
    # GPT-NeoX: 24-dim heads rotating 6 (Pythia-2.8B's heads are 80 wide): padded head dims, reordered q/k
    # Granite: o's bias, which its residual multiplier scales with the block's output
    extra = {"llama": {"intermediate_size": 1200}, "gemma2": {"sliding_window": 4}, "gpt_neox": {"hidden_size": 96},
             "gemma3_text": {"sliding_window": 4, "num_hidden_layers": 3, "sliding_window_pattern": 2},
             "granite": {"attention_bias": True}}
    model, adapter, preds = _tiny_with_predictors(model_type, **extra.get(model_type, {}))
    if model_type == "granite":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.bias.normal_(0, 0.5)
    prompt = torch.randint(1, 500, (2, 5))
    results = {}
    for dev in ("cpu", "cuda"):
        model.to(dev)
        dm = DecodeModel(model, adapter, preds, dev, torch.float32, max_len=16, dense_impl=dense_impl,
                         select_impl=select_impl)
        for sparse in (False, True):
            results[dev, sparse] = _three_steps(dm, prompt, sparse, steps=5)
    for sparse in (False, True):
        # tf32 tl.dot for batch 2: loose tolerance; the same greedy tokens are the real check
        torch.testing.assert_close(results["cuda", sparse], results["cpu", sparse], atol=2e-2, rtol=2e-2)


def test_join_orders_and_first_layer_paths_give_the_same_decode():
    """heads-first joins only reorder the side stream's work, and the cuBLAS first layer differs only in
    rounding: the same logits within the tolerance of the other decode tests (split sums are atomic,
    so not bit for bit)."""
    from dejavu.runtime.decode import DecodeModel

    model, adapter, preds = _tiny_with_predictors("llama", intermediate_size=1200)
    prompt = torch.randint(1, 500, (2, 5))
    model.to("cuda")
    out = {}
    for impl, order in (("fused", "heads-first"), ("fused", "consumption"), ("fused-cublas", "heads-first")):
        dm = DecodeModel(model, adapter, preds, "cuda", torch.float32, max_len=16, dense_impl="triton",
                         select_impl=impl, join_order=order)
        out[impl, order] = _three_steps(dm, prompt, True)
    torch.testing.assert_close(out["fused", "consumption"], out["fused", "heads-first"], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out["fused-cublas", "heads-first"], out["fused", "heads-first"], atol=2e-2, rtol=2e-2)


def test_split_gathers_on_two_streams_with_their_own_workspaces():
    """The predictors' first layer (side stream) and the layer's gathers (main stream) both split d
    and sum partials; each stream's workspace keeps concurrent calls apart."""
    from dejavu.runtime.kernels import triton_kernels as T

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(1, 4096, device=dev, dtype=dt)
    w_main, w_side = (torch.randn(n, 4096, device=dev, dtype=dt) * 0.02 for n in (2048, 288))
    bias = torch.randn(288, device=dev, dtype=dt)
    idx = torch.randperm(2048, device=dev)[:600]
    ws = T.split_workspace(dev, 288)
    side = torch.cuda.Stream()
    ref_main = R.gather_matvec(x.double(), w_main.double(), idx, 1, None, 0)
    ref_side = R.gather_matvec(x.double(), w_side.double(), idx[:0], 1, None, 0, 288, bias.double())
    torch.cuda.synchronize()
    for _ in range(20):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outs_side = [T.gather_matvec(x, w_side, idx[:0], 1, None, 0, 288, bias=bias, workspace=ws, config=(32, 128, 4, 8))
                         for _ in range(4)]
        outs_main = [T.gather_matvec(x, w_main, idx, 1, None, 0, config=(32, 128, 4, 8)) for _ in range(4)]
        torch.cuda.current_stream().wait_stream(side)
        for out in outs_side:
            assert _rel(out, ref_side) < 1e-2
        for out in outs_main:
            assert _rel(out, ref_main) < 1e-2


@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_two_stage_decode_matches_cpu_reference(batch):
    """Two-stage MLP selection (candidates 0.75 -> final 0.5) captured in a graph vs the CPU loop;
    c == d reproduces the one-stage step."""
    from dejavu.runtime.decode import DecodeModel

    # 1200 neurons: 900 candidates, more than one program of the wide top-k
    model, adapter, preds = _tiny_with_predictors(intermediate_size=1200)
    prompt = torch.randint(1, 500, (batch, 5))
    results = {}
    for dev in ("cpu", "cuda"):
        model.to(dev)
        for cand in (0.75, 0.5, None):
            if dev == "cpu" and cand != 0.75:
                continue
            dm = DecodeModel(model, adapter, preds, dev, torch.float32, max_len=16, mlp_candidate_density=cand)
            results[dev, cand] = _three_steps(dm, prompt, True)
    torch.testing.assert_close(results["cuda", 0.75], results["cpu", 0.75], atol=2e-2, rtol=2e-2)
    assert torch.equal(results["cuda", 0.75].argmax(-1), results["cpu", 0.75].argmax(-1))
    torch.testing.assert_close(results["cuda", 0.5], results["cuda", None], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(results["cuda", 0.75], results["cuda", None], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch,n,k,weight", [(1, 11008, 5504, 0.4), (8, 14336, 7168, 0.4), (3, 1500, 7, 1.0),
                                              (2, 200, 100, 0.0), (1, 11008, 1101, None)])
def test_select_exact_up_matches_reference(dtype, batch, n, k, weight):
    from dejavu.runtime.kernels import triton_kernels as T

    torch.manual_seed(n + k + batch)
    up = torch.randn(batch, n, device="cuda").to(dtype)
    up[0, :5] = 0  # log|0| is clamped, not -inf
    logits = None if weight is None else torch.randn(batch, n, device="cuda").to(dtype)
    best = R.exact_up_scores(up, logits, weight or 0.0).amax(0)
    ref = R.select_topk(best[None], k)
    # fp32 keys rank the scores themselves, fp16 keys (the decode loop's) their rounding
    for key_dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        ws = T.TopkWorkspace(n, key_dtype, "cuda")
        for _ in range(2):  # the workspace is reused
            out = T.select_exact_up(up, logits, weight or 0.0, k, ws=ws)
            assert out.unique().numel() == k and torch.equal(out, out.sort().values)
            # Triton's log and torch's may differ in the last bit: compare the chosen scores, not the ids
            assert (best[out].sort().values - best[ref].sort().values).abs().max() <= tol * best.abs().max()
            assert int(ws.hist[:T.TOPK_BINS].abs().sum()) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [1, 5])
def test_vecmat_with_up_scale_matches_reference(dtype, batch):
    from dejavu.runtime.kernels import triton_kernels as T

    torch.manual_seed(batch)
    n, d = 11008, 4096
    idx = torch.randperm(n, device="cuda")[:n // 2].sort().values
    h = torch.randn(batch, idx.numel(), device="cuda").to(dtype)
    up = torch.randn(batch, n, device="cuda").to(dtype)
    wt = (torch.randn(n, d, device="cuda") * 0.02).to(dtype)
    ref, got = torch.zeros(batch, d, device="cuda"), torch.zeros(batch, d, device="cuda")
    R.gather_vecmat_acc((h.float() * up[:, idx].float()).to(dtype), wt, idx, 1, ref)
    T.gather_vecmat_acc(h, wt, idx, 1, got, scale=up)
    assert _rel(got, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("select_impl", ["fused", "classic"])
def test_graphed_exact_up_decode_matches_cpu_reference(batch, select_impl):
    """Exact-up MLP selection captured in a graph (predictor logits on the side stream, up on the main
    one, fp16 keys) against the CPU loop (fp32 scores), with and without the predictor's share."""
    from dejavu.runtime.decode import DecodeModel, _topk_workspace

    model, adapter, preds = _tiny_with_predictors(intermediate_size=1200)
    n = adapter.shape().intermediate_size
    prompt = torch.randint(1, 500, (batch, 5))
    results = {}
    for dev in ("cpu", "cuda"):
        model.to(dev)
        for weight, keys in ((0.4, "fp32"), (0.0, "fp32"), (0.4, "fp16"), (None, "fp16")):
            if dev == "cpu" and keys == "fp16":
                continue
            dm = DecodeModel(model, adapter, preds, dev, torch.float32, max_len=16, select_impl=select_impl,
                             mlp_up_weight=weight)
            if keys == "fp32":  # the CPU ranks fp32 scores; fp16 keys (the default) may break near-ties otherwise
                for lw in dm.layers:
                    lw.up_workspace = _topk_workspace(n, torch.float32, dev)
            results[dev, weight, keys] = _three_steps(dm, prompt, True)
    for weight in (0.4, 0.0):
        cuda, cpu = results["cuda", weight, "fp32"], results["cpu", weight, "fp32"]
        torch.testing.assert_close(cuda, cpu, atol=2e-2, rtol=2e-2)
        assert torch.equal(cuda.argmax(-1), cpu.argmax(-1))
    assert not torch.allclose(results["cuda", 0.4, "fp32"], results["cuda", 0.0, "fp32"], atol=1e-3)
    assert not torch.allclose(results["cuda", 0.4, "fp16"], results["cuda", None, "fp16"], atol=1e-3)
    assert torch.isfinite(results["cuda", 0.4, "fp16"]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch,d,hd,num_kv,group,with_bias", [(1, 4096, 128, 32, 1, False), (4, 2048, 64, 8, 4, True),
                                                               (2, 576, 64, 3, 3, False)])
def test_lazy_kv_fill_matches_reference(dtype, batch, d, hd, num_kv, group, with_bias):
    """Steps whose selections leave gaps of every length (some longer than a 16-row block) are filled
    like the reference does, in the cache, the stored inputs and the per-group last positions."""
    from dejavu.runtime.kernels import triton_kernels as T

    from helpers import rope_tables

    torch.manual_seed(batch + d)
    length, plen = 96, 4
    num_q = num_kv * group
    w = (torch.randn((num_q + 2 * num_kv) * hd, d, device="cuda") * d ** -0.5).to(dtype)
    bias = (torch.randn(w.shape[0], device="cuda") * 0.1).to(dtype) if with_bias else None
    cos, sin = rope_tables(length, hd, device="cuda")
    xs = torch.randn(batch, length, d, device="cuda").to(dtype)
    gen = torch.Generator().manual_seed(0)
    selections = [torch.randperm(num_q, generator=gen)[:max(1, num_q // (8 if p < 60 else 2))].sort().values.cuda()
                  for p in range(length)]
    state = {}
    for impl, fill in (("ref", R.lazy_kv_fill), ("triton", T.lazy_kv_fill)):
        kc = torch.zeros(batch, num_kv, length, hd, device="cuda", dtype=dtype)
        vc, xcache = torch.zeros_like(kc), torch.zeros(batch, length, d, device="cuda", dtype=dtype)
        last = torch.full((2, num_kv), plen - 1, dtype=torch.int32, device="cuda")
        for p in range(plen, length):
            fill(xs[:, p], xcache, w, bias, selections[p], group, kc, vc, last, cos, sin,
                 torch.tensor([p], device="cuda"))
        state[impl] = (kc, vc, xcache, last)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for ref, got in zip(state["ref"], state["triton"], strict=True):
        if ref.dtype == torch.int32:
            assert torch.equal(ref, got)
        else:
            assert _rel(got, ref) < tol


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_graphed_skip_kv_decode_matches_computing_every_group(model_type, batch):
    """k/v of the selected heads' groups only, captured in a graph: the same logits as the loop that
    computes every group (graphed) and as the CPU loop with skip_kv, over enough steps for gaps to form."""
    from dejavu.runtime.decode import DecodeModel

    model, adapter, preds = _tiny_with_predictors(model_type, num_key_value_heads=4)  # one head per group
    prompt = torch.randint(1, 500, (batch, 5))
    results = {}
    for dev in ("cpu", "cuda"):
        model.to(dev)
        for skip_kv in (True, False):
            if dev == "cpu" and not skip_kv:
                continue
            dm = DecodeModel(model, adapter, preds, dev, torch.float32, max_len=24, skip_kv=skip_kv)
            results[dev, skip_kv] = _three_steps(dm, prompt, True, steps=12)
    torch.testing.assert_close(results["cuda", True], results["cuda", False], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results["cuda", True], results["cpu", True], atol=2e-2, rtol=2e-2)
    assert torch.equal(results["cuda", True].argmax(-1), results["cpu", True].argmax(-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("rows,n", [(4096, 22016), (11008, 4096), (576, 3072), (1000, 700)])
def test_threshold_kernels_match_reference(dtype, batch, rows, n):
    from dejavu.runtime.kernels import triton_kernels as T

    torch.manual_seed(rows + batch)
    dev = "cuda"
    h = torch.randn(batch, rows, device=dev, dtype=dtype)
    wt = torch.randn(rows, n, device=dev, dtype=dtype) * rows ** -0.5
    for threshold in (-1.0, 0.5, 1.5):
        acc = torch.full((batch, n), 0.5, device=dev)
        T.threshold_vecmat_acc(h, wt, threshold, acc)
        ref = torch.full((batch, n), 0.5, device=dev, dtype=torch.float64)
        R.threshold_vecmat_acc(h.double(), wt.double(), threshold, ref)
        assert torch.isfinite(acc).all() and _rel(acc, ref) < 1e-2
    acc2 = torch.randn(batch, 2 * n, device=dev)
    want = (torch.nn.functional.silu(acc2[:, :n].double()) * acc2[:, n:].double())
    out = torch.empty(batch, n, device=dev, dtype=dtype)
    T.act_mul_acc(acc2, 1, out)
    assert _rel(out, want) < 1e-2 and acc2.abs().max() == 0
    acc3 = torch.randn(batch, n, device=dev)
    want3 = acc3.clone()
    T.drain_acc(acc3, out)
    assert _rel(out, want3) < 1e-2 and acc3.abs().max() == 0
    from dejavu.runtime.kernels import ops
    nq, nkv, hd = 8, 2, 128
    acc4 = torch.randn(batch, (nq + 2 * nkv) * hd, device=dev)
    cos, sin = (torch.randn(16, hd // 2, device=dev).repeat(1, 2) for _ in range(2))  # halves repeat, as in HF
    pos = torch.tensor([5], device=dev)
    outs = []
    for fn, where in ((T.rope_cache_write_acc, dev), (ops.rope_cache_write_acc, "cpu")):
        a = acc4.clone().to(where)
        q = torch.empty(batch, nq, hd, dtype=dtype, device=where)
        kc, vc = (torch.zeros(batch, nkv, 16, hd, dtype=dtype, device=where) for _ in range(2))
        fn(a, q, kc, vc, cos.to(where), sin.to(where), pos.to(where))
        assert a.abs().max() == 0
        outs.append([t.cpu() for t in (q, kc, vc)])
    for got, want in zip(*outs, strict=True):
        assert _rel(got, want) < 1e-2


@pytest.mark.parametrize("model_type,batch,keep_attn", [("llama", 1, None), ("llama", 3, None), ("llama", 1, 0.6),
                                                      ("llama", 3, 0.5), ("qwen2", 1, 0.6), ("qwen3", 3, 0.6),
                                                      ("phi3", 1, 0.6), ("olmo2", 3, 0.6), ("gemma2", 1, 0.6),
                                                      ("granite", 3, None)])
def test_graphed_threshold_decode_matches_cpu_reference(model_type, batch, keep_attn):
    from dejavu.runtime.decode import DecodeModel
    from dejavu.runtime.thresholds import calibrate_thresholds

    # qwen2: q/k/v biases take the drain + bias + rope path instead of the one-launch one
    model, adapter, preds = _tiny_with_predictors(model_type, intermediate_size=1200)
    thresholds = calibrate_thresholds(model, adapter, torch.randint(1, 500, (128,)), 0.7, 0.5, window=64,
                                      keep_attn=keep_attn)
    prompt = torch.randint(1, 500, (batch, 5))
    results = {}
    for dev in ("cpu", "cuda"):
        model.to(dev)
        dm = DecodeModel(model, adapter, preds, dev, torch.float32, max_len=16, thresholds=thresholds)
        for sparse in (False, True):
            results[dev, sparse] = _three_steps(dm, prompt, sparse)
    for sparse in (False, True):
        torch.testing.assert_close(results["cuda", sparse], results["cpu", sparse], atol=2e-2, rtol=2e-2)
    assert (results["cpu", True] - results["cpu", False]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch,n,rank,relu", [(1, 11008, 256, False), (8, 14336, 256, True), (3, 1000, 40, False),
                                               (1, 32, 16, True)])
def test_selection_above_thresholds_matches_reference(dtype, batch, n, rank, relu):
    """Score thresholds: the units whose batch-max score is above the threshold, ascending, and their count,
    written on the device (from given scores: exactly the reference's; fused: on the kernel's own rounding)."""
    from dejavu.runtime.kernels import triton_kernels as T

    torch.manual_seed(n + batch)
    dev = "cuda"
    h = torch.randn(batch, 2 * rank + 3, device=dev).to(dtype)[:, 3:3 + rank]
    w2 = (torch.randn(n, rank, device=dev) * rank ** -0.5).to(dtype)
    b2 = (torch.randn(n, device=dev) * 0.1).to(dtype)
    scores = torch.nn.functional.linear(torch.relu(h) if relu else h, w2, b2)
    out = torch.empty(n, dtype=torch.long, device=dev)
    count = torch.zeros(1, dtype=torch.int32, device=dev)
    tally = torch.zeros(2, dtype=torch.int64, device=dev)
    keys = torch.empty(n, dtype=torch.int32, device=dev)
    best = scores.double().amax(0)
    for i, thr in enumerate((0.0, float(best.median()), float(best[5]), 1e9, -1e9)):
        expect = R.select_above(scores, thr)
        T.select_above(scores, thr, out, count, tally, keys)
        assert int(count) == expect.numel() and torch.equal(out[:int(count)], expect), thr
        assert int(tally[1]) == 2 * i + 1  # a call each: this one and the fused one before it
        T.predict_above(h, w2, b2, relu, thr, out, count, tally, keys)
        got = out[:int(count)]
        assert torch.equal(got, got.sort().values) and got.unique().numel() == got.numel()
        # the fused scores differ from F.linear's only in rounding: the sets differ only near the threshold
        differ = set(got.tolist()) ^ set(expect.tolist())
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert all(abs(float(best[u]) - thr) <= tol * (1 + abs(thr)) for u in differ)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,n,act", [(4096, 11008, 1), (576, 1536, 2)])
def test_mlp_kernels_read_the_count_from_the_device(dtype, d, n, act):
    """With a count the kernels compute idx[:count] only (the grid sized for all of idx), in a graph that
    replays correctly whatever count a later selection writes."""
    from dejavu.runtime.kernels import ops

    torch.manual_seed(d)
    dev = "cuda"
    gate, up = (torch.randn(n, d, device=dev, dtype=dtype) * d ** -0.5 for _ in range(2))
    down_t = torch.randn(n, d, device=dev, dtype=dtype) * n ** -0.5
    idx = torch.randperm(n, device=dev)
    count = torch.zeros(1, dtype=torch.int32, device=dev)
    for batch in (1, 3):
        x = torch.randn(batch, d, device=dev, dtype=dtype)
        acc = torch.full((batch, d), 0.5, device=dev)
        ops.sparse_mlp_acc(x, gate, up, down_t, idx, act, acc, count)  # compiles outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ops.sparse_mlp_acc(x, gate, up, down_t, idx, act, acc, count)
        for c in (0, 1, n // 10, n // 2, n):
            count.fill_(c)
            acc.fill_(0.5)
            graph.replay()
            want = 0.5 + (R.sparse_mlp(x.double(), gate.double(), up.double(), down_t.double(), idx[:c], act)
                          if c else 0.0)
            assert torch.isfinite(acc).all() and _rel(acc, want + torch.zeros_like(acc, dtype=torch.float64)) < 1e-2


@pytest.mark.parametrize("model_type,batch,select_impl", [("llama", 1, "fused"), ("llama", 3, "fused"),
                                                          ("llama", 1, "classic"), ("opt", 1, "fused"),
                                                          ("qwen2", 3, "fused")])
def test_graphed_score_threshold_decode_matches_cpu_reference(model_type, batch, select_impl):
    from dejavu.runtime.decode import DecodeModel

    model, adapter, preds = _tiny_with_predictors(model_type, **({"ffn_dim": 1200} if model_type == "opt" else
                                                                 {"intermediate_size": 1200}))
    torch.manual_seed(1)
    x = torch.randn(64, adapter.shape().hidden_size)
    with torch.no_grad():  # thresholds near each layer's median score on random inputs
        preds.mlp_score_thresholds = [float(lp.mlp(x).median()) for lp in preds.layers]
    prompt = torch.randint(1, 500, (batch, 5))
    results, shares = {}, {}
    for dev in ("cpu", "cuda"):
        model.to(dev)
        dm = DecodeModel(model, adapter, preds, dev, torch.float32, max_len=16, select_impl=select_impl)
        dm.reset_mlp_tally()
        results[dev] = _three_steps(dm, prompt, True, steps=5)
        shares[dev] = dm.mlp_share_read()
    torch.testing.assert_close(results["cuda"], results["cpu"], atol=2e-2, rtol=2e-2)
    assert 0.0 < shares["cpu"] < 1.0 and 0.0 < shares["cuda"] < 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d,n,act", [(4096, 11008, 1), (576, 1536, 2)])
def test_mlp_kernels_cut_down_rows(dtype, d, n, act):
    """Down thresholds: the MLP kernels (batch 1: one launch; batch 3: the two gather kernels) read a neuron's
    down^T row only when some sequence's |act*up| is above the cut, in one graph replayed at any count, and
    tally the rows read; against the activations gather_matvec computes (the batch kernels' own; the one-launch
    kernel sums in another order, so a row at the cut may fall either way there)."""
    from dejavu.runtime.kernels import ops
    from dejavu.runtime.kernels import triton_kernels as T

    torch.manual_seed(d + 1)
    dev = "cuda"
    gate, up = (torch.randn(n, d, device=dev, dtype=dtype) * d ** -0.5 for _ in range(2))
    down_t = torch.randn(n, d, device=dev, dtype=dtype) * n ** -0.5
    idx = torch.randperm(n, device=dev)
    count = torch.zeros(1, dtype=torch.int32, device=dev)
    tally = torch.zeros(2, dtype=torch.int64, device=dev)
    for batch in (1, 3):
        x = torch.randn(batch, d, device=dev, dtype=dtype)
        h_all = T.gather_matvec(x, up, idx, 1, gate, act)  # every neuron's activation, rounded as the kernels do
        cut = float(h_all.float().abs().median())
        acc = torch.full((batch, d), 0.5, device=dev)
        ops.sparse_mlp_cut_acc(x, gate, up, down_t, idx, act, acc, cut, tally, count)  # compiles outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ops.sparse_mlp_cut_acc(x, gate, up, down_t, idx, act, acc, cut, tally, count)
        for c in (0, 1, n // 10, n // 2, n):
            count.fill_(c)
            acc.fill_(0.5)
            tally.zero_()
            graph.replay()
            h = h_all[:, :c].double()
            above = h.abs() > cut
            keep = above.any(0)
            want = 0.5 + (torch.where(above, h, 0.0)[:, keep] @ down_t.double()[idx[:c][keep]] if c else 0.0)
            slack = 0 if batch > 1 else int(((h.abs() - cut).abs() <= 2 ** -6 * cut).sum())  # within ~2 bf16 ulps
            assert abs(tally[0].item() - int(keep.sum())) <= slack and tally[1].item() == 1, (batch, c)
            assert torch.isfinite(acc).all() and _rel(acc, want + torch.zeros_like(acc, dtype=torch.float64)) < 1e-2


@pytest.mark.parametrize("model_type,batch,select_impl", [("llama", 1, "fused"), ("llama", 3, "fused"),
                                                          ("llama", 1, "classic"), ("qwen2", 3, "fused")])
def test_graphed_two_stage_threshold_decode_matches_cpu_reference(model_type, batch, select_impl):
    """Score-threshold candidates with down thresholds: the graphed loop against the CPU loop, and both read
    fewer down rows than candidates."""
    from dejavu.runtime.apply import SparseRuntime
    from dejavu.runtime.decode import DecodeModel

    model, adapter, preds = _tiny_with_predictors(model_type, intermediate_size=1200)
    ids = torch.randint(1, 500, (1, 32), generator=torch.Generator().manual_seed(2))
    with SparseRuntime(model, adapter, preds, mlp_candidate_density=0.7, mlp_score_thresholds="batch",
                       mlp_down_thresholds="batch") as rt, torch.no_grad():
        model(input_ids=ids)
        preds.mlp_score_thresholds = [float(rt.batch_score_thresholds[i]) for i in range(adapter.num_layers)]
        preds.mlp_down_thresholds = [float(rt.batch_down_thresholds[i]) for i in range(adapter.num_layers)]
    prompt = torch.randint(1, 500, (batch, 5))
    results, shares = {}, {}
    for dev in ("cpu", "cuda"):
        model.to(dev)
        dm = DecodeModel(model, adapter, preds, dev, torch.float32, max_len=16, select_impl=select_impl,
                         mlp_candidate_density=0.7)
        dm.reset_mlp_tally()
        results[dev] = _three_steps(dm, prompt, True, steps=5)
        shares[dev] = (dm.mlp_share_read(), dm.mlp_down_share_read())
    torch.testing.assert_close(results["cuda"], results["cpu"], atol=2e-2, rtol=2e-2)
    for candidates, down in shares.values():
        assert 0.0 < down < candidates <= 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d,n,rank", [(4096, 11008, 32), (576, 1536, 20)])
def test_gather_kernels_add_the_mlp_compensation_in_batches(dtype, d, n, rank):
    """Batches 2 and 8: the MLP compensation rides in the two gather kernels (z = x a^T as row blocks after the
    selection's, z b^T + bias as a split of its own), in one graph replayed at any count, with and without the
    down cut, against float64 sums over the kernels' own activations."""
    from functools import partial

    from dejavu.runtime.kernels import ops
    from dejavu.runtime.kernels import triton_kernels as T

    torch.manual_seed(d + rank)
    dev = "cuda"
    gate, up = (torch.randn(n, d, device=dev, dtype=dtype) * d ** -0.5 for _ in range(2))
    down_t = torch.randn(n, d, device=dev, dtype=dtype) * n ** -0.5
    a = torch.randn(rank, d, device=dev, dtype=dtype) * d ** -0.5
    bt = torch.randn(rank, d, device=dev, dtype=dtype) * rank ** -0.5
    bias = torch.randn(d, device=dev, dtype=dtype) * 0.1
    idx = torch.randperm(n, device=dev)[: n // 2]
    count = torch.zeros(1, dtype=torch.int32, device=dev)
    tally = torch.zeros(2, dtype=torch.int64, device=dev)
    for batch in (2, 8):
        x = torch.randn(batch, d, device=dev, dtype=dtype)
        h_all = T.gather_matvec(x, up, idx, 1, gate, 1)
        z = (x.double() @ a.double().T).to(dtype).double()  # rounded as the kernel stores it
        cut = float(h_all.float().abs().median())
        for with_cut in (False, True):
            acc = torch.full((batch, d), 0.5, device=dev)
            run = (partial(ops.sparse_mlp_cut_acc, x, gate, up, down_t, idx, 1, acc, cut, tally, count, a, bt, bias)
                   if with_cut else partial(ops.sparse_mlp_acc, x, gate, up, down_t, idx, 1, acc, count, a, bt, bias))
            run()  # compiles outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            for c in (0, 7, idx.numel()):
                count.fill_(c)
                acc.fill_(0.5)
                graph.replay()
                h = h_all[:, :c].double()
                if with_cut:
                    h = torch.where(h.abs() > cut, h, 0.0)
                want = 0.5 + h @ down_t.double()[idx[:c]] + z @ bt.double() + bias.double()
                assert torch.isfinite(acc).all() and _rel(acc, want) < 1e-2, (batch, with_cut, c)


@pytest.mark.parametrize("model_type,batch", [("llama", 1), ("llama", 3), ("opt", 1), ("gemma2", 2), ("granite", 1)])
def test_graphed_decode_with_mlp_compensation_matches_cpu_reference(model_type, batch):
    """The MLP compensation's low-rank term inside the captured step: the graphed loop against the CPU loop, and
    the term changes the output."""
    from dejavu.runtime.compensation import calibrate_compensation
    from dejavu.runtime.decode import DecodeModel

    model, adapter, preds = _tiny_with_predictors(model_type)
    ids = torch.randint(1, 500, (2, 24), generator=torch.Generator().manual_seed(4))
    comp = calibrate_compensation(model, adapter, preds, ids.reshape(-1), 24, rank=4)
    prompt = torch.randint(1, 500, (batch, 5))
    results = {}
    for dev in ("cpu", "cuda"):
        model.to(dev)
        for name, term in (("on", comp), ("off", None)):
            preds.mlp_compensation = term
            dm = DecodeModel(model, adapter, preds, dev, torch.float32, max_len=16)
            results[dev, name] = _three_steps(dm, prompt, True)
    torch.testing.assert_close(results["cuda", "on"], results["cpu", "on"], atol=2e-2, rtol=2e-2)
    assert (results["cpu", "on"] - results["cpu", "off"]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("d,n,act,gated", [(4096, 11008, 1, True), (576, 1536, 1, True), (1024, 4096, 3, False)])
def test_quant_scores_match_reference(dtype, batch, bits, d, n, act, gated):
    """The quantized-weight MLP predictor's scores (7B and SmolLM2 shapes, and a plain MLP with a bias) against
    the dequantize-then-matmul reference, then its selection against the reference top-k."""
    from dejavu.quantized_predictor import quantize_rows, tile_rows
    from dejavu.runtime.decode import _topk_workspace
    from dejavu.runtime.kernels import ops

    torch.manual_seed(bits + d)
    up_codes, up_scales = (t.cuda() for t in tile_rows(*quantize_rows(torch.randn(n, d) * d ** -0.5, bits, 64)))
    gate_codes = gate_scales = bias = None
    if gated:
        gate_codes, gate_scales = (t.cuda() for t in tile_rows(*quantize_rows(torch.randn(n, d) * d ** -0.5, bits,
                                                                               64)))
    else:
        bias = (torch.randn(n) * 0.1).half().cuda()
    x = torch.randn(batch, d, device="cuda").to(dtype)
    out = torch.empty(batch, n, device="cuda")
    ops.quant_scores(x, up_codes, up_scales, bias, gate_codes, gate_scales, bits, act, out)
    ref = R.quant_scores(x.float(), up_codes, up_scales, bias, gate_codes, gate_scales, bits, act)
    # the kernel sums in fp32 from x in its dtype; the reference from x in fp32 (the same values)
    assert _rel(out, ref) < 1e-5
    k = n // 2
    got = torch.empty(k, dtype=torch.long, device="cuda")
    ops.select_exact_up(out, None, 0.0, got, *_topk_workspace(n, torch.float16, "cuda"))
    expected = R.select_topk(ref, k)
    assert len(set(got.tolist()) & set(expected.tolist())) > 0.98 * k


def _quantized_steps_cpu_and_cuda(path, preds, batch: int, sparse_modes=(True,)) -> dict:
    """Logits of the loop's steps on the CPU (dequantized fp32 copies) and graphed on CUDA (the Triton scores
    kernel in fp32, not PyTorch's int4 matmul, whose x is rounded to bf16), fp32 top-k keys on both sides (fp16
    keys, the default, may break near-ties otherwise): {(device, sparse): logits}."""
    import dejavu.runtime.decode as decode
    from dejavu.models.adapters import adapter_for
    from dejavu.models.loading import load_model

    model, _, _ = load_model(str(path), device="cpu", dtype="float32")
    adapter = adapter_for(model)
    prompt = torch.randint(1, 500, (batch, 5))
    results = {}
    use = decode._int4_matmul
    decode._int4_matmul = lambda *args: None
    try:
        for dev in ("cpu", "cuda"):
            model.to(dev)
            dm = decode.DecodeModel(model, adapter, preds, dev, torch.float32, max_len=16)
            for lw in dm.layers:
                lw.mlp_quant.workspace = decode._topk_workspace(adapter.shape().intermediate_size, torch.float32, dev)
            for sparse in sparse_modes:
                results[dev, sparse] = _three_steps(dm, prompt, sparse)
    finally:
        decode._int4_matmul = use
    torch.testing.assert_close(results["cuda", True], results["cpu", True], atol=2e-2, rtol=2e-2)
    assert torch.equal(results["cuda", True].argmax(-1), results["cpu", True].argmax(-1))
    return results


@pytest.mark.parametrize("model_type", ["llama", "opt", "phi3"])
@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_quantized_predictor_decode_matches_cpu_reference(model_type, batch, tmp_path):
    """Quantized-weight MLP predictors in the captured step (scores kernel, top-k, one-launch MLP) against the CPU
    loop."""
    from dejavu.export.bundle import load_bundle, run_export

    from helpers import make_tiny_model

    width = {"ffn_dim": 1200} if model_type == "opt" else {"intermediate_size": 1200}
    path = make_tiny_model(tmp_path / "m", model_type, **width)
    run_export(None, tmp_path / "b", config_file="tiny", model_name=str(path),
               overrides={"export.mlp_predictor_bits": 4, "export.mlp_predictor_group": 32,
                          "export.mlp_density": 0.3})
    _, preds = load_bundle(tmp_path / "b")
    results = _quantized_steps_cpu_and_cuda(path, preds, batch, sparse_modes=(False, True))
    assert not torch.allclose(results["cuda", True], results["cuda", False], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # PyTorch's int4 matmul / the Triton kernel
def test_the_speed_report_times_quantized_predictors_on_cuda(dtype, tmp_path):
    """bench's predictor time once read 0 ms for bundles whose only predictors are quantized copies."""
    from dejavu.export.bundle import load_bundle, run_export
    from dejavu.models.adapters import adapter_for
    from dejavu.models.loading import load_model
    from dejavu.runtime.decode import DecodeModel
    from dejavu.runtime.speed import predictor_ms

    from helpers import make_tiny_model

    path = make_tiny_model(tmp_path / "m", "llama", intermediate_size=1200)
    run_export(None, tmp_path / "b", config_file="tiny", model_name=str(path),
               overrides={"export.mlp_predictor_bits": 4, "export.mlp_predictor_group": 32, "export.mlp_density": 0.3})
    _, preds = load_bundle(tmp_path / "b")
    model, _, _ = load_model(str(path), device="cuda", dtype=str(dtype).removeprefix("torch."))
    dm = DecodeModel(model, adapter_for(model), preds, "cuda", dtype, max_len=16)
    assert not dm.pred_groups and predictor_ms(dm, 1, steps=4) > 0.0


@pytest.mark.parametrize("gated", [True, False])
def test_int4_matmul_scores_match_reference(gated):
    """The bf16 path through PyTorch's int4 matmul: its selection against the reference top-k of the same copies."""
    from dejavu.models.adapters import MLPWeights
    from dejavu.predictor import units_for_density
    from dejavu.quantized_predictor import QuantizedMLPPredictor, quantize_mlp
    from dejavu.runtime.decode import QuantizedSelector

    torch.manual_seed(0)
    n, d = 11008, 4096
    weights = MLPWeights(up=torch.randn(n, d) * d ** -0.5, down=torch.empty(0),
                         gate=torch.randn(n, d) * d ** -0.5 if gated else None,
                         up_bias=None if gated else torch.randn(n) * 0.1)
    pred = QuantizedMLPPredictor(quantize_mlp(weights, 4, 64), 4, 64, "silu" if gated else "relu")
    k = units_for_density(0.5, n)
    selector = QuantizedSelector.build(pred, k, "cuda", torch.bfloat16)
    assert selector.int4 is not None
    x = torch.randn(1, d, device="cuda").to(torch.bfloat16)
    got = selector.select(x, 1 if gated else 3).tolist()
    expected = R.select_topk(pred.to("cuda")(x.float()), k).tolist()
    assert len(set(got) & set(expected)) > 0.98 * k


@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_run_heads_beside_quantized_mlp_decode_matches_cpu_reference(batch, tmp_path):
    """The run's head predictors on the side stream and 4-bit MLP copies on the main one, captured in a graph,
    against the CPU loop."""
    from dejavu.export.bundle import load_bundle, run_export

    from helpers import make_predictors_dir, make_tiny_model

    path = make_tiny_model(tmp_path / "m", "llama", intermediate_size=1200)
    make_predictors_dir(tmp_path / "run", path, mlp_density=0.3, head_density=0.5)
    run_export(tmp_path / "run", tmp_path / "b", overrides={"export.mlp_predictor_bits": 4,
                                                            "export.mlp_predictor_group": 32})
    _, preds = load_bundle(tmp_path / "b")
    _quantized_steps_cpu_and_cuda(path, preds, batch)
