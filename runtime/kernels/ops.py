"""The sparse decode ops as torch.library custom ops: Triton on CUDA, runtime.reference elsewhere.

Registering them (with fake implementations) keeps them opaque and shape-known to torch.compile and
safe inside CUDA-graph capture; the decode loop calls only these, so one loop serves GPU and CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from dejavu.runtime import reference


class _Op:
    """A registered custom op that eager CPU code calls straight through to its Python body. The
    custom-op dispatcher cost ~75 us a call on the 2-core VM (residual_rmsnorm: 103 us through it,
    29 us direct), which came to about a quarter of a SmolLM2 decode step. CUDA tensors and code being
    compiled still go through the registered op."""

    def __init__(self, fn: Callable, mutates_args: tuple[str, ...]):
        functools.update_wrapper(self, fn)
        self.eager = fn
        self.op = torch.library.custom_op(f"dejavu::{fn.__name__}", mutates_args=mutates_args)(fn)
        self.register_kernel = self.op.register_kernel
        self.register_fake = self.op.register_fake

    def __call__(self, first: Tensor, *args, **kwargs):
        if first.device.type == "cpu" and not torch.compiler.is_compiling():
            return self.eager(first, *args, **kwargs)
        return self.op(first, *args, **kwargs)


def _custom_op(name: str, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], _Op]:
    def register(fn: Callable) -> _Op:
        assert fn.__name__ == name.removeprefix("dejavu::"), "the op's name is its function's"
        return _Op(fn, mutates_args)

    return register


def _triton():
    from dejavu.runtime.kernels import triton_kernels

    return triton_kernels


def _counted(idx: Tensor, count: Tensor | None) -> Tensor:
    """The selection a count-carrying index buffer holds (score thresholds): its first `count` entries.
    Reads the count on the host: the eager CPU path only (CUDA kernels read it on the device)."""
    return idx if count is None else idx[:int(count)]


@_custom_op("dejavu::gather_matvec", mutates_args=())
def gather_matvec(x: Tensor, w: Tensor, idx: Tensor, unit: int, gate: Tensor | None, act: int,
                  tail: int = 0, bias: Tensor | None = None, workspace: Tensor | None = None,
                  count: Tensor | None = None) -> Tensor:
    """act(x @ w[rows].T) (times x @ gate[rows].T when gated); count (unit 1, no tail): only idx[:count] is
    selected, and the output's later columns are zero here, unwritten on CUDA (no consumer reads them)."""
    if count is None:
        return reference.gather_matvec(x, w, idx, unit, gate, act, tail, bias)
    out = x.new_zeros(x.shape[0], idx.shape[0])
    kept = _counted(idx, count)
    out[:, :kept.numel()] = reference.gather_matvec(x, w, kept, unit, gate, act, tail, bias)
    return out


@gather_matvec.register_kernel("cuda")
def _(x, w, idx, unit, gate, act, tail=0, bias=None, workspace=None, count=None):
    return _triton().gather_matvec(x, w, idx, unit, gate, act, tail, bias=bias, workspace=workspace, count=count)


@gather_matvec.register_fake
def _(x, w, idx, unit, gate, act, tail=0, bias=None, workspace=None, count=None):
    return x.new_empty(x.shape[0], idx.shape[0] * unit + tail)


def split_workspace(device, rows: int) -> Tensor | None:
    """Scratch for gather_matvec calls of up to `rows` outputs that may run alongside the main
    stream's (the predictors' side stream); None off CUDA, where none is needed."""
    if torch.device(device).type != "cuda":
        return None
    return _triton().split_workspace(device, rows)


@_custom_op("dejavu::gather_vecmat_acc", mutates_args=("acc",))
def gather_vecmat_acc(h: Tensor, wt: Tensor, idx: Tensor, unit: int, acc: Tensor, scale: Tensor | None = None,
                      count: Tensor | None = None) -> None:
    """acc += h @ wt[rows of idx]; scale [B, n] (unit 1): h[:, j] is first multiplied by scale[:, idx[j]];
    count (unit 1): only idx[:count] and h's first count columns."""
    if count is not None:
        idx = _counted(idx, count)
        h = h[:, :idx.numel()]
    if scale is not None:
        h = (h.float() * scale.index_select(1, idx).float()).to(h.dtype)
    reference.gather_vecmat_acc(h, wt, idx, unit, acc)


@gather_vecmat_acc.register_kernel("cuda")
def _(h, wt, idx, unit, acc, scale=None, count=None):
    _triton().gather_vecmat_acc(h, wt, idx, unit, acc, scale=scale, count=count)


@gather_vecmat_acc.register_fake
def _(h, wt, idx, unit, acc, scale=None, count=None):
    return None


@_custom_op("dejavu::sparse_mlp_acc", mutates_args=("acc",))
def sparse_mlp_acc(x: Tensor, gate: Tensor, up: Tensor, down_t: Tensor, idx: Tensor, act: int, acc: Tensor,
                   count: Tensor | None = None, comp_a: Tensor | None = None, comp_bt: Tensor | None = None,
                   comp_bias: Tensor | None = None) -> None:
    """acc += (act(x @ gate[idx].T) * (x @ up[idx].T)) @ down_t[idx]: the MLP of the selected neurons
    (count: of idx[:count]), plus with comp_* the MLP compensation (x @ comp_a.T) @ comp_bt + comp_bias. On CUDA
    one launch at batch 1 (sparse_mlp_gemv), the two gather kernels at larger batches."""
    idx = _counted(idx, count)
    reference.gather_vecmat_acc(reference.gather_matvec(x, up, idx, 1, gate, act), down_t, idx, 1, acc)
    _compensation_acc(x, acc, comp_a, comp_bt, comp_bias)


def _compensation_acc(x, acc, a, bt, bias) -> None:
    if a is not None:
        acc += torch.nn.functional.linear(torch.nn.functional.linear(x, a), bt.T, bias)


def lowrank_acc(x: Tensor, a: Tensor, bt: Tensor, bias: Tensor, acc: Tensor) -> None:
    """acc += (x @ a.T) @ bt + bias: the MLP compensation where it is not inside the MLP's kernels (the exact
    two-stage top-k, whose wide selection sits between them). Two cuBLAS GEMVs: +13 % a batch-8 Llama-2-7B step,
    where the gather kernels carry it for under 1 % (BENCHMARKS.md, session 24)."""
    _compensation_acc(x, acc, a, bt, bias)


def _sparse_mlp_cuda(x, gate, up, down_t, idx, act, acc, count, cut=None, tally=None, comp=(None, None, None)) -> None:
    """One launch at batch 1 (sparse_mlp_gemv), the two gather kernels at larger batches."""
    t = _triton()
    if x.shape[0] == 1 and t.FUSED_MLP and t.fused_mlp_fits(x.shape[1]):
        t.sparse_mlp_gemv(x, gate, up, down_t, idx, act, acc, count=count, cut=cut, tally=tally,
                          compensation=None if comp[0] is None else comp)
    else:  # the compensation's two halves ride in the two kernels as rows of their own
        h = t.gather_matvec(x, up, idx, 1, gate, act, count=count, compensation=comp[0])
        t.gather_vecmat_acc(h, down_t, idx, 1, acc, count=count, cut=cut, tally=tally,
                            compensation=None if comp[0] is None else comp[1:])


@sparse_mlp_acc.register_kernel("cuda")
def _(x, gate, up, down_t, idx, act, acc, count=None, comp_a=None, comp_bt=None, comp_bias=None):
    _sparse_mlp_cuda(x, gate, up, down_t, idx, act, acc, count, comp=(comp_a, comp_bt, comp_bias))


@sparse_mlp_acc.register_fake
def _(x, gate, up, down_t, idx, act, acc, count=None, comp_a=None, comp_bt=None, comp_bias=None):
    return None


@_custom_op("dejavu::plain_mlp_acc", mutates_args=("acc",))
def plain_mlp_acc(x: Tensor, up: Tensor, up_bias: Tensor | None, down_t: Tensor, idx: Tensor, act: int, acc: Tensor,
                  count: Tensor | None = None, comp_a: Tensor | None = None, comp_bt: Tensor | None = None,
                  comp_bias: Tensor | None = None) -> None:
    """acc += act(x @ up[idx].T + up_bias[idx]) @ down_t[idx], a plain (ungated) MLP of the selected neurons
    (count: of idx[:count]), plus with comp_* the MLP compensation. On CUDA the two gather kernels, the
    compensation in them as in sparse_mlp_acc's batches."""
    idx = _counted(idx, count)
    reference.gather_vecmat_acc(reference.gather_matvec(x, up, idx, 1, None, act, bias=up_bias), down_t, idx, 1, acc)
    _compensation_acc(x, acc, comp_a, comp_bt, comp_bias)


@plain_mlp_acc.register_kernel("cuda")
def _(x, up, up_bias, down_t, idx, act, acc, count=None, comp_a=None, comp_bt=None, comp_bias=None):
    t = _triton()
    h = t.gather_matvec(x, up, idx, 1, None, act, bias=up_bias, count=count, compensation=comp_a)
    t.gather_vecmat_acc(h, down_t, idx, 1, acc, count=count,
                        compensation=None if comp_a is None else (comp_bt, comp_bias))


@plain_mlp_acc.register_fake
def _(x, up, up_bias, down_t, idx, act, acc, count=None, comp_a=None, comp_bt=None, comp_bias=None):
    return None


# A separate op rather than optional arguments of sparse_mlp_acc: torch's in-place bookkeeping fails on a
# mutated argument left to its default (None), and the tally is mutated.
@_custom_op("dejavu::sparse_mlp_cut_acc", mutates_args=("acc", "tally"))
def sparse_mlp_cut_acc(x: Tensor, gate: Tensor, up: Tensor, down_t: Tensor, idx: Tensor, act: int, acc: Tensor,
                       cut: float, tally: Tensor, count: Tensor | None = None, comp_a: Tensor | None = None,
                       comp_bt: Tensor | None = None, comp_bias: Tensor | None = None) -> None:
    """sparse_mlp_acc with down thresholds: of the selected neurons, down reads the rows where some sequence's
    |act * up| is above `cut` (each sequence's entries at or below it count as zero), and tally (int64 [2]) +=
    (rows read, 1)."""
    idx = _counted(idx, count)
    h = reference.gather_matvec(x, up, idx, 1, gate, act)
    above = h.abs() > cut
    keep = above.any(0)
    tally += torch.stack([keep.sum(), torch.ones((), dtype=torch.int64)]).to(tally)
    h = torch.where(above, h, torch.zeros((), dtype=h.dtype))[:, keep]
    reference.gather_vecmat_acc(h, down_t, idx[keep], 1, acc)
    _compensation_acc(x, acc, comp_a, comp_bt, comp_bias)


@sparse_mlp_cut_acc.register_kernel("cuda")
def _(x, gate, up, down_t, idx, act, acc, cut, tally, count=None, comp_a=None, comp_bt=None, comp_bias=None):
    _sparse_mlp_cuda(x, gate, up, down_t, idx, act, acc, count, cut, tally, (comp_a, comp_bt, comp_bias))


@sparse_mlp_cut_acc.register_fake
def _(x, gate, up, down_t, idx, act, acc, cut, tally, count=None, comp_a=None, comp_bt=None, comp_bias=None):
    return None


def _write_above(scores: Tensor, threshold: float, out: Tensor, count: Tensor, tally: Tensor) -> None:
    kept = reference.select_above(scores, threshold)
    out[:kept.numel()] = kept
    count.fill_(kept.numel())
    tally += torch.tensor([kept.numel(), 1], dtype=tally.dtype, device=tally.device)


@_custom_op("dejavu::select_above", mutates_args=("out", "count", "tally", "keys"))
def select_above(scores: Tensor, threshold: float, out: Tensor, count: Tensor, tally: Tensor, keys: Tensor) -> None:
    """Score thresholds: out[:count] = ascending units whose batch-max score is above threshold (compared in
    the scores' dtype), count [1] int32 their number, tally [2] int64 += (count, 1); keys: int32 scratch [n]
    of the CUDA kernels. out has room for every unit; entries past count are stale."""
    _write_above(scores, threshold, out, count, tally)


@select_above.register_kernel("cuda")
def _(scores, threshold, out, count, tally, keys):
    _triton().select_above(scores, threshold, out, count, tally, keys)


@select_above.register_fake
def _(scores, threshold, out, count, tally, keys):
    return None


@_custom_op("dejavu::predict_above", mutates_args=("out", "count", "tally", "keys"))
def predict_above(h: Tensor, w2: Tensor, b2: Tensor, relu: bool, threshold: float, out: Tensor, count: Tensor,
                  tally: Tensor, keys: Tensor) -> None:
    """A predictor's second layer and select_above of its scores (in h's dtype), the scores never written on CUDA."""
    _write_above(torch.nn.functional.linear(torch.relu(h) if relu else h, w2, b2), threshold, out, count, tally)


@predict_above.register_kernel("cuda")
def _(h, w2, b2, relu, threshold, out, count, tally, keys):
    _triton().predict_above(h, w2, b2, relu, threshold, out, count, tally, keys)


@predict_above.register_fake
def _(h, w2, b2, relu, threshold, out, count, tally, keys):
    return None


@_custom_op("dejavu::threshold_vecmat_acc", mutates_args=("acc",))
def threshold_vecmat_acc(h: Tensor, wt: Tensor, threshold: float, acc: Tensor) -> None:
    """acc += where(|h| > threshold, h, 0) @ wt: each sequence drops its small entries (TEAL-style); a
    row of wt is read only when some sequence keeps it."""
    reference.threshold_vecmat_acc(h, wt, threshold, acc)


@threshold_vecmat_acc.register_kernel("cuda")
def _(h, wt, threshold, acc):
    _triton().threshold_vecmat_acc(h, wt, threshold, acc)


@threshold_vecmat_acc.register_fake
def _(h, wt, threshold, acc):
    return None


@_custom_op("dejavu::rope_cache_write_acc", mutates_args=("acc", "q_out", "kc", "vc"))
def rope_cache_write_acc(acc: Tensor, q_out: Tensor, kc: Tensor, vc: Tensor, cos: Tensor, sin: Tensor,
                         pos: Tensor, q_norm: Tensor | None = None, k_norm: Tensor | None = None,
                         eps: float = 1e-6) -> None:
    """drain_acc then rope_cache_write, in one launch on CUDA: q/k/v from an fp32 accumulator [B, (NQ +
    2 NKV) * hd] (left zeroed), rotated q into q_out [B, NQ, hd], k/v into the cache at pos (q and k
    RMS-normalised per head first when q_norm / k_norm are given)."""
    batch, nq, hd = q_out.shape
    nkv = kc.shape[1]
    qkv = acc.to(q_out.dtype, copy=True)  # a copy even in fp32: acc is zeroed next
    acc.zero_()
    q_out.copy_(qkv[:, :nq * hd].view(batch, nq, hd))
    reference.rope_cache_write(q_out, qkv[:, nq * hd:(nq + nkv) * hd].view(batch, nkv, hd),
                               qkv[:, (nq + nkv) * hd:].view(batch, nkv, hd), kc, vc, cos, sin, pos, q_norm,
                               k_norm, eps)


@rope_cache_write_acc.register_kernel("cuda")
def _(acc, q_out, kc, vc, cos, sin, pos, q_norm=None, k_norm=None, eps=1e-6):
    _triton().rope_cache_write_acc(acc, q_out, kc, vc, cos, sin, pos, q_norm, k_norm, eps)


@rope_cache_write_acc.register_fake
def _(acc, q_out, kc, vc, cos, sin, pos, q_norm=None, k_norm=None, eps=1e-6):
    return None


@_custom_op("dejavu::drain_acc", mutates_args=("acc", "out"))
def drain_acc(acc: Tensor, out: Tensor) -> None:
    """out = acc in out's dtype, from an fp32 accumulator, which is left zeroed."""
    out.copy_(acc.to(out.dtype))
    acc.zero_()


@drain_acc.register_kernel("cuda")
def _(acc, out):
    _triton().drain_acc(acc, out)


@drain_acc.register_fake
def _(acc, out):
    return None


@_custom_op("dejavu::act_mul_acc", mutates_args=("acc", "out"))
def act_mul_acc(acc: Tensor, act: int, out: Tensor) -> None:
    """out = act(acc[:, :n]) * acc[:, n:] from an fp32 [gate | up] accumulator, which is left zeroed."""
    n = out.shape[1]
    out.copy_((reference.apply_activation(acc[:, :n], act) * acc[:, n:]).to(out.dtype))
    acc.zero_()


@act_mul_acc.register_kernel("cuda")
def _(acc, act, out):
    _triton().act_mul_acc(acc, act, out)


@act_mul_acc.register_fake
def _(acc, act, out):
    return None


@_custom_op("dejavu::residual_rmsnorm", mutates_args=("delta", "out", "h_out"))
def residual_rmsnorm(h: Tensor, delta: Tensor | None, weight: Tensor | None, out: Tensor, eps: float,
                     offset: float, zero_delta: bool, h_out: Tensor, delta_norm: Tensor | None = None,
                     delta_bias: Tensor | None = None, norm_bias: Tensor | None = None,
                     centered: bool = False, norm_input: bool = False) -> None:
    reference.residual_rmsnorm(h, delta, weight, out, eps, offset, zero_delta, h_out, delta_norm, delta_bias,
                               norm_bias, centered, norm_input)


@residual_rmsnorm.register_kernel("cuda")
def _(h, delta, weight, out, eps, offset, zero_delta, h_out, delta_norm=None, delta_bias=None, norm_bias=None,
      centered=False, norm_input=False):
    _triton().residual_rmsnorm(h, delta, weight, out, eps, offset, zero_delta, h_out, delta_norm, delta_bias,
                               norm_bias, centered, norm_input)


@residual_rmsnorm.register_fake
def _(h, delta, weight, out, eps, offset, zero_delta, h_out, delta_norm=None, delta_bias=None, norm_bias=None,
      centered=False, norm_input=False):
    return None


@_custom_op("dejavu::quant_scores", mutates_args=("out",))
def quant_scores(x: Tensor, up_codes: Tensor, up_scales: Tensor, up_bias: Tensor | None, gate_codes: Tensor | None,
                 gate_scales: Tensor | None, bits: int, act: int, out: Tensor) -> None:
    """out [B, n] fp32 = the quantized-weight MLP predictor's scores of x (quantized_predictor.py)."""
    out.copy_(reference.quant_scores(x, up_codes, up_scales, up_bias, gate_codes, gate_scales, bits, act))


@quant_scores.register_kernel("cuda")
def _(x, up_codes, up_scales, up_bias, gate_codes, gate_scales, bits, act, out):
    _triton().quant_scores(x, up_codes, up_scales, up_bias, gate_codes, gate_scales, bits, act, out)


@quant_scores.register_fake
def _(x, up_codes, up_scales, up_bias, gate_codes, gate_scales, bits, act, out):
    return None


@_custom_op("dejavu::select_topk", mutates_args=("out",))
def select_topk(scores: Tensor, out: Tensor) -> None:
    """out [k] = ascending indices of the top-k of the batch's per-unit max score (k = out.numel())."""
    out.copy_(reference.select_topk(scores, out.numel()))


@select_topk.register_kernel("cuda")
def _(scores, out):
    _triton().select_topk(scores, out.numel(), out)


@select_topk.register_fake
def _(scores, out):
    return None


@_custom_op("dejavu::select_topk_wide", mutates_args=("out", "keys", "hist", "meta"))
def select_topk_wide(scores: Tensor, out: Tensor, keys: Tensor, hist: Tensor, meta: Tensor) -> None:
    """select_topk's contract (out [k] ascending) from the many-program wide kernels on CUDA, for
    thousands of units where one program would be slow; keys/hist/meta as in predict_select."""
    out.copy_(reference.select_topk(scores, out.numel()))


@select_topk_wide.register_kernel("cuda")
def _(scores, out, keys, hist, meta):
    t = _triton()
    t.select_topk_wide(scores, out.numel(), out, t.TopkWorkspace.wrap(keys, hist, meta))


@select_topk_wide.register_fake
def _(scores, out, keys, hist, meta):
    return None


@_custom_op("dejavu::predict_select", mutates_args=("out", "keys", "hist", "meta"))
def predict_select(h: Tensor, w2: Tensor, b2: Tensor, relu: bool, out: Tensor, keys: Tensor, hist: Tensor,
                   meta: Tensor) -> None:
    """A predictor's second layer and its selection: out [k] = select_topk(relu?(h) @ w2.T + b2) with the
    scores in h's dtype; keys/hist/meta are the CUDA kernels' workspace (see TopkWorkspace), unused here."""
    scores = torch.nn.functional.linear(torch.relu(h) if relu else h, w2, b2)
    out.copy_(reference.select_topk(scores, out.numel()))


@predict_select.register_kernel("cuda")
def _(h, w2, b2, relu, out, keys, hist, meta):
    t = _triton()
    t.predict_select(h, w2, b2, relu, out.numel(), out, t.TopkWorkspace.wrap(keys, hist, meta))


@predict_select.register_fake
def _(h, w2, b2, relu, out, keys, hist, meta):
    return None


@_custom_op("dejavu::select_exact_up", mutates_args=("out", "keys", "hist", "meta"))
def select_exact_up(up: Tensor, logits: Tensor | None, weight: float, out: Tensor, keys: Tensor, hist: Tensor,
                    meta: Tensor) -> None:
    """Exact-up selection: out [k] = select_topk(log|up| + weight * logits) with fp32 scores that are
    never written on CUDA (one pass computes them, the batch max and the key digits); logits None ranks
    by |up| alone. keys/hist/meta: a TopkWorkspace's buffers; on CUDA a 16-bit one ranks the scores'
    fp16 rounding (ties among equal keys go to the lowest index)."""
    out.copy_(reference.select_topk(reference.exact_up_scores(up, logits, weight), out.numel()))


@select_exact_up.register_kernel("cuda")
def _(up, logits, weight, out, keys, hist, meta):
    t = _triton()
    t.select_exact_up(up, logits, weight, out.numel(), out, t.TopkWorkspace.wrap(keys, hist, meta))


@select_exact_up.register_fake
def _(up, logits, weight, out, keys, hist, meta):
    return None


@_custom_op("dejavu::rope_cache_write", mutates_args=("q", "kc", "vc"))
def rope_cache_write(q: Tensor, k: Tensor, v: Tensor, kc: Tensor, vc: Tensor, cos: Tensor, sin: Tensor,
                     pos: Tensor, q_norm: Tensor | None = None, k_norm: Tensor | None = None,
                     eps: float = 1e-6) -> None:
    reference.rope_cache_write(q, k, v, kc, vc, cos, sin, pos, q_norm, k_norm, eps)


@rope_cache_write.register_kernel("cuda")
def _(q, k, v, kc, vc, cos, sin, pos, q_norm=None, k_norm=None, eps=1e-6):
    _triton().rope_cache_write(q, k, v, kc, vc, cos, sin, pos, q_norm, k_norm, eps)


@rope_cache_write.register_fake
def _(q, k, v, kc, vc, cos, sin, pos, q_norm=None, k_norm=None, eps=1e-6):
    return None


@_custom_op("dejavu::lazy_kv_fill", mutates_args=("xcache", "kc", "vc", "last"))
def lazy_kv_fill(x: Tensor, xcache: Tensor, w: Tensor, bias: Tensor | None, heads: Tensor, group: int, kc: Tensor,
                 vc: Tensor, last: Tensor, cos: Tensor, sin: Tensor, pos: Tensor) -> None:
    reference.lazy_kv_fill(x, xcache, w, bias, heads, group, kc, vc, last, cos, sin, pos)


@lazy_kv_fill.register_kernel("cuda")
def _(x, xcache, w, bias, heads, group, kc, vc, last, cos, sin, pos):
    _triton().lazy_kv_fill(x, xcache, w, bias, heads, group, kc, vc, last, cos, sin, pos)


@lazy_kv_fill.register_fake
def _(x, xcache, w, bias, heads, group, kc, vc, last, cos, sin, pos):
    return None


@_custom_op("dejavu::decode_attention", mutates_args=())
def decode_attention(q: Tensor, kc: Tensor, vc: Tensor, heads: Tensor, group: int, pos: Tensor,
                     scale: float, start: Tensor | None = None, window: int = 0, softcap: float = 0.0) -> Tensor:
    return reference.decode_attention(q, kc, vc, heads, group, pos, scale, start, window, softcap)


@decode_attention.register_kernel("cuda")
def _(q, kc, vc, heads, group, pos, scale, start=None, window=0, softcap=0.0):
    return _triton().decode_attention(q, kc, vc, heads, group, pos, scale, start=start, window=window,
                                      softcap=softcap)


@decode_attention.register_fake
def _(q, kc, vc, heads, group, pos, scale, start=None, window=0, softcap=0.0):
    return q.new_empty(q.shape)


@_custom_op("dejavu::act_mul", mutates_args=())
def act_mul(gu: Tensor, act: int) -> Tensor:
    n = gu.shape[1] // 2
    return (reference.apply_activation(gu[:, :n].float(), act) * gu[:, n:].float()).to(gu.dtype)


@act_mul.register_kernel("cuda")
def _(gu, act):
    return _triton().act_mul(gu, act)


@act_mul.register_fake
def _(gu, act):
    return gu.new_empty(gu.shape[0], gu.shape[1] // 2)
