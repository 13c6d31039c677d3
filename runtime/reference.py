"""PyTorch versions of the decode runtime's sparse ops: the reference the Triton kernels are tested
against, and the CPU fallback (dejavu.runtime.kernels.ops dispatches here off-GPU).

Shapes (B = batch, d = hidden, K = selected units, U = rows per unit: 1 for neurons, head_dim for heads):
    gather_matvec(x [B,d], w [R,d], idx [K], unit, gate=None, act, tail=0)  -> [B, K*U + tail]
        rows r = idx[j // U] * U + j % U, then w's last `tail` rows; y = x @ w[r].T; gated: act(x @ gate[r].T) * y
    gather_vecmat_acc(h [B,K*U], wt [R,d], idx [K], unit, acc [B,d] fp32)   acc += h @ wt[r]
    threshold_vecmat_acc(h [B,R], wt [R,N], t, acc [B,N] fp32)             acc += where(|h| > t, h, 0) @ wt
    residual_rmsnorm(h, delta, weight, out, eps, offset, zero_delta, h_out)  h_out = h + delta; out = norm(h_out)
    select_topk(scores [B,n], k) -> [k]   indices (ascending) of the top-k of the batch's per-unit max
    rope_cache_write(q, k, v, kc, vc, cos, sin, pos)                         rotate q, k; cache k, v at pos
    decode_attention(q [B,Hs,hd], kc [B,KV,T,hd], vc, heads [Hs], group, pos, scale, start=None) -> [B,Hs,hd]
        start [B]: each sequence's first cache position (left padding of a batch of unequal prompts)
CPU notes (measured, see bench/mlp_kernel.py --cpu): index_select materialises the selected rows, so
gathers run in cache-sized chunks; down^T's job (a weighted sum of selected rows) is exactly
embedding_bag(mode="sum", per_sample_weights=...), which reads each row once and copies nothing.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

ACTIVATIONS = {"none": 0, "silu": 1, "gelu_tanh": 2, "relu": 3, "gelu": 4}
# Names the HF configs use, mapped onto the kernels' activation codes.
HF_ACTIVATION_NAMES = {
    "silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "relu": "relu", "gelu": "gelu",
}
CPU_CHUNK_ROWS = 256  # 256 rows x 4096 x 4 B = 4 MB: the gathered chunk is read again from cache


def activation_code(name: str) -> int:
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    if name in HF_ACTIVATION_NAMES:
        return ACTIVATIONS[HF_ACTIVATION_NAMES[name]]
    raise ValueError(f"unsupported activation {name!r}; known: {sorted(HF_ACTIVATION_NAMES)}")


def apply_activation(x: torch.Tensor, act: int) -> torch.Tensor:
    if act == 0:
        return x
    if act == 1:
        return F.silu(x)
    if act == 2:
        return F.gelu(x, approximate="tanh")
    if act == 3:
        return F.relu(x)
    if act == 4:
        return F.gelu(x)
    raise ValueError(f"unknown activation code {act}")


def expand_rows(idx: torch.Tensor, unit: int) -> torch.Tensor:
    if unit == 1:
        return idx
    return (idx[:, None] * unit + torch.arange(unit, device=idx.device)).reshape(-1)


_CHUNK_BUFFERS: dict[tuple, torch.Tensor] = {}


def _chunk_buffer(rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused gather buffer: a fresh multi-MB tensor per chunk costs page faults (measured: 13 ms
    for a 4 MB index_select into new memory, 2-core VM)."""
    key = (rows, d, dtype)
    if key not in _CHUNK_BUFFERS:
        _CHUNK_BUFFERS[key] = torch.empty(rows, d, dtype=dtype)
    return _CHUNK_BUFFERS[key]


# CPU gather-dot fused by torch.compile (inductor writes one C++ loop reading each selected row once):
# measured 14.0 ms for gate+up at density 0.3 of Llama-2-7B (fp32, 1 thread) vs 41.3 ms dense, where
# index_select + mm moved ~3x the selected bytes. Used only for large reads (compiling takes ~40 s once;
# inductor caches it on disk); DEJAVU_CPU_FUSED=0 turns it off; any compile failure falls back.
FUSED_MIN_ELEMENTS = 1 << 22
_FUSED: dict[str, object] = {}


def _fused_rows_dot(x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
    if os.environ.get("DEJAVU_CPU_FUSED", "1") == "0" or _FUSED.get("broken"):
        return None
    if "dot" not in _FUSED:
        def dot(x, w, rows):
            return (w[rows][None] * x[:, None, :]).sum(-1)

        _FUSED["dot"] = torch.compile(dot, dynamic=True)
    try:
        return _FUSED["dot"](x, w, rows)
    except Exception:  # no C++ compiler, unsupported platform...: the chunked gather still works
        _FUSED["broken"] = True
        return None


def _rows_dot(x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x @ w[rows].T: fused on CPU for large reads, else gathering in cache-sized chunks."""
    if x.device.type != "cpu" or rows.numel() <= CPU_CHUNK_ROWS:
        return x @ w.index_select(0, rows).T
    if rows.numel() * w.shape[1] >= FUSED_MIN_ELEMENTS and x.dtype == w.dtype:
        out = _fused_rows_dot(x, w, rows)
        if out is not None:
            return out
    out = torch.empty(x.shape[0], rows.numel(), dtype=x.dtype)
    buf = _chunk_buffer(CPU_CHUNK_ROWS, w.shape[1], w.dtype)
    for start in range(0, rows.numel(), CPU_CHUNK_ROWS):
        part = rows[start:start + CPU_CHUNK_ROWS]
        chunk = buf[:part.numel()]
        torch.index_select(w, 0, part, out=chunk)
        torch.mm(x, chunk.T, out=out[:, start:start + part.numel()])
    return out


def gather_matvec(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, unit: int = 1,
                  gate: torch.Tensor | None = None, act: int = 0, tail: int = 0,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """bias (no gate): w's bias, one value per row of w; each read row's is added in fp32 before the
    activation and rounding."""
    if bias is not None:
        assert gate is None and bias.numel() == w.shape[0]
        rows = torch.cat([expand_rows(idx, unit), torch.arange(w.shape[0] - tail, w.shape[0], device=idx.device)])
        # the product in w's dtype (w.float() copied all of w, every call: 4.6x slower than dense on the
        # CPU at 7B shapes), then the bias and activation in fp32
        return apply_activation(gather_matvec(x, w, idx, unit, None, 0, tail).float()
                                + bias.float().index_select(0, rows), act).to(x.dtype)
    if tail:
        # the tail rows are contiguous: a plain matmul on their view, no gather
        head = gather_matvec(x, w[:w.shape[0] - tail], idx, unit, gate, act)
        rest = apply_activation((x @ w[w.shape[0] - tail:].T).float(), act).to(x.dtype)
        return torch.cat([head, rest], dim=1)
    rows = expand_rows(idx, unit)
    y = _rows_dot(x, w, rows)
    if gate is not None:
        g = _rows_dot(x, gate, rows)
        return (apply_activation(g.float(), act) * y.float()).to(x.dtype)
    return apply_activation(y.float(), act).to(x.dtype)


# embedding_bag spreads its bags over the CPU threads, one thread per bag: a batch-1 read of a weight
# matrix as one bag ran on one core. Measured with 2 threads: Llama-2-7B's down projection at keep 0.5,
# 10.8 ms as one bag and 5.6-6.0 ms as 2-8 bags (dense 11.4 ms); SmolLM2's matrices (0.7-5.7 MB
# read), 1.3-1.6x faster as 2 bags. A bag reads at least this many bytes.
MIN_BAG_BYTES = 1 << 18


def gather_vecmat_acc(h: torch.Tensor, wt: torch.Tensor, idx: torch.Tensor, unit: int,
                      acc: torch.Tensor) -> None:
    rows = expand_rows(idx, unit)
    if rows.numel() == 0:  # nothing selected (score thresholds above every score): nothing to add
        return
    if h.device.type == "cpu" and wt.dtype == h.dtype:
        # A weighted sum of selected rows without copying them: each batch row's rows split into
        # bags (enough to occupy every thread), whose partial sums are then added.
        batch, count = h.shape[0], rows.numel()
        splits = max(1, min(torch.get_num_threads() // batch, count * wt[0].nbytes // MIN_BAG_BYTES))
        if splits == 1:
            acc += F.embedding_bag(rows.expand(batch, -1), wt, mode="sum", per_sample_weights=h).to(acc.dtype)
            return
        size = -(-count // splits)
        starts = torch.arange(0, count, size)
        offsets = (torch.arange(batch)[:, None] * count + starts).flatten()
        parts = F.embedding_bag(rows.repeat(batch), wt, offsets, mode="sum", per_sample_weights=h.flatten())
        acc += parts.view(batch, starts.numel(), -1).sum(1, dtype=acc.dtype)
        return
    acc += (h @ wt.index_select(0, rows)).to(acc.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """HF Llama/Gemma RMSNorm: normalise in fp32; Gemma scales by (1 + w)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (xf * (offset + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm (OPT) in fp32, rounded to x's dtype."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), None if bias is None else bias.float(),
                        eps).to(x.dtype)


def residual_rmsnorm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor | None,
                     out: torch.Tensor, eps: float, offset: float = 0.0, zero_delta: bool = False,
                     h_out: torch.Tensor | None = None, delta_norm: torch.Tensor | None = None,
                     delta_bias: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None,
                     centered: bool = False, norm_input: bool = False) -> None:
    """h_out = h + delta (h itself when h_out is None); out = RMSNorm(h_out) (h_out itself without a weight);
    delta zeroed if asked. No delta: out = RMSNorm(h). delta_bias: added to delta first (a block's output
    bias: OPT). delta_norm: delta is then rounded to h's dtype and RMS-normalised with these weights (a
    block's output norm: Gemma 2/3, OLMo 2). centered: the norm is a LayerNorm (OPT), plus norm_bias.
    norm_input: out normalises h as it was before the add (a parallel block's MLP reads the block input:
    GPT-NeoX), while h_out still gets the sum."""
    # (a copy only where the sum overwrites h itself)
    overwritten = h_out is None or h_out.data_ptr() == h.data_ptr()
    source = (h.clone() if overwritten else h) if norm_input else None
    if delta is not None:
        target = h if h_out is None else h_out
        step = delta if delta_bias is None else delta.float() + delta_bias.float()
        if delta_norm is not None:
            step = rms_norm(step.to(h.dtype), delta_norm, eps, offset)
        target.copy_((h.float() + step.float()).to(h.dtype))
        h = target
        if zero_delta:
            delta.zero_()
    if source is not None:
        h = source
    if weight is None:
        out.copy_(h)
    elif centered:
        out.copy_(layer_norm(h, weight, norm_bias, eps))
    else:
        out.copy_(rms_norm(h, weight, eps, offset))


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest per-unit maxima over the batch, ascending (rows then stream in order)."""
    return torch.topk(_batch_max(scores).float(), k, sorted=False).indices.sort().values


def _batch_max(scores: torch.Tensor) -> torch.Tensor:
    """Each unit's highest score over the batch [n]: a unit any sequence selects is selected for the batch."""
    return scores.amax(0) if scores.shape[0] > 1 else scores[0]


def select_above(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the units whose per-unit max over the batch is above threshold, ascending (score
    thresholds: a unit any sequence keeps). Compared in the scores' dtype, as runtime.apply compares."""
    return (_batch_max(scores) > threshold).nonzero().flatten()


def exact_up_scores(up: torch.Tensor, logits: torch.Tensor | None, weight: float) -> torch.Tensor:
    """Exact-up MLP ranking (runtime/apply.py): fp32 log|up| + weight * predictor logit, [B, n]."""
    score = up.float().abs().clamp_min(1e-30).log()
    return score if logits is None else score + weight * logits.float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return (x.float() * cos + torch.cat((-x2, x1), dim=-1).float() * sin).to(x.dtype)


def rope_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, q_norm: torch.Tensor | None = None,
                     k_norm: torch.Tensor | None = None, eps: float = 1e-6) -> None:
    """q [B,Hs,hd] rotated in place; k, v [B,KV,hd] written (k rotated) at cache position pos [1].

    q_norm, k_norm [hd]: families that RMS-normalise each head's q and k before rope (Qwen3) pass
    their weights; both or neither."""
    c = cos.index_select(0, pos)  # [1, hd]
    s = sin.index_select(0, pos)
    if q_norm is not None:
        q.copy_(rms_norm(q, q_norm, eps))
        k = rms_norm(k, k_norm, eps)
    q.copy_(_rotate(q, c, s))
    if k.shape[1]:  # none: the caller writes k/v itself (lazy_kv_fill)
        kc.index_copy_(2, pos, _rotate(k, c, s).unsqueeze(2))
        vc.index_copy_(2, pos, v.unsqueeze(2).to(vc.dtype))


def lazy_kv_fill(x: torch.Tensor, xcache: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                 heads: torch.Tensor, group: int, kc: torch.Tensor, vc: torch.Tensor, last: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> None:
    """k/v of the KV groups the selected heads read, for every position they lack, up to pos.

    x [B, d] is the attention input of position pos; it is stored in xcache [B, T, d] so that a group
    skipped now can be computed later from it. last [2, KV] (int32) holds, per group, the last position
    whose k/v are in the cache: row pos % 2 is read, row (pos + 1) % 2 written (two rows so that the Triton
    kernel's programs never read a value another program of the same launch is writing). A group's
    missing positions are always the run last+1 .. pos, since computing a group fills all of its gap.
    w is the fused [(H + 2KV) * hd, d] qkv weight, bias its bias or None."""
    p = int(pos.item())
    num_kv, hd = kc.shape[1], kc.shape[3]
    num_q = w.shape[0] // hd - 2 * num_kv
    xcache[:, p] = x
    last_in, last_out = last[p % 2], last[(p + 1) % 2]
    need = torch.zeros(num_kv, dtype=torch.bool, device=heads.device)
    need[heads // group] = True
    last_out.copy_(torch.where(need, torch.full_like(last_in, p), last_in))

    def project(inputs: torch.Tensor, groups: torch.Tensor, start: int) -> None:
        """k (rotated) and v of `groups` for inputs [B, m, d] at positions start.., into the cache."""
        units = torch.cat([num_q + groups, num_q + num_kv + groups])  # k rows, then v rows
        kv = gather_matvec(inputs.reshape(-1, inputs.shape[-1]), w, units, hd)
        if bias is not None:
            kv = kv + bias.view(-1, hd)[units].reshape(-1)
        k, v = kv.view(*inputs.shape[:2], 2, groups.numel(), hd).transpose(1, 3).unbind(2)  # [B, G, m, hd]
        end = start + inputs.shape[1]
        kc[:, groups, start:end] = _rotate(k, cos[start:end], sin[start:end]).to(kc.dtype)
        vc[:, groups, start:end] = v.to(vc.dtype)

    groups = need.nonzero().flatten()
    project(x[:, None], groups, p)  # this position, every read group at once (the common case: no gap)
    for g in groups.tolist():  # earlier positions the group skipped
        start = int(last_in[g]) + 1
        if start < p:
            project(xcache[:, start:p], groups.new_tensor([g]), start)


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, heads: torch.Tensor, group: int,
                     pos: torch.Tensor, scale: float, start: torch.Tensor | None = None, window: int = 0,
                     softcap: float = 0.0) -> torch.Tensor:
    """Attention of one new token per sequence over cache positions [start[b], pos] for the given q heads
    (start: None = 0 for every sequence); window > 0: only the last `window` of them (sliding window);
    softcap > 0: scores -> softcap * tanh(scores / softcap) (Gemma 2)."""
    length = int(pos.item()) + 1
    first = max(0, length - window) if window else 0
    # the positions first: gathering heads over the whole cache copied all of it every step
    k, v = kc[:, :, first:length], vc[:, :, first:length]
    batch, hs, hd = q.shape
    # left padding: positions before a sequence's start weigh nothing (a mask over [B, length - first])
    pad = None if start is None else (
        torch.arange(first, length, device=q.device)[None] < start.to(q.device)[:, None])

    def cap(scores: torch.Tensor) -> torch.Tensor:
        return torch.tanh(scores / softcap) * softcap if softcap else scores

    if hs == kc.shape[1] * group and torch.equal(heads, torch.arange(hs, device=heads.device)):
        # every head: each KV head's group of q heads reads it once, with no copy per q head
        qg = q.reshape(batch, kc.shape[1], group, hd).float()
        scores = cap(torch.einsum("bkgd,bkld->bkgl", qg, k.float()) * scale)
        if pad is not None:
            scores = scores.masked_fill(pad[:, None, None], float("-inf"))
        return torch.einsum("bkgl,bkld->bkgd", scores.softmax(-1), v.float()).reshape(batch, hs, hd).to(q.dtype)
    kv = heads // group
    k, v = k.index_select(1, kv).float(), v.index_select(1, kv).float()  # [B, Hs, L, hd]
    scores = cap(torch.einsum("bhd,bhld->bhl", q.float(), k) * scale)
    if pad is not None:
        scores = scores.masked_fill(pad[:, None], float("-inf"))
    return torch.einsum("bhl,bhld->bhd", scores.softmax(-1), v).to(q.dtype)


def threshold_vecmat_acc(h: torch.Tensor, wt: torch.Tensor, threshold: float, acc: torch.Tensor) -> None:
    """acc += where(|h| > threshold, h, 0) @ wt, per sequence (TEAL-style magnitude sparsity)."""
    keep = h.abs() > threshold
    if h.device.type == "cpu" and h.shape[0] == 1:
        # one sequence: its kept entries are the weights, no masking (fewer small ops per call)
        rows = keep[0].nonzero().flatten()
        if rows.numel():
            gather_vecmat_acc(h.index_select(1, rows), wt, rows, 1, acc)
        return
    masked = torch.where(keep, h, torch.zeros((), dtype=h.dtype))
    if h.device.type == "cpu":
        # only the rows some sequence keeps, read once (embedding_bag in gather_vecmat_acc)
        rows = keep.any(0).nonzero().flatten()
        if rows.numel():
            gather_vecmat_acc(masked.index_select(1, rows), wt, rows, 1, acc)
        return
    acc += (masked @ wt).to(acc.dtype)


def sparse_mlp(x: torch.Tensor, gate: torch.Tensor | None, up: torch.Tensor, down_t: torch.Tensor,
               idx: torch.Tensor, act: int) -> torch.Tensor:
    """The whole sparse MLP in fp32 (a test oracle): down(act(gate x) * up x) over the selected neurons."""
    acc = torch.zeros(x.shape[0], down_t.shape[1], dtype=torch.float32, device=x.device)
    h = gather_matvec(x, up, idx, 1, gate, act)
    gather_vecmat_acc(h, down_t, idx, 1, acc)
    return acc


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def quant_scores(x: torch.Tensor, up_codes: torch.Tensor, up_scales: torch.Tensor, up_bias: torch.Tensor | None,
                 gate_codes: torch.Tensor | None, gate_scales: torch.Tensor | None, bits: int,
                 act: int) -> torch.Tensor:
    """The quantized MLP predictor's scores (quantized_predictor.py) of x [B, d], fp32 [B, n]: |act(x g~^T) *
    (x u~^T)|, or |act(x u~^T + bias)| without a gate; codes and scales in the kernel's layout
    (quantized_predictor.tile_rows). Dequantizes every call: the CPU decode loop keeps dequantized copies
    instead (runtime/decode.py QuantizedSelector)."""
    from dejavu.quantized_predictor import dequantize_rows, untile_rows

    def weight(codes, scales):
        return dequantize_rows(*untile_rows(codes, scales), bits)

    xf = x.float()
    up = xf @ weight(up_codes, up_scales).T
    if gate_codes is None:
        if up_bias is not None:
            up = up + up_bias.float()
        return apply_activation(up, act).abs()
    gate = xf @ weight(gate_codes, gate_scales).T
    return (apply_activation(gate, act) * up).abs()
