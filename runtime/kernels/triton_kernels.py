"""Triton kernels for sparse decode (batch 1-8), one launch each, no host synchronisation.

Weights are laid out once at load time so every kernel reads whole rows (coalesced, 16-byte loads):
gate and up as [n, d] each, down and o as their transposes [n, d] / [H*hd, d], q as the first H*hd rows
of the fused [(H+2KV)*hd, d] qkv weight. A "unit" is a group of consecutive rows selected together:
1 row for an MLP neuron, head_dim rows for an attention head, so the same kernels serve both.

Batch 1 reduces with elementwise products (a GEMV: tensor cores idle, bytes are the cost); batch 2-8
pads the batch to 16 and uses tl.dot, which reads each weight tile once for the whole batch.
The down/o kernel splits the selected rows over programs and adds its partial sums into an fp32
accumulator with atomics (at batch 1 the MLP's gate, up and down run in one kernel, sparse_mlp_gemv); the next fused residual+RMSNorm kernel consumes that accumulator and
zeroes it for the next layer, so no separate memset or reduction launch is needed.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

DOT_BATCH = 16  # tl.dot needs M >= 16: batches 2..16 are padded to this
# (BLOCK_R, BLOCK_D, num_warps) of the gather kernel's tl.dot path; a module setting so benches can
# compare tile shapes inside the whole decode loop (bench/decode_speed.py --gemm-tiles); "by-rows" is
# the earlier rule (32x128 when the rows fill the SMs, else 16x256), kept for that comparison
GEMM_TILES: tuple | str = (32, 128, 4)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(t: torch.Tensor) -> int:
    return _num_sms(t.device.index or 0) if t.is_cuda else 132


def _pow2_floor(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def _precision(t: torch.Tensor) -> str:
    # fp32 inputs (tests, CPU-sized models) get exact products, not tf32
    return "ieee" if t.dtype == torch.float32 else "tf32"


# Programmatic dependent launch (Hopper and later): each kernel may be launched while the previous one in
# its stream is still running, and waits at its start for that one to finish and its writes to be
# visible. A decode step is ~300 dependent launches, each otherwise paying its launch latency after the
# previous kernel's tail. DEJAVU_PDL=0 (or setting USE_PDL) turns it off, e.g. to measure it.
USE_PDL = os.environ.get("DEJAVU_PDL", "1") != "0"


@functools.lru_cache(maxsize=8)
def _supports_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether kernels over tensors on t's device launch with PDL (on, and the GPU has it)."""
    return USE_PDL and t.is_cuda and _supports_pdl(t.device.index or 0)


def _pdl(t: torch.Tensor) -> dict:
    """Launch options of a kernel over tensors on t's device."""
    on = pdl_enabled(t)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def _grid_dependency(PDL: tl.constexpr):
    if PDL:
        # wait for the previous kernel (a no-op without PDL), then let the next one launch early
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _activation(x, ACT: tl.constexpr):
    y = x
    if ACT == 1:  # silu
        y = x * tl.sigmoid(x)
    if ACT == 2:  # gelu, tanh approximation; tanh(z) = 2 sigmoid(2z) - 1
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (2.0 * tl.sigmoid(2.0 * inner))
    if ACT == 3:  # relu
        y = tl.maximum(x, 0.0)
    if ACT == 4:  # gelu, erf
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return y


# ------------------------------------------------------------------------------------------------
# gather_matvec: y[b, j] = act(x[b] . gate[r_j]) * (x[b] . w[r_j])   (or act(x[b] . w[r_j]) ungated)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _gather_gemv_kernel(x_ptr, w_ptr, g_ptr, idx_ptr, out_ptr, bias_ptr, nsel_ptr, D, NROWS, NSEL, TAIL_START,
                        stride_w, UNIT: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                        HAS_BIAS: tl.constexpr = False, HAS_COUNT: tl.constexpr = False, PDL: tl.constexpr = False):
    _grid_dependency(PDL)
    pid = tl.program_id(0)
    if HAS_COUNT:  # the first *nsel_ptr entries of idx are the selection (no tail); the grid covers all of idx
        NSEL = tl.load(nsel_ptr)
        NROWS = NSEL
        if pid * BLOCK_R >= NSEL:
            return
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < NROWS
    sel = offs_r < NSEL
    unit = tl.load(idx_ptr + offs_r // UNIT, mask=mask_r & sel, other=0).to(tl.int64)
    rows = tl.where(sel, unit * UNIT + (offs_r % UNIT), TAIL_START + offs_r - NSEL)
    offs_d = tl.arange(0, BLOCK_D)
    w_rows = w_ptr + rows[:, None] * stride_w
    g_rows = g_ptr + rows[:, None] * stride_w
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        if EVEN_D:
            xv = tl.load(x_ptr + d).to(tl.float32)
            wv = tl.load(w_rows + d[None, :], mask=mask_r[:, None], other=0.0).to(tl.float32)
        else:
            xv = tl.load(x_ptr + d, mask=d < D, other=0.0).to(tl.float32)
            wv = tl.load(w_rows + d[None, :], mask=mask_r[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(wv * xv[None, :], axis=1)
        if GATED:
            if EVEN_D:
                gv = tl.load(g_rows + d[None, :], mask=mask_r[:, None], other=0.0).to(tl.float32)
            else:
                gv = tl.load(g_rows + d[None, :], mask=mask_r[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
            acc_g += tl.sum(gv * xv[None, :], axis=1)
    if HAS_BIAS:  # (not with GATED) the bias of each weight row read
        acc += tl.load(bias_ptr + rows, mask=mask_r, other=0.0).to(tl.float32)
    if GATED:
        y = _activation(acc_g, ACT) * acc
    else:
        y = _activation(acc, ACT)
    tl.store(out_ptr + offs_r, y.to(out_ptr.dtype.element_ty), mask=mask_r)


@triton.jit
def _gather_gemm_kernel(x_ptr, w_ptr, g_ptr, idx_ptr, out_ptr, part_ptr, count_ptr, bias_ptr, nsel_ptr, B, D,
                        D_PER_SPLIT, NROWS, NSEL, TAIL_START, stride_xb, stride_w, stride_ob, stride_pb, stride_pp,
                        UNIT: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
                        B_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr = False,
                        HAS_COUNT: tl.constexpr = False, comp_ptr=None, COMP_OUT=0, MAIN_BLOCKS=0,
                        COMP_R: tl.constexpr = 0, PDL: tl.constexpr = False):
    _grid_dependency(PDL)
    pid = tl.program_id(0)
    # COMP_R > 0: the MLP compensation's first half, z = x a^T, in the row blocks after the MAIN_BLOCKS of
    # the selection: rows of comp_ptr (a, [COMP_R, D]) with no gate, bias or activation, written to out's
    # columns COMP_OUT + j, where the down kernel reads them (no launches of their own: two cuBLAS GEMVs
    # a layer cost 13 % of a batch-8 Llama-2-7B step, BENCHMARKS.md)
    is_comp = pid >= MAIN_BLOCKS if COMP_R > 0 else False
    if HAS_COUNT:  # as in _gather_gemv_kernel; a row block wholly past the count is skipped by all its splits
        NSEL = tl.load(nsel_ptr)
        NROWS = NSEL
        if (pid * BLOCK_R >= NSEL) & (pid < MAIN_BLOCKS):
            return
    d_start = tl.program_id(1) * D_PER_SPLIT
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < NROWS
    sel = offs_r < NSEL
    unit = tl.load(idx_ptr + offs_r // UNIT, mask=mask_r & sel, other=0).to(tl.int64)
    rows = tl.where(sel, unit * UNIT + (offs_r % UNIT), TAIL_START + offs_r - NSEL)
    w_rows = w_ptr + rows[:, None] * stride_w
    out_cols = offs_r  # also the columns of its split sums: the term's after the selection's, as in out
    mask_g = mask_r
    if COMP_R > 0:
        if is_comp:
            local = (pid - MAIN_BLOCKS) * BLOCK_R + tl.arange(0, BLOCK_R)
            mask_r = local < COMP_R
            w_rows = comp_ptr + local[:, None].to(tl.int64) * D
            out_cols = COMP_OUT + local
            mask_g = local < 0
    offs_b = tl.arange(0, B_PAD)
    mask_b = offs_b < B
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((B_PAD, BLOCK_R), dtype=tl.float32)
    acc_g = tl.zeros((B_PAD, BLOCK_R), dtype=tl.float32)
    for d0 in range(d_start, tl.minimum(D, d_start + D_PER_SPLIT), BLOCK_D):
        d = d0 + offs_d
        mask_d = d < D
        xv = tl.load(x_ptr + offs_b[:, None] * stride_xb + d[None, :], mask=mask_b[:, None] & mask_d[None, :],
                     other=0.0)
        wv = tl.load(w_rows + d[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(xv, tl.trans(wv), acc, input_precision=PRECISION)
        if GATED:
            gv = tl.load(g_ptr + rows[:, None] * stride_w + d[None, :], mask=mask_g[:, None] & mask_d[None, :],
                         other=0.0)
            acc_g = tl.dot(xv, tl.trans(gv), acc_g, input_precision=PRECISION)
    mask_br = mask_b[:, None] & mask_r[None, :]
    if SPLIT:  # partial dot products, finished by the row block's last program
        part = part_ptr + offs_b[:, None] * stride_pb + out_cols[None, :]
        tl.atomic_add(part, acc, mask=mask_br, sem="relaxed")
        if GATED:
            tl.atomic_add(part + stride_pp, acc_g, mask=mask_br, sem="relaxed")
        # The last program to add its share (counted with release/acquire, after every thread's adds)
        # takes the sums, leaving them and the count zeroed for the next call: one launch fewer than
        # a finishing kernel (measured on the H100: 53.7 against 55.2 us for the MLP at density 0.5).
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if arrived == tl.num_programs(1) - 1:
            tl.debug_barrier()
            # sums read where the atomics made them (adding 0), then zeroed: no other program adds now
            zero = tl.zeros((B_PAD, BLOCK_R), dtype=tl.float32)
            u = tl.atomic_add(part, zero, mask=mask_br, sem="relaxed")
            tl.store(part, zero, mask=mask_br)
            if HAS_BIAS:  # (not with GATED) the bias of each weight row read
                u += tl.load(bias_ptr + rows, mask=mask_g, other=0.0).to(tl.float32)[None, :]
            if GATED:
                g = tl.atomic_add(part + stride_pp, zero, mask=mask_br, sem="relaxed")
                tl.store(part + stride_pp, zero, mask=mask_br)
                y = _activation(g, ACT) * u
            else:
                y = _activation(u, ACT)
            if COMP_R > 0:
                y = tl.where(is_comp, u, y)
            tl.store(out_ptr + offs_b[:, None] * stride_ob + out_cols[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=mask_br)
            tl.store(count_ptr + pid, 0)
    else:
        if HAS_BIAS:  # (not with GATED) the bias of each weight row read
            acc += tl.load(bias_ptr + rows, mask=mask_g, other=0.0).to(tl.float32)[None, :]
        if GATED:
            y = _activation(acc_g, ACT) * acc
        else:
            y = _activation(acc, ACT)
        if COMP_R > 0:
            y = tl.where(is_comp, acc, y)
        tl.store(out_ptr + offs_b[:, None] * stride_ob + out_cols[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=mask_br)


def split_workspace(device, rows: int) -> torch.Tensor:
    """Zeroed scratch of the split gather: fp32 partial sums [2 (up, gate), DOT_BATCH, rows], then one
    int32 arrival count per row block. Each call leaves it zeroed, so a CUDA graph replays without a
    memset. Calls that may run at once (the predictors' side stream and the main stream) need one each."""
    rows = max(rows, 1024)
    return torch.zeros(2 * DOT_BATCH * rows + rows, device=device, dtype=torch.float32)


def _split_views(ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = ws.numel() // (2 * DOT_BATCH + 1)
    return ws[:2 * DOT_BATCH * rows].view(2, DOT_BATCH, rows), ws[2 * DOT_BATCH * rows:].view(torch.int32)


# The main stream's split workspace, per device; the decode loop's warm-up steps allocate it before capture.
_split_workspaces: dict = {}


def _shared_workspace(device: torch.device, rows: int) -> torch.Tensor:
    ws = _split_workspaces.get(device)
    if ws is None or _split_views(ws)[0].shape[2] < rows:
        ws = split_workspace(device, rows)
        _split_workspaces[device] = ws
    return ws


def gemm_splits(nrows: int, d: int, block_r: int, block_d: int, sms: int) -> int:
    """Splits of d so that about four programs per SM run: few selected rows (low density) would
    otherwise leave most SMs idle and the kernel far below copy bandwidth."""
    programs = triton.cdiv(nrows, block_r)
    return max(1, min(8, d // block_d, _pow2_floor(max(1, 4 * sms // programs))))


def gemv_config(nrows: int, sms: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for batch 1: about four programs per SM, 8K-element tiles."""
    block_r = max(1, min(16, _pow2_floor(max(1, nrows // (4 * sms)))))
    block_d = max(256, min(2048, 8192 // block_r))
    return block_r, block_d, 4


def gather_matvec(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, unit: int = 1,
                  gate: torch.Tensor | None = None, act: int = 0, tail: int = 0,
                  config: tuple | None = None, bias: torch.Tensor | None = None,
                  workspace: torch.Tensor | None = None, count: torch.Tensor | None = None,
                  compensation: torch.Tensor | None = None) -> torch.Tensor:
    """Rows idx (x unit) of w, then its last `tail` rows (q of the selected heads + all of k, v); bias
    (not with gate): w's bias, one value per row of w, each read row's added in fp32 before the activation;
    workspace: the caller's split_workspace (default: one shared per device, for the main stream);
    count (int32 [1], unit 1, no tail): only idx[:count] is selected, output columns past it are not written;
    compensation (a [R, d], x's dtype): R more output columns after the selection's, x @ a.T (the MLP
    compensation's first half, for gather_vecmat_acc's compensation)."""
    assert count is None or (unit == 1 and tail == 0 and count.dtype == torch.int32)
    batch, d = x.shape
    nsel = idx.numel() * unit
    nrows = nsel + tail
    tail_start = w.shape[0] - tail
    comp_r = 0 if compensation is None else compensation.shape[0]
    assert x.stride(1) == 1 and w.stride(1) == 1 and x.dtype == w.dtype
    if gate is not None:
        assert gate.stride() == w.stride() and gate.dtype == w.dtype and bias is None
    if bias is not None:
        assert bias.is_contiguous() and bias.numel() == w.shape[0]
    if compensation is not None:
        assert compensation.is_contiguous() and compensation.shape[1] == d and compensation.dtype == x.dtype
    out = torch.empty(batch, nrows + comp_r, device=x.device, dtype=x.dtype)
    g = gate if gate is not None else w
    if batch == 1 and x.dtype == torch.float32 and config is None and compensation is None:  # exact fp32 products
        block_r, block_d, warps = gemv_config(nrows, _sms(x))
        block_d = min(block_d, triton.next_power_of_2(d))
        grid = (triton.cdiv(nrows, block_r),)
        _gather_gemv_kernel[grid](x, w, g, idx, out, out if bias is None else bias, idx if count is None else count,
                                  d, nrows, nsel, tail_start, w.stride(0), UNIT=unit, GATED=gate is not None,
                                  ACT=act, BLOCK_R=block_r, BLOCK_D=block_d, EVEN_D=d % block_d == 0,
                                  HAS_BIAS=bias is not None, HAS_COUNT=count is not None, num_warps=warps, **_pdl(x))
        return out
    assert batch <= DOT_BATCH, f"batch {batch} > {DOT_BATCH}"
    # measured (bench/mlp_kernel.py, H100): 32x128 tiles, with d split over programs when few rows are
    # selected, at or within 2 % of the best of seven tile shapes at every density and batch
    tiles = GEMM_TILES if GEMM_TILES != "by-rows" else ((32, 128, 4) if nrows >= 48 * _sms(x) else (16, 256, 4))
    block_r, block_d, warps = (config or tiles)[:3]
    splits = config[3] if config is not None and len(config) > 3 else gemm_splits(nrows + comp_r, d, block_r,
                                                                                    block_d, _sms(x))
    d_per_split = triton.cdiv(triton.cdiv(d, splits), block_d) * block_d
    splits = triton.cdiv(d, d_per_split)
    main_blocks = triton.cdiv(nrows, block_r)
    blocks = main_blocks + triton.cdiv(comp_r, block_r)
    if splits > 1:
        part, counts = _split_views(workspace if workspace is not None
                                    else _shared_workspace(x.device, nrows + comp_r))
        assert part.shape[2] >= nrows + comp_r and counts.numel() >= blocks
    else:
        part, counts = out, idx
    grid = (blocks, splits)
    _gather_gemm_kernel[grid](x, w, g, idx, out, part, counts, out if bias is None else bias,
                              idx if count is None else count, batch, d, d_per_split, nrows, nsel, tail_start,
                              x.stride(0), w.stride(0), out.stride(0), part.stride(-2),
                              part.stride(0) if splits > 1 else 0,
                              UNIT=unit, GATED=gate is not None, ACT=act, B_PAD=DOT_BATCH, BLOCK_R=block_r,
                              BLOCK_D=block_d, PRECISION=_precision(x), SPLIT=splits > 1, HAS_BIAS=bias is not None,
                              HAS_COUNT=count is not None, comp_ptr=x if compensation is None else compensation,
                              COMP_OUT=nrows, MAIN_BLOCKS=main_blocks, COMP_R=comp_r, num_warps=warps, num_stages=3,
                              **_pdl(x))
    return out


# ------------------------------------------------------------------------------------------------
# gather_vecmat_acc: acc[b, :] += sum_j h[b, j] * wt[r_j, :]
# ------------------------------------------------------------------------------------------------
@triton.jit
def _gather_vecmat_kernel(h_ptr, wt_ptr, idx_ptr, acc_ptr, scale_ptr, nsel_ptr, B, D, NROWS, ROWS_PER_SPLIT,
                          stride_hb, stride_w, stride_ab, stride_sb, UNIT: tl.constexpr, B_PAD: tl.constexpr,
                          USE_DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                          PRECISION: tl.constexpr, SCALE: tl.constexpr = False, HAS_COUNT: tl.constexpr = False,
                          CUT: tl.constexpr = False, cut=0.0, tally_ptr=None, comp_ptr=None, comp_bias_ptr=None,
                          COMP_H=0, COMP_R: tl.constexpr = 0, PDL: tl.constexpr = False):
    _grid_dependency(PDL)
    # COMP_R > 0: the last split adds the MLP compensation's second half, h[:, COMP_H + j] * comp[j, :] over
    # its COMP_R rows (b^T, always read), and its bias; the selection's rows are shared by the splits before it
    main_splits = tl.num_programs(1) - 1 if COMP_R > 0 else tl.num_programs(1)
    if HAS_COUNT:  # only the first *nsel_ptr rows of idx: shared equally by the selection's splits
        NROWS = tl.load(nsel_ptr)
        ROWS_PER_SPLIT = tl.cdiv(tl.cdiv(NROWS, main_splits), BLOCK_R) * BLOCK_R
    # CUT (down thresholds, UNIT 1, no SCALE): h[b, j] counts only when |h[b, j]| > cut, and a row's weights are
    # read only when some sequence's does; tally_ptr [2] int64 sums (rows read, calls)
    # SCALE (UNIT 1): h[b, j] is first multiplied by scale[b, idx[j]] (rounded to h's dtype, as a
    # separate multiply would); exact-up passes up's full output so its gathered copy is never written
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_b = tl.arange(0, B_PAD)
    mask_b = offs_b < B
    start = pid_s * ROWS_PER_SPLIT
    stop = start + ROWS_PER_SPLIT
    if COMP_R > 0:
        if pid_s == main_splits:
            stop = start
    if USE_DOT:
        acc = tl.zeros((B_PAD, BLOCK_D), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    kept = 0
    for r0 in range(start, stop, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < NROWS
        unit = tl.load(idx_ptr + offs_r // UNIT, mask=mask_r, other=0).to(tl.int64)
        rows = unit * UNIT + (offs_r % UNIT)
        if CUT:  # h first: it decides which rows' weights are read
            if USE_DOT:
                hv = tl.load(h_ptr + offs_b[:, None] * stride_hb + offs_r[None, :],
                             mask=mask_b[:, None] & mask_r[None, :], other=0.0)
                above = tl.abs(hv.to(tl.float32)) > cut
                hv = tl.where(above, hv, 0.0).to(hv.dtype)
                keep = mask_r & (tl.max(above.to(tl.int32), axis=0) > 0)
            else:
                hv = tl.load(h_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
                keep = mask_r & (tl.abs(hv) > cut)
                hv = tl.where(keep, hv, 0.0)
            kept += tl.sum(keep.to(tl.int32))
            wv = tl.load(wt_ptr + rows[:, None] * stride_w + offs_d[None, :], mask=keep[:, None] & mask_d[None, :],
                         other=0.0)
            if USE_DOT:
                acc = tl.dot(hv, wv, acc, input_precision=PRECISION)
            else:
                acc += tl.sum(wv.to(tl.float32) * hv[:, None], axis=0)
        else:
            wv = tl.load(wt_ptr + rows[:, None] * stride_w + offs_d[None, :], mask=mask_r[:, None] & mask_d[None, :],
                         other=0.0)
            if USE_DOT:
                hv = tl.load(h_ptr + offs_b[:, None] * stride_hb + offs_r[None, :],
                             mask=mask_b[:, None] & mask_r[None, :], other=0.0)
                if SCALE:
                    sv = tl.load(scale_ptr + offs_b[:, None] * stride_sb + unit[None, :],
                                 mask=mask_b[:, None] & mask_r[None, :], other=0.0)
                    hv = (hv.to(tl.float32) * sv.to(tl.float32)).to(hv.dtype)
                acc = tl.dot(hv, wv, acc, input_precision=PRECISION)
            else:
                hv = tl.load(h_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
                if SCALE:
                    hv = (hv * tl.load(scale_ptr + unit, mask=mask_r, other=0.0).to(tl.float32)).to(
                        h_ptr.dtype.element_ty).to(tl.float32)
                acc += tl.sum(wv.to(tl.float32) * hv[:, None], axis=0)
    if COMP_R > 0:
        if pid_s == main_splits:
            for r0 in range(0, COMP_R, BLOCK_R):
                offs_c = r0 + tl.arange(0, BLOCK_R)
                mask_c = offs_c < COMP_R
                wv = tl.load(comp_ptr + offs_c[:, None] * D + offs_d[None, :], mask=mask_c[:, None] & mask_d[None, :],
                             other=0.0)
                if USE_DOT:
                    hv = tl.load(h_ptr + offs_b[:, None] * stride_hb + COMP_H + offs_c[None, :],
                                 mask=mask_b[:, None] & mask_c[None, :], other=0.0)
                    acc = tl.dot(hv, wv, acc, input_precision=PRECISION)
                else:
                    hv = tl.load(h_ptr + COMP_H + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                    acc += tl.sum(wv.to(tl.float32) * hv[:, None], axis=0)
            bias = tl.load(comp_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            if USE_DOT:
                acc += bias[None, :]
            else:
                acc += bias
    if CUT and pid_d == 0:  # each row once, whatever the column blocks
        tl.atomic_add(tally_ptr, kept.to(tl.int64), sem="relaxed")
        if pid_s == 0:
            tl.atomic_add(tally_ptr + 1, 1, sem="relaxed")
    if USE_DOT:
        tl.atomic_add(acc_ptr + offs_b[:, None] * stride_ab + offs_d[None, :], acc,
                      mask=mask_b[:, None] & mask_d[None, :], sem="relaxed")
    else:
        tl.atomic_add(acc_ptr + offs_d, acc, mask=mask_d, sem="relaxed")


def vecmat_config(batch: int, nrows: int, d: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps, splits): ~4 programs per SM over (column blocks x row splits)."""
    block_r, block_d, warps = (32, 256, 4) if batch == 1 else (32, 128, 4)
    col_blocks = triton.cdiv(d, block_d)
    splits = max(1, min(triton.cdiv(nrows, block_r), triton.cdiv(4 * sms, col_blocks)))
    return block_r, block_d, warps, splits


def gather_vecmat_acc(h: torch.Tensor, wt: torch.Tensor, idx: torch.Tensor, unit: int, acc: torch.Tensor,
                      config: tuple | None = None, scale: torch.Tensor | None = None,
                      count: torch.Tensor | None = None, cut: float | None = None,
                      tally: torch.Tensor | None = None, compensation: tuple | None = None) -> None:
    """acc += h @ wt[rows of idx]; count (int32 [1], unit 1): only the first count rows of idx and columns of h;
    cut (unit 1, with tally int64 [2]): only the entries of h above it in magnitude, the rows no sequence keeps
    never read, tally += (rows read, 1); compensation (bt [R, d], bias [d], h's dtype): h has R more columns
    after idx's (gather_matvec's compensation), and acc += h[:, -R:] @ bt + bias, none of them cut."""
    assert count is None or (unit == 1 and count.dtype == torch.int32)
    assert cut is None or (unit == 1 and scale is None and tally is not None and tally.dtype == torch.int64)
    batch, nrows = h.shape
    comp_r = 0
    if compensation is not None:
        comp_bt, comp_bias = compensation
        comp_r = comp_bt.shape[0]
        nrows -= comp_r
        assert comp_bt.is_contiguous() and comp_bt.shape[1] == wt.shape[1] and comp_bias.shape == (wt.shape[1],)
        assert comp_bt.dtype == comp_bias.dtype == h.dtype and comp_bias.is_contiguous() and scale is None
    d = wt.shape[1]
    assert nrows == idx.numel() * unit and acc.dtype == torch.float32 and acc.stride(1) == 1
    if scale is not None:
        assert unit == 1 and scale.shape[0] == batch and scale.stride(1) == 1 and scale.dtype == h.dtype
    assert h.stride(1) == 1 and wt.stride(1) == 1 and h.dtype == wt.dtype and batch <= DOT_BATCH
    block_r, block_d, warps, splits = config or vecmat_config(batch if h.dtype == torch.float32 else 2, nrows, d,
                                                               _sms(h))
    use_dot = batch > 1 or h.dtype != torch.float32
    if use_dot:
        block_r = max(block_r, 16)
    rows_per_split = triton.cdiv(triton.cdiv(max(nrows, 1), splits), block_r) * block_r
    splits = triton.cdiv(max(nrows, 1), rows_per_split)
    grid = (triton.cdiv(d, block_d), splits + (comp_r > 0))
    comp = compensation or (h, h)  # unread placeholders: COMP_R 0
    _gather_vecmat_kernel[grid](h, wt, idx, acc, h if scale is None else scale, idx if count is None else count,
                                batch, d, nrows, rows_per_split,
                                h.stride(0), wt.stride(0), acc.stride(0), 0 if scale is None else scale.stride(0),
                                UNIT=unit, B_PAD=DOT_BATCH if use_dot else 1, USE_DOT=use_dot, BLOCK_R=block_r,
                                BLOCK_D=block_d, PRECISION=_precision(h), SCALE=scale is not None,
                                HAS_COUNT=count is not None, CUT=cut is not None,
                                cut=0.0 if cut is None else float(cut), tally_ptr=idx if tally is None else tally,
                                comp_ptr=comp[0], comp_bias_ptr=comp[1], COMP_H=nrows, COMP_R=comp_r,
                                num_warps=warps, **_pdl(h))


# ------------------------------------------------------------------------------------------------
# sparse_mlp_gemv: acc[0, :] += sum_j (act(x . gate[r_j]) * (x . up[r_j])) * down_t[r_j, :]   (batch 1)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _sparse_mlp_gemv_kernel(x_ptr, gate_ptr, up_ptr, down_t_ptr, idx_ptr, acc_ptr, nsel_ptr, D, NSEL,
                            ROWS_PER_PROGRAM, stride_w, stride_dw, ACT: tl.constexpr, BLOCK_R: tl.constexpr,
                            D_PAD: tl.constexpr, HAS_COUNT: tl.constexpr = False, CUT: tl.constexpr = False,
                            cut=0.0, tally_ptr=None, comp_a_ptr=None, comp_bt_ptr=None, comp_bias_ptr=None,
                            COMP_R: tl.constexpr = 0, PDL: tl.constexpr = False):
    _grid_dependency(PDL)
    if HAS_COUNT:  # a count known only on the device (score thresholds): equal shares of it per program
        NSEL = tl.load(nsel_ptr)
        ROWS_PER_PROGRAM = tl.cdiv(NSEL, tl.num_programs(0))
    # A program owns whole neurons: it reads their gate, up and down^T rows in one go (all three
    # addresses are known from idx, so the loads overlap), keeps the output row in registers, and adds
    # it into acc once. One launch and no intermediate, where the two-kernel path pays two ramps and
    # tails: at low density those fixed costs are most of the MLP's time.
    pid = tl.program_id(0)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D
    xv = tl.load(x_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    out = tl.zeros((D_PAD,), dtype=tl.float32)
    start = pid * ROWS_PER_PROGRAM
    end = tl.minimum(start + ROWS_PER_PROGRAM, NSEL)
    kept = 0
    for r0 in range(start, end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < end
        rows = tl.load(idx_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
        mask = mask_r[:, None] & mask_d[None, :]
        g = tl.load(gate_ptr + rows[:, None] * stride_w + offs_d[None, :], mask=mask, other=0.0)
        u = tl.load(up_ptr + rows[:, None] * stride_w + offs_d[None, :], mask=mask, other=0.0)
        if not CUT:
            wd = tl.load(down_t_ptr + rows[:, None] * stride_dw + offs_d[None, :], mask=mask, other=0.0)
        gs = tl.sum(g.to(tl.float32) * xv[None, :], axis=1)
        us = tl.sum(u.to(tl.float32) * xv[None, :], axis=1)
        # rounded to the model dtype, as the two-kernel path stores it between its kernels
        h = (_activation(gs, ACT) * us).to(x_ptr.dtype.element_ty).to(tl.float32)
        if CUT:
            # Down thresholds: a row of down^T is read only when its activation is above the cut, so after gate
            # and up. (Reading each block's down rows in the next iteration, beside its gate and up rows, was
            # slower: 3.84 against 3.55 ms a Llama-2-7B step, BENCHMARKS.md.)
            keep = mask_r & (tl.abs(h) > cut)
            kept += tl.sum(keep.to(tl.int32))
            wd = tl.load(down_t_ptr + rows[:, None] * stride_dw + offs_d[None, :], mask=keep[:, None] & mask_d[None, :],
                         other=0.0)
            h = tl.where(keep, h, 0.0)
        out += tl.sum(wd.to(tl.float32) * h[:, None], axis=0)
    if COMP_R > 0:
        # MLP compensation, b (a x) + bias: its R rows shared out like neurons with no activation, so the term
        # costs two row reads in a few programs instead of launches of its own
        for j in range(pid, COMP_R, tl.num_programs(0)):
            a = tl.load(comp_a_ptr + j * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            z = tl.sum(a * xv, axis=0).to(x_ptr.dtype.element_ty).to(tl.float32)
            out += z * tl.load(comp_bt_ptr + j * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if pid == 0:
            out += tl.load(comp_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if CUT:
        tl.atomic_add(tally_ptr, kept.to(tl.int64), sem="relaxed")
        if pid == 0:
            tl.atomic_add(tally_ptr + 1, 1, sem="relaxed")
    tl.atomic_add(acc_ptr + offs_d, out, mask=mask_d, sem="relaxed")


# Batch 1's MLP in one launch (sparse_mlp_gemv) rather than gather_matvec + gather_vecmat_acc;
# DEJAVU_FUSED_MLP=0 keeps the two kernels, e.g. to measure the difference inside the decode loop.
FUSED_MLP = os.environ.get("DEJAVU_FUSED_MLP", "1") != "0"


def sparse_mlp_config(nsel: int, d: int, sms: int) -> tuple[int, int, int]:
    """(BLOCK_R, num_warps, programs) of sparse_mlp_gemv: two programs per SM, each owning an equal
    share of the selected neurons, so every program reads the same bytes and none straggles.
    Measured (bench/mlp_fused.py, H100, Llama-2-7B shapes): 4 rows x 8 warps is the best of 18 shapes
    at density 0.5 and 0.3 and within 2 % of it at 0.1."""
    # the tiles hold BLOCK_R whole rows in registers: fewer rows for wider models
    block_r = max(1, min(4, 16384 // triton.next_power_of_2(d)))
    return block_r, 8, max(1, min(nsel, 2 * sms))


def fused_mlp_fits(d: int) -> bool:
    """Whether sparse_mlp_gemv's whole-row tiles fit in registers at this hidden size."""
    return d <= 16384


def sparse_mlp_gemv(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down_t: torch.Tensor, idx: torch.Tensor,
                    act: int, acc: torch.Tensor, config: tuple | None = None, count: torch.Tensor | None = None,
                    cut: float | None = None, tally: torch.Tensor | None = None,
                    compensation: tuple | None = None) -> None:
    """acc += (act(x @ gate[idx].T) * (x @ up[idx].T)) @ down_t[idx], for one sequence (x: [1, d]);
    count (int32 [1]): only idx[:count], the programs sized for all of idx and sharing the count equally;
    cut (with tally int64 [2]): down^T's row of a neuron is read only when |its activation| > cut, and
    tally += (rows read, 1); compensation (a [R, d], bt [R, d], bias [d], x's dtype): acc += (a x) @ bt + bias."""
    batch, d = x.shape
    nsel = idx.numel()
    assert count is None or count.dtype == torch.int32
    assert cut is None or (tally is not None and tally.dtype == torch.int64)
    assert batch == 1 and acc.shape == (1, d) and acc.dtype == torch.float32 and acc.stride(1) == 1
    assert x.stride(1) == 1 and gate.stride() == up.stride() and gate.stride(1) == 1 and down_t.stride(1) == 1
    assert gate.dtype == up.dtype == down_t.dtype == x.dtype and down_t.shape[1] == d and fused_mlp_fits(d)
    if compensation is not None:
        a, bt, bias = compensation
        assert a.shape == bt.shape and a.shape[1] == d and bias.shape == (d,) and a.dtype == bt.dtype == x.dtype
        assert a.is_contiguous() and bt.is_contiguous() and bias.is_contiguous()
    if nsel == 0 and compensation is None:
        return
    block_r, warps, programs = config or sparse_mlp_config(max(nsel, 1), d, _sms(x))
    rows_per_program = max(1, triton.cdiv(nsel, programs))
    grid = (max(1, triton.cdiv(nsel, rows_per_program)),)
    if count is not None:
        grid = (programs,)
    comp = compensation or (x, x, x)  # unread placeholders: COMP_R 0
    _sparse_mlp_gemv_kernel[grid](x, gate, up, down_t, idx, acc, idx if count is None else count, d, nsel,
                                  rows_per_program, gate.stride(0), down_t.stride(0), ACT=act, BLOCK_R=block_r,
                                  D_PAD=triton.next_power_of_2(d), HAS_COUNT=count is not None, CUT=cut is not None,
                                  cut=0.0 if cut is None else float(cut), tally_ptr=idx if tally is None else tally,
                                  comp_a_ptr=comp[0], comp_bt_ptr=comp[1], comp_bias_ptr=comp[2],
                                  COMP_R=0 if compensation is None else comp[0].shape[0], num_warps=warps, **_pdl(x))


# ------------------------------------------------------------------------------------------------
# threshold_vecmat_acc: acc[b, :] += sum over rows j of [|h[b, j]| > t] h[b, j] * wt[j, :]
# (TEAL-style magnitude sparsity: no selection step; a row is read when any sequence needs it)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _threshold_vecmat_kernel(h_ptr, wt_ptr, acc_ptr, threshold, B, R, N, ROWS_PER_SPLIT, stride_hb, stride_w,
                             stride_ab, B_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                             PRECISION: tl.constexpr, SINGLE: tl.constexpr = False, PDL: tl.constexpr = False):
    _grid_dependency(PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_b = tl.arange(0, B_PAD)
    mask_b = offs_b < B
    start = tl.program_id(1) * ROWS_PER_SPLIT
    acc = tl.zeros((B_PAD, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, tl.minimum(start + ROWS_PER_SPLIT, R), BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        if SINGLE:  # batch 1: the keep mask straight from one row, no reduction over the batch
            h1 = tl.load(h_ptr + offs_r, mask=offs_r < R, other=0.0)
            keep = (offs_r < R) & (tl.abs(h1.to(tl.float32)) > threshold)
            above = (offs_b[:, None] == 0) & keep[None, :]
            hv = tl.broadcast_to(h1[None, :], (B_PAD, BLOCK_R))
        else:
            mask_br = mask_b[:, None] & (offs_r < R)[None, :]
            hv = tl.load(h_ptr + offs_b[:, None] * stride_hb + offs_r[None, :], mask=mask_br, other=0.0)
            above = mask_br & (tl.abs(hv.to(tl.float32)) > threshold)
            keep = tl.max(above.to(tl.int32), axis=0) > 0
        # a row's loads are predicated off (its bytes never read) unless some sequence keeps it
        w = tl.load(wt_ptr + offs_r[:, None].to(tl.int64) * stride_w + offs_n[None, :],
                    mask=keep[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(tl.where(above, hv, 0.0).to(w.dtype), w, acc, input_precision=PRECISION)
    tl.atomic_add(acc_ptr + offs_b[:, None] * stride_ab + offs_n[None, :], acc,
                  mask=mask_b[:, None] & mask_n[None, :], sem="relaxed")


def threshold_vecmat_acc(h: torch.Tensor, wt: torch.Tensor, threshold: float, acc: torch.Tensor,
                         config: tuple | None = None) -> None:
    """acc [B, N] (fp32) += where(|h| > threshold, h, 0) @ wt; h [B, R], wt [R, N]."""
    batch, rows = h.shape
    n = wt.shape[1]
    assert wt.shape[0] == rows and h.stride(1) == 1 and wt.stride(1) == 1 and h.dtype == wt.dtype
    assert acc.dtype == torch.float32 and acc.shape == (batch, n) and acc.stride(1) == 1 and batch <= DOT_BATCH
    # tl.dot over a 16-row padded h: tensor cores read each weight tile once (an elementwise reduction
    # over rows ran at 0.22-0.38 of copy bandwidth, this at 0.82-0.95; BENCHMARKS.md)
    # vecmat_config's tiles: tiles that were faster alone (bench/threshold_config.py, also over pipeline
    # depths) were slower in the decode step (BENCHMARKS.md, sessions 7 and 9)
    block_r, block_n, warps, splits, *stages = config or vecmat_config(batch, rows, n, _sms(h))
    per_split = triton.cdiv(triton.cdiv(rows, splits), block_r) * block_r
    grid = (triton.cdiv(n, block_n), triton.cdiv(rows, per_split))
    _threshold_vecmat_kernel[grid](h, wt, acc, float(threshold), batch, rows, n, per_split, h.stride(0), wt.stride(0),
                                   acc.stride(0), B_PAD=DOT_BATCH, BLOCK_R=block_r, BLOCK_N=block_n,
                                   PRECISION=_precision(h), SINGLE=batch == 1, num_warps=warps,
                                   **({"num_stages": stages[0]} if stages else {}), **_pdl(h))


# ------------------------------------------------------------------------------------------------
# residual + RMSNorm: h += delta (then delta = 0); out = norm(h) * (w + offset)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _residual_rmsnorm_kernel(h_ptr, delta_ptr, w_ptr, dw_ptr, db_ptr, nb_ptr, out_ptr, hout_ptr, D, stride_hb,
                             stride_db, stride_ob, stride_hob, eps, offset, HAS_DELTA: tl.constexpr,
                             ZERO_DELTA: tl.constexpr, NORM: tl.constexpr, DELTA_NORM: tl.constexpr,
                             DELTA_BIAS: tl.constexpr, CENTERED: tl.constexpr, NORM_BIAS: tl.constexpr,
                             BLOCK: tl.constexpr, NORM_INPUT: tl.constexpr = False, PDL: tl.constexpr = False):
    _grid_dependency(PDL)
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    h = tl.load(h_ptr + b * stride_hb + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + b * stride_db + offs, mask=mask, other=0.0).to(tl.float32)
        if DELTA_BIAS:  # the block's output bias (OPT)
            delta += tl.load(db_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if DELTA_NORM:  # the block's output norm, on the output rounded as the model would hold it
            delta = delta.to(hout_ptr.dtype.element_ty).to(tl.float32)
            drstd = 1.0 / tl.sqrt(tl.sum(delta * delta, axis=0) / D + eps)
            dw = tl.load(dw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            delta = ((delta * drstd) * (dw + offset)).to(hout_ptr.dtype.element_ty).to(tl.float32)
        total = (h + delta).to(hout_ptr.dtype.element_ty)
        tl.store(hout_ptr + b * stride_hob + offs, total, mask=mask)
        if not NORM_INPUT:  # (NORM_INPUT: the norm below reads the block input, GPT-NeoX's parallel MLP)
            h = total.to(tl.float32)
        if ZERO_DELTA:
            # Every warp's delta loads must land before any warp's zeros: the compiler may give the
            # zero store a different thread-to-element layout from the load (seen on the H100 as a
            # row's tail read back as zeros, about one process in three).
            tl.debug_barrier()
            tl.store(delta_ptr + b * stride_db + offs, tl.zeros((BLOCK,), dtype=tl.float32), mask=mask)
    if NORM:
        if CENTERED:  # LayerNorm (OPT)
            h = tl.where(mask, h - tl.sum(h, axis=0) / D, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = (h * rstd) * (w + offset)
        if NORM_BIAS:
            h += tl.load(nb_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * stride_ob + offs, h.to(out_ptr.dtype.element_ty), mask=mask)


def residual_rmsnorm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor | None, out: torch.Tensor,
                     eps: float, offset: float = 0.0, zero_delta: bool = False,
                     h_out: torch.Tensor | None = None, delta_norm: torch.Tensor | None = None,
                     delta_bias: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None,
                     centered: bool = False, norm_input: bool = False) -> None:
    batch, d = h.shape
    block = triton.next_power_of_2(d)
    dl = delta if delta is not None else h
    ho = h_out if h_out is not None else h

    def ptr(t):  # a pointer the kernel never reads when its switch is off
        return h if t is None else t

    _residual_rmsnorm_kernel[(batch,)](h, dl, ptr(weight), ptr(delta_norm), ptr(delta_bias), ptr(norm_bias), out, ho,
                                       d, h.stride(0), dl.stride(0), out.stride(0), ho.stride(0), eps, offset,
                                       HAS_DELTA=delta is not None, ZERO_DELTA=zero_delta, NORM=weight is not None,
                                       DELTA_NORM=delta_norm is not None, DELTA_BIAS=delta_bias is not None,
                                       CENTERED=centered, NORM_BIAS=norm_bias is not None, BLOCK=block,
                                       NORM_INPUT=norm_input,
                                       num_warps=8 if block >= 4096 else 4, **_pdl(h))


# ------------------------------------------------------------------------------------------------
# top-k selection in one program: the k-th largest key found bit by bit, then a stable compaction
# (torch.topk at k = n/2 of 11008 took ~40 us on the H100; this is one launch with no host sync)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _select_topk_kernel(s_ptr, out_ptr, B, N, K, stride_sb, NPAD: tl.constexpr, LOW_BIT: tl.constexpr,
                        PDL: tl.constexpr = False):
    _grid_dependency(PDL)
    offs = tl.arange(0, NPAD)
    mask = offs < N
    v = tl.load(s_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    for b in range(1, B):
        v = tl.maximum(v, tl.load(s_ptr + b * stride_sb + offs, mask=mask, other=float("-inf")).to(tl.float32))
    # order-preserving map of float32 to [0, 2^32): positive -> 2^31 + bits, negative -> 2^31 - 1 - |bits|
    bits = v.to(tl.int32, bitcast=True).to(tl.int64)
    mag = bits & 0x7FFFFFFF
    key = tl.where(bits >= 0, 2147483648 + mag, 2147483647 - mag)
    key = tl.where(mask, key, 0)
    # 2 bits per step: three candidate thresholds counted in one reduction (counts packed 20 bits apart)
    thr = tl.zeros((), dtype=tl.int64)
    for i in tl.static_range(0, (32 - LOW_BIT) // 2):
        c1 = thr + (1 << (30 - 2 * i))
        c2 = thr + (2 << (30 - 2 * i))
        c3 = thr + (3 << (30 - 2 * i))
        packed = (key >= c1).to(tl.int64) + ((key >= c2).to(tl.int64) << 20) + ((key >= c3).to(tl.int64) << 40)
        total = tl.sum(packed, axis=0)
        n1 = total & 0xFFFFF
        n2 = (total >> 20) & 0xFFFFF
        n3 = total >> 40
        thr = tl.where(n3 >= K, c3, tl.where(n2 >= K, c2, tl.where(n1 >= K, c1, thr)))
    greater = key > thr
    equal = (key == thr) & mask
    need = K - tl.sum(greater.to(tl.int32), axis=0)
    # one scan for both running counts (greater in the low 32 bits, equal in the high)
    running = tl.cumsum(greater.to(tl.int64) + (equal.to(tl.int64) << 32), axis=0)
    cum_greater = running & 0xFFFFFFFF
    cum_equal = running >> 32
    take = greater | (equal & (cum_equal <= need))
    slot = cum_greater + tl.minimum(cum_equal, need.to(tl.int64)) - 1
    tl.store(out_ptr + slot, offs.to(tl.int64), mask=take)


def select_topk(scores: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    batch, n = scores.shape
    assert scores.stride(1) == 1 and 0 < k <= n
    out = torch.empty(k, device=scores.device, dtype=torch.long) if out is None else out
    assert out.dtype == torch.long and out.numel() == k and out.is_contiguous()
    # bf16/fp16 scores widen to fp32 with their low mantissa bits zero: no need to search those bits
    low = {torch.bfloat16: 16, torch.float16: 12}.get(scores.dtype, 0)
    assert n < (1 << 20), "select_topk packs counts in 20 bits"
    npad = triton.next_power_of_2(n)
    _select_topk_kernel[(1,)](scores, out, batch, n, k, scores.stride(0), NPAD=npad, LOW_BIT=low,
                              num_warps=16 if npad >= 8192 else (8 if npad >= 2048 else 4), **_pdl(scores))
    return out


# ------------------------------------------------------------------------------------------------
# RoPE on q (selected heads) and k, and the KV-cache write at position pos (read from device memory)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _halves(base, offs, half, mask, FROM_ACC: tl.constexpr, dtype: tl.constexpr):
    """A head's two halves in fp32; FROM_ACC: rounded to `dtype` first (as a separate drain would store
    them) and zeroed in the accumulator they came from."""
    x1 = tl.load(base + offs, mask=mask, other=0.0)
    x2 = tl.load(base + half + offs, mask=mask, other=0.0)
    if FROM_ACC:
        x1 = x1.to(dtype)
        x2 = x2.to(dtype)
        zero = tl.zeros(offs.shape, dtype=tl.float32)
        tl.store(base + offs, zero, mask=mask)
        tl.store(base + half + offs, zero, mask=mask)
    return x1.to(tl.float32), x2.to(tl.float32)


@triton.jit
def _head_rmsnorm(x1, x2, w_ptr, offs, half, mask, eps, HD: tl.constexpr, dtype: tl.constexpr):
    """A head's halves RMS-normalised over the whole head and scaled by w, rounded as HF rounds them
    (normalised in fp32, cast to the model's dtype, then times the weight in that dtype)."""
    r = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / HD + eps)
    w1 = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + half + offs, mask=mask, other=0.0).to(tl.float32)
    y1 = (w1 * (x1 * r).to(dtype).to(tl.float32)).to(dtype)
    y2 = (w2 * (x2 * r).to(dtype).to(tl.float32)).to(dtype)
    return y1.to(tl.float32), y2.to(tl.float32)


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, NQ, NKV, T,
                       stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, qout_ptr, stride_ob,
                       stride_oh, qn_ptr, kn_ptr, eps, HD: tl.constexpr, HALF_PAD: tl.constexpr,
                       FROM_ACC: tl.constexpr = False, QK_NORM: tl.constexpr = False, PDL: tl.constexpr = False):
    # FROM_ACC: q/k/v are read from an fp32 accumulator (rounded to the model's dtype first, as a separate
    # drain would store them), rotated q goes to qout, and each program zeroes the entries it read (no
    # other program reads them), so the accumulator is ready for the next layer without another launch.
    # QK_NORM: each q and k head is RMS-normalised (weights qn / kn) before rope (Qwen3); a program holds
    # a whole head, so the norm costs no extra launch
    _grid_dependency(PDL)
    b = tl.program_id(0)
    j = tl.program_id(1)
    pos = tl.load(pos_ptr)
    half = HD // 2
    offs = tl.arange(0, HALF_PAD)
    mask = offs < half
    c = tl.load(cos_ptr + pos * HD + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * HD + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = qout_ptr.dtype.element_ty
    if j < NQ:
        x1, x2 = _halves(q_ptr + b * stride_qb + j * stride_qh, offs, half, mask, FROM_ACC, dtype)
        if QK_NORM:
            x1, x2 = _head_rmsnorm(x1, x2, qn_ptr, offs, half, mask, eps, HD, dtype)
        base = qout_ptr + b * stride_ob + j * stride_oh  # q itself unless FROM_ACC
        tl.store(base + offs, (x1 * c - x2 * s).to(dtype), mask=mask)
        tl.store(base + half + offs, (x2 * c + x1 * s).to(dtype), mask=mask)
    else:
        kvh = j - NQ
        x1, x2 = _halves(k_ptr + b * stride_kb + kvh * stride_kh, offs, half, mask, FROM_ACC, dtype)
        if QK_NORM:
            x1, x2 = _head_rmsnorm(x1, x2, kn_ptr, offs, half, mask, eps, HD, dtype)
        cbase = (b * NKV + kvh).to(tl.int64) * T * HD + pos * HD
        tl.store(kc_ptr + cbase + offs, (x1 * c - x2 * s).to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(kc_ptr + cbase + half + offs, (x2 * c + x1 * s).to(kc_ptr.dtype.element_ty), mask=mask)
        v1, v2 = _halves(v_ptr + b * stride_vb + kvh * stride_vh, offs, half, mask, FROM_ACC, dtype)
        tl.store(vc_ptr + cbase + offs, v1.to(vc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + cbase + half + offs, v2.to(vc_ptr.dtype.element_ty), mask=mask)


def _qk_norm_args(q_norm, k_norm, eps: float, hd: int, like: torch.Tensor) -> dict:
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm go together")
    if q_norm is None:
        return dict(qn_ptr=like, kn_ptr=like, eps=0.0, QK_NORM=False)
    assert q_norm.shape == (hd,) and k_norm.shape == (hd,) and q_norm.is_contiguous() and k_norm.is_contiguous()
    return dict(qn_ptr=q_norm, kn_ptr=k_norm, eps=float(eps), QK_NORM=True)


def rope_cache_write(q, k, v, kc, vc, cos, sin, pos, q_norm=None, k_norm=None, eps: float = 1e-6) -> None:
    batch, nq, hd = q.shape
    nkv = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1 and kc.is_contiguous() and vc.is_contiguous()
    assert cos.is_contiguous() and sin.is_contiguous() and cos.shape[1] == hd
    _rope_cache_kernel[(batch, nq + nkv)](q, k, v, kc, vc, cos, sin, pos, nq, nkv, kc.shape[2], q.stride(0),
                                          q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), q,
                                          q.stride(0), q.stride(1), HD=hd,
                                          HALF_PAD=triton.next_power_of_2(hd // 2), num_warps=1,
                                          **_qk_norm_args(q_norm, k_norm, eps, hd, q), **_pdl(q))


def rope_cache_write_acc(acc: torch.Tensor, q_out: torch.Tensor, kc, vc, cos, sin, pos, q_norm=None, k_norm=None,
                         eps: float = 1e-6) -> None:
    """rope_cache_write from an fp32 [B, (NQ + 2 NKV) * hd] q/k/v accumulator: rotated q into q_out
    [B, NQ, hd] (model dtype), k/v into the cache; acc is left zeroed. One launch for drain_acc + rope."""
    batch, nq, hd = q_out.shape
    nkv = kc.shape[1]
    assert acc.dtype == torch.float32 and acc.shape == (batch, (nq + 2 * nkv) * hd) and acc.stride(1) == 1
    assert q_out.stride(2) == 1 and kc.is_contiguous() and vc.is_contiguous() and cos.shape[1] == hd
    q = acc[:, :nq * hd].view(batch, nq, hd)
    k = acc[:, nq * hd:(nq + nkv) * hd].view(batch, nkv, hd)
    v = acc[:, (nq + nkv) * hd:].view(batch, nkv, hd)
    _rope_cache_kernel[(batch, nq + nkv)](q, k, v, kc, vc, cos, sin, pos, nq, nkv, kc.shape[2], q.stride(0),
                                          q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), q_out,
                                          q_out.stride(0), q_out.stride(1), HD=hd,
                                          HALF_PAD=triton.next_power_of_2(hd // 2), FROM_ACC=True, num_warps=1,
                                          **_qk_norm_args(q_norm, k_norm, eps, hd, q_out), **_pdl(q_out))


# ------------------------------------------------------------------------------------------------
# k/v of the selected heads' KV groups only, computed lazily: a skipped group's gap is filled from the
# stored attention inputs the next time one of its heads is selected (see reference.lazy_kv_fill)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _lazy_kv_kernel(x_ptr, xc_ptr, w_ptr, bias_ptr, heads_ptr, last_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr,
                    B, D, T, NQ, NKV, NSEL, GROUP, stride_xb, stride_w,
                    HD: tl.constexpr, SLICE: tl.constexpr, SEL_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                    PDL: tl.constexpr = False):
    _grid_dependency(PDL)
    # program (g, kind, s): KV group g, k (kind 0) or v (1), output dims s*SLICE.. and the same dims of
    # the second half, so that rope's pairs (i, i + HD/2) meet in one program
    g = tl.program_id(0)
    kind = tl.program_id(1)
    s = tl.program_id(2)
    pos = tl.load(pos_ptr).to(tl.int32)
    parity = pos % 2
    last_in = tl.load(last_ptr + parity * NKV + g)
    offs_sel = tl.arange(0, SEL_PAD)
    heads = tl.load(heads_ptr + offs_sel, mask=offs_sel < NSEL, other=0)
    needed = tl.sum(tl.where((offs_sel < NSEL) & (heads // GROUP == g), 1, 0), axis=0) > 0
    offs_d = tl.arange(0, BLOCK_D)
    first = (kind == 0) & (s == 0)
    if first:
        tl.store(last_ptr + (1 - parity) * NKV + g, tl.where(needed, pos, last_in))
        if g == 0:  # this position's input, for groups that will need it later
            for d0 in range(0, D, BLOCK_D):
                for b in range(0, B):
                    d = d0 + offs_d
                    xv = tl.load(x_ptr + b * stride_xb + d, mask=d < D, other=0.0)
                    tl.store(xc_ptr + (b * T + pos).to(tl.int64) * D + d, xv, mask=d < D)
    if needed:
        start = last_in + 1
        rows = (pos + 1 - start) * B  # (position, sequence) pairs, sequence fastest
        dims = s * SLICE + tl.arange(0, SLICE)
        mask_dims = dims < HD // 2  # a head_dim below 32 leaves part of the slice empty (tl.dot needs 16)
        w_row = (NQ + kind * NKV + g) * HD
        w1 = w_ptr + (w_row + dims)[None, :].to(tl.int64) * stride_w
        w2 = w1 + (HD // 2) * stride_w
        for r0 in range(0, rows, BLOCK_M):
            r = r0 + tl.arange(0, BLOCK_M)
            mask_r = r < rows
            p = start + r // B
            b = r % B
            from_x = mask_r & (p == pos)
            from_cache = mask_r & (p < pos)
            x_row = x_ptr + b.to(tl.int64) * stride_xb
            c_row = xc_ptr + (b * T + p).to(tl.int64) * D
            acc1 = tl.zeros((BLOCK_M, SLICE), dtype=tl.float32)
            acc2 = tl.zeros((BLOCK_M, SLICE), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                mask_d = d < D
                xa = tl.load(x_row[:, None] + d[None, :], mask=from_x[:, None] & mask_d[None, :], other=0.0)
                xb = tl.load(c_row[:, None] + d[None, :], mask=from_cache[:, None] & mask_d[None, :], other=0.0)
                xv = xa + xb
                mask_w = mask_d[:, None] & mask_dims[None, :]
                wa = tl.load(w1 + d[:, None], mask=mask_w, other=0.0)
                wb = tl.load(w2 + d[:, None], mask=mask_w, other=0.0)
                acc1 = tl.dot(xv, wa, acc1, input_precision=PRECISION)
                acc2 = tl.dot(xv, wb, acc2, input_precision=PRECISION)
            # rounded to the model dtype before rope, as the dense path's projection output is
            y1 = acc1.to(x_ptr.dtype.element_ty)
            y2 = acc2.to(x_ptr.dtype.element_ty)
            if HAS_BIAS:
                y1 = y1 + tl.load(bias_ptr + w_row + dims, mask=mask_dims, other=0.0)[None, :]
                y2 = y2 + tl.load(bias_ptr + w_row + HD // 2 + dims, mask=mask_dims, other=0.0)[None, :]
            y1 = y1.to(tl.float32)
            y2 = y2.to(tl.float32)
            cache = (b * NKV + g).to(tl.int64) * T * HD + p.to(tl.int64) * HD
            out = cache[:, None] + dims[None, :]
            mask_out = mask_r[:, None] & mask_dims[None, :]
            if kind == 0:
                c = tl.load(cos_ptr + p[:, None] * HD + dims[None, :], mask=mask_out, other=0.0)
                sn = tl.load(sin_ptr + p[:, None] * HD + dims[None, :], mask=mask_out, other=0.0)
                tl.store(kc_ptr + out, (y1 * c - y2 * sn).to(kc_ptr.dtype.element_ty), mask=mask_out)
                tl.store(kc_ptr + out + HD // 2, (y2 * c + y1 * sn).to(kc_ptr.dtype.element_ty), mask=mask_out)
            else:
                tl.store(vc_ptr + out, y1.to(vc_ptr.dtype.element_ty), mask=mask_out)
                tl.store(vc_ptr + out + HD // 2, y2.to(vc_ptr.dtype.element_ty), mask=mask_out)


def lazy_kv_fill(x, xcache, w, bias, heads, group: int, kc, vc, last, cos, sin, pos) -> None:
    batch, d = x.shape
    nkv, t, hd = kc.shape[1], kc.shape[2], kc.shape[3]
    nq = w.shape[0] // hd - 2 * nkv
    assert x.stride(1) == 1 and w.stride(1) == 1 and xcache.is_contiguous() and kc.is_contiguous()
    assert vc.is_contiguous() and last.is_contiguous() and last.dtype == torch.int32 and hd % 2 == 0
    assert cos.is_contiguous() and sin.is_contiguous() and cos.shape[1] == hd
    slice_ = 16
    grid = (nkv, 2, triton.cdiv(hd // 2, slice_))
    # rows = (gap + 1) x batch: one block covers a gap of up to 15 positions at batch 1 and of 7 at
    # batch 8, so the weights are streamed once per step unless a group was skipped for long
    block_m = 16 if batch == 1 else 64
    _lazy_kv_kernel[grid](x, xcache, w, bias if bias is not None else w, heads, last, kc, vc, cos, sin, pos,
                          batch, d, t, nq, nkv, heads.numel(), group, x.stride(0), w.stride(0), HD=hd,
                          SLICE=slice_, SEL_PAD=max(16, triton.next_power_of_2(heads.numel())), BLOCK_M=block_m,
                          BLOCK_D=128, HAS_BIAS=bias is not None, PRECISION=_precision(x), num_warps=4, **_pdl(x))


# ------------------------------------------------------------------------------------------------
# decode attention over the cache, selected q heads only (GQA: q head h reads kv head h // group)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _attention_run(pos_ptr, start_ptr, b, window, HAS_START: tl.constexpr, SPLITS: tl.constexpr,
                   BLOCK_T: tl.constexpr, WINDOWED: tl.constexpr):
    """[first, last): the positions this program's run covers, the program_id(2)-th of SPLITS equal runs
    of whole blocks over sequence b's cache, from its start (left padding; 0 without; with a sliding
    window no earlier than the window's first position) up to the device-side position (runs past the
    end are empty)."""
    length = tl.load(pos_ptr) + 1
    begin = 0
    if HAS_START:
        begin = tl.load(start_ptr + b)
    if WINDOWED:
        begin = tl.maximum(begin, length - window)
    run = tl.cdiv(tl.cdiv(length - begin, SPLITS), BLOCK_T) * BLOCK_T
    first = begin + tl.program_id(2) * run
    return first, tl.minimum(first + run, length)


@triton.jit
def _softcap(s, softcap, SOFTCAP: tl.constexpr):
    """Gemma 2's score cap, softcap * tanh(s / softcap), with tanh(x) = 2 sigmoid(2x) - 1."""
    if SOFTCAP:
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
    return s


@triton.jit
def _decode_attention_kernel(q_ptr, kc_ptr, vc_ptr, heads_ptr, pos_ptr, start_ptr, out_ptr, part_ptr, NKV, T,
                             GROUP, scale, window, softcap, stride_qb, stride_qh, stride_ob, stride_oh,
                             HD: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_T: tl.constexpr, SPLITS: tl.constexpr,
                             HAS_START: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
                             PDL: tl.constexpr = False):
    # SPLITS > 1 (flash-decoding): program s of a head takes the s-th of SPLITS equal runs of the
    # cached positions (whole blocks; programs past the end have none) and leaves its softmax
    # state in part [B, NQ, SPLITS, HD_PAD + 2] for _attention_combine_kernel. The runs follow the
    # device-side length, so a captured graph splits every step's context evenly.
    _grid_dependency(PDL)
    j = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    nq = tl.num_programs(0)
    head = tl.load(heads_ptr + j)
    kvh = head // GROUP
    first, last = _attention_run(pos_ptr, start_ptr, b, window, HAS_START, SPLITS, BLOCK_T, WINDOWED)
    offs_d = tl.arange(0, HD_PAD)
    mask_d = offs_d < HD
    q = tl.load(q_ptr + b * stride_qb + j * stride_qh + offs_d, mask=mask_d, other=0.0).to(tl.float32) * scale
    base = (b * NKV + kvh).to(tl.int64) * T * HD
    m = tl.full((1,), float("-inf"), dtype=tl.float32)
    denom = tl.zeros((1,), dtype=tl.float32)
    acc = tl.zeros((HD_PAD,), dtype=tl.float32)
    for t0 in range(first, last, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask_t = t < last
        tile = base + t[:, None] * HD + offs_d[None, :]
        kv_mask = mask_t[:, None] & mask_d[None, :]
        kt = tl.load(kc_ptr + tile, mask=kv_mask, other=0.0).to(tl.float32)
        vt = tl.load(vc_ptr + tile, mask=kv_mask, other=0.0).to(tl.float32)
        s = _softcap(tl.sum(kt * q[None, :], axis=1), softcap, SOFTCAP)
        s = tl.where(mask_t, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)  # every block holds position `first`, so m_new is finite
        p = tl.exp(s - m_new)
        denom = denom * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        m = m_new
    if SPLITS == 1:
        tl.store(out_ptr + b * stride_ob + j * stride_oh + offs_d, (acc / denom).to(out_ptr.dtype.element_ty),
                 mask=mask_d)
    else:
        row = part_ptr + ((b * nq + j) * SPLITS + split) * (HD_PAD + 2)
        tl.store(row + offs_d, acc)
        one = tl.arange(0, 1)
        tl.store(row + HD_PAD + one, m)
        tl.store(row + HD_PAD + 1 + one, denom)


@triton.jit
def _decode_attention_grouped_kernel(q_ptr, kc_ptr, vc_ptr, heads_ptr, pos_ptr, start_ptr, out_ptr, part_ptr, NKV,
                                     T, NSEL, scale, window, softcap, stride_qb, stride_qh, stride_ob, stride_oh,
                                     GROUP: tl.constexpr, ROWS_PAD: tl.constexpr, HD: tl.constexpr,
                                     HD_PAD: tl.constexpr, BLOCK_T: tl.constexpr, SPLITS: tl.constexpr,
                                     PRECISION: tl.constexpr, HAS_START: tl.constexpr, WINDOWED: tl.constexpr,
                                     SOFTCAP: tl.constexpr, PDL: tl.constexpr = False):
    # GQA: one program a KV head takes every selected q head that reads it (q rows j with
    # heads[j] // GROUP == kvh, in any order), so each k/v block is read once for them all, not once
    # per q head. The scores and the weighted sum are tensor-core dots over ROWS_PAD rows (those of
    # other groups masked to zero), the probabilities rounded to the cache's dtype as in FlashAttention.
    _grid_dependency(PDL)
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    offs_j = tl.arange(0, ROWS_PAD)
    selected = offs_j < NSEL
    head = tl.load(heads_ptr + offs_j, mask=selected, other=0)
    mine = selected & (head // GROUP == kvh)
    # blocks are read even for a KV head that no selected q head reads (their results are not stored):
    # a loop bound waiting on the heads would hold every k/v load back by one more round trip
    first, last = _attention_run(pos_ptr, start_ptr, b, window, HAS_START, SPLITS, BLOCK_T, WINDOWED)
    offs_d = tl.arange(0, HD_PAD)
    mask_d = offs_d < HD
    q = tl.load(q_ptr + b * stride_qb + offs_j[:, None] * stride_qh + offs_d[None, :],
                mask=mine[:, None] & mask_d[None, :], other=0.0)
    base = (b * NKV + kvh).to(tl.int64) * T * HD
    m = tl.full((ROWS_PAD,), float("-inf"), dtype=tl.float32)
    denom = tl.zeros((ROWS_PAD,), dtype=tl.float32)
    acc = tl.zeros((ROWS_PAD, HD_PAD), dtype=tl.float32)
    for t0 in range(first, last, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask_t = t < last
        tile = base + t[:, None] * HD + offs_d[None, :]
        kv_mask = mask_t[:, None] & mask_d[None, :]
        kt = tl.load(kc_ptr + tile, mask=kv_mask, other=0.0)
        vt = tl.load(vc_ptr + tile, mask=kv_mask, other=0.0)
        s = _softcap(tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale, softcap, SOFTCAP)
        s = tl.where(mask_t[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m = m_new
    if SPLITS == 1:
        tl.store(out_ptr + b * stride_ob + offs_j[:, None] * stride_oh + offs_d[None, :],
                 (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=mine[:, None] & mask_d[None, :])
    else:
        part = part_ptr + ((b * NSEL + offs_j) * SPLITS + split) * (HD_PAD + 2)
        tl.store(part[:, None] + offs_d[None, :], acc, mask=mine[:, None])
        tl.store(part + HD_PAD, m, mask=mine)
        tl.store(part + HD_PAD + 1, denom, mask=mine)


@triton.jit
def _attention_combine_kernel(part_ptr, out_ptr, stride_ob, stride_oh, HD: tl.constexpr, HD_PAD: tl.constexpr,
                              SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr = False):
    _grid_dependency(PDL)
    j = tl.program_id(0)
    b = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    mask_s = offs_s < SPLITS
    offs_d = tl.arange(0, HD_PAD)
    rows = part_ptr + ((b * tl.num_programs(0) + j) * SPLITS + offs_s) * (HD_PAD + 2)
    m = tl.load(rows + HD_PAD, mask=mask_s, other=float("-inf"))
    denom = tl.load(rows + HD_PAD + 1, mask=mask_s, other=0.0)
    # run 0 always holds the sequence's first position, so the largest m is finite; empty runs weigh
    # exp(-inf) = 0
    weight = tl.exp(m - tl.max(m, axis=0))
    acc = tl.load(rows[:, None] + offs_d[None, :], mask=mask_s[:, None], other=0.0)
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.sum(weight * denom, axis=0)
    tl.store(out_ptr + b * stride_ob + j * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < HD)


def attention_splits(nq: int, batch: int, capacity: int, block_t: int, sms: int,
                     per_sm: int | None = None) -> int:
    """How many runs each head's positions are split into: about ATTENTION_PER_SM programs an SM, no
    more runs than blocks of cache. One program per head and sequence read the whole context in turn,
    so a batch-1 step of 32 heads kept 32 of 132 SMs busy: 6.8 us a layer at 96 positions on the
    H100, 219 us at 4,096 (bench/attention_kernel.py, BENCHMARKS.md)."""
    per_sm = per_sm or ATTENTION_PER_SM
    return max(1, min(ATTENTION_MAX_SPLITS, triton.cdiv(capacity, block_t), (per_sm * sms) // (nq * batch)))


# the best of 2/4/8 programs an SM x 32/64-position blocks over contexts of 96-4,096 at batch 1 and 8
# (bench/attention_kernel.py); at 96 positions every shape was within run-to-run noise of one program a head
ATTENTION_BLOCK_T = 64
ATTENTION_PER_SM = 4
ATTENTION_MAX_SPLITS = 32


def decode_attention(q, kc, vc, heads, group: int, pos, scale: float, splits: int | None = None,
                     block_t: int | None = None, per_sm: int | None = None,
                     grouped: bool | None = None, start: torch.Tensor | None = None, window: int = 0,
                     softcap: float = 0.0) -> torch.Tensor:
    """Attention of q [B, NSEL, hd] (q heads `heads`) over cache positions [start[b], pos] (start [B]
    int64, None = 0), only the last `window` of them when window > 0, scores capped at softcap when > 0.
    With GQA (group > 1) one program a KV head serves all its selected q heads (grouped; False forces one
    program a q head)."""
    batch, nq, hd = q.shape
    nkv = kc.shape[1]
    assert q.stride(2) == 1 and kc.is_contiguous() and vc.is_contiguous() and heads.numel() == nq
    grouped = group > 1 if grouped is None else grouped
    out = torch.empty(batch, nq, hd, device=q.device, dtype=q.dtype)
    block_t = block_t or ATTENTION_BLOCK_T
    # a window bounds what any step reads, so it bounds the split too
    span = min(kc.shape[2], window) if window else kc.shape[2]
    splits = splits or attention_splits(nkv if grouped else nq, batch, span, block_t, _sms(q), per_sm)
    hd_pad = max(16, triton.next_power_of_2(hd))  # tl.dot's smallest tile
    part = torch.empty(batch, nq, splits, hd_pad + 2, device=q.device, dtype=torch.float32) if splits > 1 else out
    has_start = start is not None
    if has_start:
        assert start.shape == (batch,) and start.dtype == torch.long and start.device == q.device
    start_arg = start if has_start else pos  # never read without a start
    if grouped:
        _decode_attention_grouped_kernel[(nkv, batch, splits)](
            q, kc, vc, heads, pos, start_arg, out, part, nkv, kc.shape[2], nq, scale, window, softcap, q.stride(0),
            q.stride(1), out.stride(0), out.stride(1), GROUP=group, ROWS_PAD=max(16, triton.next_power_of_2(nq)),
            HD=hd, HD_PAD=hd_pad, BLOCK_T=block_t, SPLITS=splits, PRECISION=_precision(q), HAS_START=has_start,
            WINDOWED=window > 0, SOFTCAP=softcap > 0, num_warps=4, **_pdl(q))
    else:
        _decode_attention_kernel[(nq, batch, splits)](q, kc, vc, heads, pos, start_arg, out, part, nkv, kc.shape[2],
                                                      group, scale, window, softcap, q.stride(0), q.stride(1),
                                                      out.stride(0), out.stride(1), HD=hd, HD_PAD=hd_pad,
                                                      BLOCK_T=block_t, SPLITS=splits, HAS_START=has_start,
                                                      WINDOWED=window > 0, SOFTCAP=softcap > 0, num_warps=4,
                                                      **_pdl(q))
    if splits > 1:
        _attention_combine_kernel[(nq, batch)](part, out, out.stride(0), out.stride(1), HD=hd, HD_PAD=hd_pad,
                                               SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits),
                                               num_warps=4, **_pdl(q))
    return out


# ------------------------------------------------------------------------------------------------
# dense gated activation: a = act(gu[:, :n]) * gu[:, n:]
# ------------------------------------------------------------------------------------------------
@triton.jit
def _act_mul_kernel(gu_ptr, out_ptr, N, stride_gb, stride_ob, ACT: tl.constexpr, BLOCK: tl.constexpr,
                    ZERO_INPUT: tl.constexpr = False, PDL: tl.constexpr = False):
    _grid_dependency(PDL)
    # ZERO_INPUT: gu is an accumulator (act_mul_acc), left zeroed for its next use
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row = gu_ptr + b * stride_gb
    g = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(row + N + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * stride_ob + offs, (_activation(g, ACT) * u).to(out_ptr.dtype.element_ty), mask=mask)
    if ZERO_INPUT:
        tl.debug_barrier()  # as in the residual kernel: loads of every warp before zeros of any
        zero = tl.zeros((BLOCK,), dtype=gu_ptr.dtype.element_ty)
        tl.store(row + offs, zero, mask=mask)
        tl.store(row + N + offs, zero, mask=mask)


def act_mul(gu: torch.Tensor, act: int) -> torch.Tensor:
    batch, two_n = gu.shape
    n = two_n // 2
    out = torch.empty(batch, n, device=gu.device, dtype=gu.dtype)
    block = 1024
    _act_mul_kernel[(triton.cdiv(n, block), batch)](gu, out, n, gu.stride(0), out.stride(0), ACT=act, BLOCK=block,
                                                    **_pdl(gu))
    return out


def act_mul_acc(acc: torch.Tensor, act: int, out: torch.Tensor) -> None:
    """out [B, n] = act(acc[:, :n]) * acc[:, n:] (acc fp32 [B, 2n], then left zeroed for the next call)."""
    batch, n = out.shape
    assert acc.dtype == torch.float32 and acc.shape == (batch, 2 * n) and acc.stride(1) == 1 and out.stride(1) == 1
    block = 1024
    _act_mul_kernel[(triton.cdiv(n, block), batch)](acc, out, n, acc.stride(0), out.stride(0), ACT=act, BLOCK=block,
                                                    ZERO_INPUT=True, **_pdl(out))


@triton.jit
def _drain_acc_kernel(acc_ptr, out_ptr, N, stride_ab, stride_ob, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    _grid_dependency(PDL)
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    a = tl.load(acc_ptr + b * stride_ab + offs, mask=mask, other=0.0)
    tl.store(out_ptr + b * stride_ob + offs, a.to(out_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()  # as in the residual kernel: loads of every warp before zeros of any
    tl.store(acc_ptr + b * stride_ab + offs, tl.zeros((BLOCK,), dtype=tl.float32), mask=mask)


def drain_acc(acc: torch.Tensor, out: torch.Tensor) -> None:
    """out [B, N] = acc (fp32 [B, N]) in out's dtype; acc is left zeroed for its next use."""
    batch, n = out.shape
    assert acc.dtype == torch.float32 and acc.shape == (batch, n) and acc.stride(1) == 1 and out.stride(1) == 1
    block = 1024
    _drain_acc_kernel[(triton.cdiv(n, block), batch)](acc, out, n, acc.stride(0), out.stride(0), BLOCK=block,
                                                      **_pdl(out))


# ------------------------------------------------------------------------------------------------
# wide top-k: the same selection (exactly k ascending indices, the batch's top-k of the per-unit max,
# ties to the lowest index) spread over many programs. The single-program kernel above is ALU-bound on
# one SM (~24 us at n = 11008, H100); here each program handles a slice:
#   keys  (P1): per-unit max over the batch -> an order-preserving integer key (16 bits for bf16/fp16,
#               32 for fp32) per unit, and an atomic histogram of its top 8 bits. With `FUSED` the scores
#               are computed in place as relu?(h) @ w2[slice].T + b2 (the predictor's second layer),
#               rounded to h's dtype as the unfused path stores them, so they never go to memory.
#   refine (P2, once per further 8-bit digit): every program resolves the digit of the previous level
#               from its histogram (a 256-bin suffix count, redundant and cheap), then histograms the
#               next digit of its keys still matching the prefix.
#   emit  (P3): resolves the last digit -> threshold key and how many keys equal to it to take; each
#               program counts greater/equal keys before its slice (a re-read of <= n keys from L2) and
#               compacts its slice.
# Workspace (per caller, reused across calls and graph replays): keys int32 [n], hist int32 [levels,
# 256] (level 0 is zero between calls: P3 clears it; P1 clears the deeper levels, whose last readers were
# the previous call's P2/P3), meta int64 [2 * levels] (resolved prefix and count above, per level).
# Small n (one slice) runs everything in the P1 program: one launch.
# ------------------------------------------------------------------------------------------------
TOPK_BINS = 256
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
WIDE_SINGLE_MAX = 256  # n up to this: one program does scores, digits and compaction
WIDE_SLICE = 1024  # units per program in P2/P3 (and P1 when reading given scores)


@triton.jit
def _ordered_key(v, KEY_BITS: tl.constexpr):
    """Signed int32 whose order is v's (v in its own 16- or 32-bit float type; -0 and +0 are one key)."""
    if KEY_BITS == 16:
        bits = v.to(tl.int16, bitcast=True).to(tl.int32)
        mag = bits & 0x7FFF
    else:
        bits = v.to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
    return tl.where(bits >= 0, bits, -1 - mag + (mag == 0).to(tl.int32))


@triton.jit
def _key_digit(key, LEVEL: tl.constexpr, KEY_BITS: tl.constexpr):
    """(prefix above this digit, the 8-bit digit) of the unsigned form of key, digit 0 the top one."""
    ukey = key.to(tl.int64) + (1 << (KEY_BITS - 1))
    shift: tl.constexpr = KEY_BITS - 8 * (LEVEL + 1)
    return ukey >> (shift + 8), ((ukey >> shift) & 255).to(tl.int32)


@triton.jit
def _pick_digit(hist, above, K):
    """The largest digit d with (count above the prefix) + (count of digits >= d) >= K, and the new count above."""
    bins = tl.arange(0, 256)
    at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    d = tl.max(tl.where(above + at_or_above >= K, bins, 0), axis=0)
    above = above + tl.sum(tl.where(bins > d, hist, 0), axis=0)
    return d, above


@triton.jit
def _emit_slice(key, offs, mask, thr, above, K, g0, e0, out_ptr):
    """Write the slice's selected indices at their global slots (greater than thr: all; equal: the first
    K - above of them over the whole array, g0/e0 counting those before the slice)."""
    need = K - above
    greater = (key > thr) & mask
    equal = (key == thr) & mask
    running = tl.cumsum(greater.to(tl.int32) + (equal.to(tl.int32) << 16), axis=0)
    cum_equal = e0 + (running >> 16)
    take = greater | (equal & (cum_equal <= need))
    slot = g0 + (running & 0xFFFF) + tl.minimum(cum_equal, need) - 1
    tl.store(out_ptr + slot, offs.to(tl.int64), mask=take)


@triton.jit
def _topk_keys_kernel(src_ptr, w2_ptr, b2_ptr, keys_ptr, hist_ptr, out_ptr, B, N, R, K, stride_sb, stride_w,
                      up_weight, FUSED: tl.constexpr, RELU: tl.constexpr, USE_DOT: tl.constexpr,
                      B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, KEY_BITS: tl.constexpr,
                      LEVELS: tl.constexpr, SINGLE: tl.constexpr, PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr, EXACT_UP: tl.constexpr = False, HAS_LOGITS: tl.constexpr = False,
                      HIST: tl.constexpr = True, PDL: tl.constexpr = False):
    _grid_dependency(PDL)
    # EXACT_UP: src is up's output [B, N] and w2_ptr the predictor's logits (row stride stride_w); the
    # score log|up| + up_weight * logit is formed in fp32 and keyed in fp32 or, KEY_BITS 16, in fp16
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    dtype = src_ptr.dtype.element_ty
    if FUSED:
        bias = tl.load(b2_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if USE_DOT:
            offs_b = tl.arange(0, B_PAD)
            mask_b = offs_b < B
            acc = tl.zeros((B_PAD, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                mask_r = r < R
                hv = tl.load(src_ptr + offs_b[:, None] * stride_sb + r[None, :],
                             mask=mask_b[:, None] & mask_r[None, :], other=0.0)
                if RELU:
                    hv = tl.where(hv > 0, hv, 0.0).to(dtype)
                wv = tl.load(w2_ptr + offs_n[:, None] * stride_w + r[None, :],
                             mask=mask_n[:, None] & mask_r[None, :], other=0.0)
                if UPCAST:  # the CPU interpreter's bf16 dot is wrong; tf32 holds bf16/fp16 products exactly
                    hv, wv = hv.to(tl.float32), wv.to(tl.float32)
                acc = tl.dot(hv, tl.trans(wv), acc, input_precision=PRECISION)
            s = (acc + bias[None, :]).to(dtype).to(tl.float32)  # rounded as the unfused path stores scores
            v = tl.max(tl.where(mask_b[:, None], s, float("-inf")), axis=0).to(dtype)
        else:  # fp32: exact products, one batch row at a time
            v = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
            for b in range(0, B):
                acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for r0 in range(0, R, BLOCK_R):
                    r = r0 + tl.arange(0, BLOCK_R)
                    mask_r = r < R
                    hv = tl.load(src_ptr + b * stride_sb + r, mask=mask_r, other=0.0).to(tl.float32)
                    if RELU:
                        hv = tl.maximum(hv, 0.0)
                    wv = tl.load(w2_ptr + offs_n[:, None] * stride_w + r[None, :],
                                 mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
                    acc += tl.sum(wv * hv[None, :], axis=1)
                v = tl.maximum(v, (acc + bias).to(dtype).to(tl.float32))
            v = v.to(dtype)
    elif EXACT_UP:
        v = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        for b in range(0, B):
            u = tl.load(src_ptr + b * stride_sb + offs_n, mask=mask_n, other=1.0).to(tl.float32)
            s = tl.log(tl.maximum(tl.abs(u), 1e-30))
            if HAS_LOGITS:
                s += up_weight * tl.load(w2_ptr + b * stride_w + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            v = tl.maximum(v, s)
    else:
        v = tl.load(src_ptr + offs_n, mask=mask_n, other=float("-inf")).to(tl.float32)
        for b in range(1, B):  # fp32 max of values of dtype: exact
            v = tl.maximum(v, tl.load(src_ptr + b * stride_sb + offs_n, mask=mask_n,
                                      other=float("-inf")).to(tl.float32))
    if EXACT_UP and KEY_BITS == 32:
        key = _ordered_key(v, 32)
    elif EXACT_UP:  # fp16 keys: two digit levels instead of four, so two fewer launches on the critical path
        key = _ordered_key(v.to(tl.float16), 16)
    else:
        key = _ordered_key(v.to(dtype), KEY_BITS)
    bins = tl.arange(0, 256)
    if SINGLE:
        prefix = tl.zeros((), dtype=tl.int64)
        above = tl.zeros((), dtype=tl.int32)
        for level in tl.static_range(LEVELS):
            high, digit = _key_digit(key, level, KEY_BITS)
            hist = tl.histogram(digit, 256, mask=mask_n & (high == prefix))
            d, above = _pick_digit(hist, above, K)
            prefix = prefix * 256 + d
        thr = (prefix - (1 << (KEY_BITS - 1))).to(tl.int32)
        _emit_slice(key, offs_n, mask_n, thr, above, K, 0, 0, out_ptr)
    elif not HIST:  # score thresholds: keys only, compared with a known threshold (_above_emit_kernel)
        tl.store(keys_ptr + offs_n, key, mask=mask_n)
    else:
        tl.store(keys_ptr + offs_n, key, mask=mask_n)
        _, digit = _key_digit(key, 0, KEY_BITS)
        hist = tl.histogram(digit, 256, mask=mask_n)
        tl.atomic_add(hist_ptr + bins, hist, mask=hist > 0, sem="relaxed")
        if pid == 0:
            for level in tl.static_range(1, LEVELS):
                tl.store(hist_ptr + level * 256 + bins, tl.zeros((256,), dtype=tl.int32))


@triton.jit
def _resolve_level(hist_ptr, meta_ptr, K, LEVEL: tl.constexpr):
    """(prefix, count above) once digit LEVEL is fixed, from its histogram and the level before."""
    bins = tl.arange(0, 256)
    if LEVEL == 0:
        prefix = tl.zeros((), dtype=tl.int64)
        above = tl.zeros((), dtype=tl.int32)
    else:
        prefix = tl.load(meta_ptr + 2 * (LEVEL - 1))
        above = tl.load(meta_ptr + 2 * (LEVEL - 1) + 1).to(tl.int32)
    d, above = _pick_digit(tl.load(hist_ptr + LEVEL * 256 + bins), above, K)
    return prefix * 256 + d, above


@triton.jit
def _topk_refine_kernel(keys_ptr, hist_ptr, meta_ptr, N, K, LEVEL: tl.constexpr, KEY_BITS: tl.constexpr,
                        BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    _grid_dependency(PDL)
    pid = tl.program_id(0)
    prefix, above = _resolve_level(hist_ptr, meta_ptr, K, LEVEL - 1)
    if pid == 0:
        tl.store(meta_ptr + 2 * (LEVEL - 1), prefix)
        tl.store(meta_ptr + 2 * (LEVEL - 1) + 1, above.to(tl.int64))
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    key = tl.load(keys_ptr + offs, mask=mask, other=0)
    high, digit = _key_digit(key, LEVEL, KEY_BITS)
    hist = tl.histogram(digit, 256, mask=mask & (high == prefix))
    tl.atomic_add(hist_ptr + LEVEL * 256 + tl.arange(0, 256), hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _topk_emit_kernel(keys_ptr, hist_ptr, meta_ptr, out_ptr, N, K, LEVELS: tl.constexpr, KEY_BITS: tl.constexpr,
                      BLOCK: tl.constexpr, SCAN: tl.constexpr, PDL: tl.constexpr = False):
    _grid_dependency(PDL)
    pid = tl.program_id(0)
    prefix, above = _resolve_level(hist_ptr, meta_ptr, K, LEVELS - 1)
    thr = (prefix - (1 << (KEY_BITS - 1))).to(tl.int32)
    start = pid * BLOCK
    g_acc = tl.zeros((SCAN,), dtype=tl.int32)
    e_acc = tl.zeros((SCAN,), dtype=tl.int32)
    for c0 in range(0, start, SCAN):  # keys before this slice, SCAN at a time (few dependent L2 trips)
        o = c0 + tl.arange(0, SCAN)
        before = o < start
        kk = tl.load(keys_ptr + o, mask=before, other=0)
        g_acc += ((kk > thr) & before).to(tl.int32)
        e_acc += ((kk == thr) & before).to(tl.int32)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < N
    key = tl.load(keys_ptr + offs, mask=mask, other=0)
    _emit_slice(key, offs, mask, thr, above, K, tl.sum(g_acc, axis=0), tl.sum(e_acc, axis=0), out_ptr)
    if pid == 0:  # level 0's histogram is read by no program of this launch: clear it for the next call
        tl.store(hist_ptr + tl.arange(0, 256), tl.zeros((256,), dtype=tl.int32))


def _key_bits(dtype: torch.dtype) -> int:
    if dtype in (torch.bfloat16, torch.float16):
        return 16
    if dtype == torch.float32:
        return 32
    raise ValueError(f"top-k keys for {dtype} are not supported")


class TopkWorkspace:
    """Scratch of the wide top-k over n units; one per caller, reused (hist starts zeroed)."""

    def __init__(self, n: int, dtype: torch.dtype, device):
        levels = _key_bits(dtype) // 8
        self.wrap(torch.empty(n, dtype=torch.int32, device=device),
                  torch.zeros(levels * TOPK_BINS, dtype=torch.int32, device=device),
                  torch.zeros(2 * levels, dtype=torch.int64, device=device), self)

    @classmethod
    def wrap(cls, keys: torch.Tensor, hist: torch.Tensor, meta: torch.Tensor, ws=None) -> TopkWorkspace:
        """A workspace over existing buffers (the custom op passes them as tensors)."""
        ws = ws or cls.__new__(cls)
        ws.keys, ws.hist, ws.meta = keys, hist, meta
        ws.n, ws.levels = keys.numel(), hist.numel() // TOPK_BINS
        ws.key_bits = 8 * ws.levels
        assert keys.dtype == torch.int32 and hist.dtype == torch.int32 and meta.dtype == torch.int64
        return ws


def _keys_tiles(src: torch.Tensor, w2: torch.Tensor | None, n: int, single: bool) -> tuple[bool, int, int, int]:
    """(USE_DOT, BLOCK_N, rank, BLOCK_R) of the keys pass: fused (w2 given) scores go through tl.dot in 16-bit
    dtypes, 64 units a program; given scores are read WIDE_SLICE at a time; `single`: one program for all n."""
    fused = w2 is not None
    rank = w2.shape[1] if fused else 0
    block_n = max(16, triton.next_power_of_2(n)) if single else 64 if fused else WIDE_SLICE
    block_r = min(64, max(16, triton.next_power_of_2(rank))) if fused else 16
    return fused and src.dtype != torch.float32, block_n, rank, block_r


def _wide_topk(src: torch.Tensor, w2: torch.Tensor | None, b2: torch.Tensor | None, relu: bool, n: int, k: int,
               out: torch.Tensor | None, ws: TopkWorkspace | None, exact_up: tuple | None = None) -> torch.Tensor:
    """exact_up: (logits or None, weight): src is up's output and the scores are select_exact_up's."""
    batch = src.shape[0]
    assert src.stride(1) == 1 and 0 < k <= n and batch <= DOT_BATCH
    out = torch.empty(k, device=src.device, dtype=torch.long) if out is None else out
    assert out.dtype == torch.long and out.numel() == k and out.is_contiguous()
    ws = ws or TopkWorkspace(n, torch.float32 if exact_up is not None else src.dtype, src.device)
    # exact-up keys its fp32 scores at the workspace's width (16: fp16-rounded scores)
    assert ws.n == n and (exact_up is not None or ws.key_bits == _key_bits(src.dtype))
    logits, up_weight = exact_up if exact_up is not None else (None, 0.0)
    if logits is not None:
        assert logits.shape == src.shape and logits.stride(1) == 1
    fused = w2 is not None
    single = n <= WIDE_SINGLE_MAX
    use_dot, block_n, rank, block_r = _keys_tiles(src, w2, n, single)
    if fused:
        assert w2.stride(1) == 1 and w2.shape[0] == n and b2.is_contiguous() and w2.dtype == src.dtype
    warps = 8 if single and block_n >= 256 else 4
    _topk_keys_kernel[(triton.cdiv(n, block_n),)](
        src, w2 if fused else (logits if logits is not None else src), b2 if fused else src, ws.keys, ws.hist, out,
        batch, n, rank, k, src.stride(0), w2.stride(0) if fused else (logits.stride(0) if logits is not None else 0),
        float(up_weight), EXACT_UP=exact_up is not None, HAS_LOGITS=logits is not None, FUSED=fused, RELU=relu,
        USE_DOT=use_dot, B_PAD=DOT_BATCH if use_dot else 1,
        BLOCK_N=block_n, BLOCK_R=block_r, KEY_BITS=ws.key_bits, LEVELS=ws.levels, SINGLE=single,
        PRECISION="tf32" if _INTERPRETED else _precision(src), UPCAST=_INTERPRETED, num_warps=warps, **_pdl(src))
    if single:
        return out
    grid = (triton.cdiv(n, WIDE_SLICE),)
    for level in range(1, ws.levels):
        _topk_refine_kernel[grid](ws.keys, ws.hist, ws.meta, n, k, LEVEL=level, KEY_BITS=ws.key_bits,
                                  BLOCK=WIDE_SLICE, num_warps=4, **_pdl(ws.keys))
    _topk_emit_kernel[grid](ws.keys, ws.hist, ws.meta, out, n, k, LEVELS=ws.levels, KEY_BITS=ws.key_bits,
                            BLOCK=WIDE_SLICE, SCAN=4 * WIDE_SLICE, num_warps=4, **_pdl(ws.keys))
    return out


def select_topk_wide(scores: torch.Tensor, k: int, out: torch.Tensor | None = None,
                     ws: TopkWorkspace | None = None) -> torch.Tensor:
    """select_topk's result (same indices, ties to the lowest index) from many programs."""
    return _wide_topk(scores, None, None, False, scores.shape[1], k, out, ws)


def select_exact_up(up: torch.Tensor, logits: torch.Tensor | None, weight: float, k: int,
                    out: torch.Tensor | None = None, ws: TopkWorkspace | None = None) -> torch.Tensor:
    """Top-k of the batch max of log|up| + weight * logits (fp32, never written), keyed at ws's width:
    an fp32 workspace ranks the fp32 scores exactly, an fp16 one their fp16 rounding (fewer passes)."""
    return _wide_topk(up, None, None, False, up.shape[1], k, out, ws, exact_up=(logits, weight))


def predict_select(h: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, relu: bool, k: int,
                   out: torch.Tensor | None = None, ws: TopkWorkspace | None = None) -> torch.Tensor:
    """Top-k of relu?(h) @ w2.T + b2 (rounded to h's dtype; batch max per unit) without writing scores."""
    return _wide_topk(h, w2, b2, relu, w2.shape[0], k, out, ws)


# ------------------------------------------------------------------------------------------------
# score thresholds: the units whose batch-max score is above a fixed threshold, ascending, and their
# count, both on the device. P1 is the wide top-k's keys pass (scores computed in place, never written);
# the emit pass compacts each slice at the count of kept keys before it (re-read from L2), and the last
# program writes the count, which the MLP kernels read (HAS_COUNT) so a CUDA graph replays any count.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _above_emit_kernel(keys_ptr, out_ptr, count_ptr, tally_ptr, N, THR, BLOCK: tl.constexpr, SCAN: tl.constexpr,
                       PDL: tl.constexpr = False):
    _grid_dependency(PDL)
    pid = tl.program_id(0)
    start = pid * BLOCK
    kept = tl.zeros((SCAN,), dtype=tl.int32)
    for c0 in range(0, start, SCAN):
        o = c0 + tl.arange(0, SCAN)
        before = o < start
        kk = tl.load(keys_ptr + o, mask=before, other=0)
        kept += ((kk > THR) & before).to(tl.int32)
    k0 = tl.sum(kept, axis=0)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < N
    key = tl.load(keys_ptr + offs, mask=mask, other=0)
    take = (key > THR) & mask
    running = tl.cumsum(take.to(tl.int32), axis=0)
    tl.store(out_ptr + k0 + running - 1, offs.to(tl.int64), mask=take)
    if pid == tl.num_programs(0) - 1:
        total = k0 + tl.sum(take.to(tl.int32), axis=0)
        tl.store(count_ptr, total)
        # (units kept, calls) summed over calls: the mean count a timed decode really read
        tl.atomic_add(tally_ptr, total.to(tl.int64), sem="relaxed")
        tl.atomic_add(tally_ptr + 1, 1, sem="relaxed")


def threshold_key(threshold: float, dtype: torch.dtype) -> int:
    """_ordered_key of the threshold in the scores' dtype, rounded to nearest as PyTorch rounds a Python float
    compared with a tensor of that dtype: key > this key <=> score > threshold, as runtime.apply compares
    scores of the same dtype (the hooks score in the predictors' dtype, the decode loop in the model's: in
    bf16 the two can differ for scores within rounding of the threshold, as a top-k's can at its k-th)."""
    bits_dtype = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    bits = int(torch.tensor(float(threshold), dtype=torch.float64).to(dtype).view(bits_dtype).item())
    mag = bits & (0x7FFF if bits_dtype == torch.int16 else 0x7FFFFFFF)
    return bits if bits >= 0 else -1 - mag + (mag == 0)


def _select_above(src: torch.Tensor, w2: torch.Tensor | None, b2: torch.Tensor | None, relu: bool, threshold: float,
                  out: torch.Tensor, count: torch.Tensor, tally: torch.Tensor, keys: torch.Tensor) -> None:
    batch, n = src.shape[0], out.numel()
    fused = w2 is not None
    assert src.stride(1) == 1 and batch <= DOT_BATCH and out.dtype == torch.long and out.is_contiguous()
    assert count.dtype == torch.int32 and tally.dtype == torch.int64 and keys.dtype == torch.int32 and keys.numel() >= n
    if fused:
        assert w2.stride(1) == 1 and w2.shape[0] == n and b2.is_contiguous() and w2.dtype == src.dtype
    else:
        assert src.shape[1] == n
    key_bits = _key_bits(src.dtype)
    use_dot, block_n, rank, block_r = _keys_tiles(src, w2, n, single=False)
    _topk_keys_kernel[(triton.cdiv(n, block_n),)](
        src, w2 if fused else src, b2 if fused else src, keys, keys, out, batch, n, rank, 0, src.stride(0),
        w2.stride(0) if fused else 0, 0.0, FUSED=fused, RELU=relu, USE_DOT=use_dot,
        B_PAD=DOT_BATCH if use_dot else 1, BLOCK_N=block_n, BLOCK_R=block_r, KEY_BITS=key_bits, LEVELS=key_bits // 8,
        SINGLE=False, PRECISION="tf32" if _INTERPRETED else _precision(src), UPCAST=_INTERPRETED, HIST=False,
        num_warps=4, **_pdl(src))
    _above_emit_kernel[(triton.cdiv(n, WIDE_SLICE),)](keys, out, count, tally, n, threshold_key(threshold, src.dtype),
                                                      BLOCK=WIDE_SLICE, SCAN=4 * WIDE_SLICE, num_warps=4,
                                                      **_pdl(keys))


def select_above(scores: torch.Tensor, threshold: float, out: torch.Tensor, count: torch.Tensor, tally: torch.Tensor,
                 keys: torch.Tensor) -> None:
    """out[:count] = ascending units whose batch-max score is above threshold; count [1] int32 = how many;
    tally [2] int64 += (count, 1); keys: int32 scratch [n]."""
    _select_above(scores, None, None, False, threshold, out, count, tally, keys)


def predict_above(h: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, relu: bool, threshold: float,
                  out: torch.Tensor, count: torch.Tensor, tally: torch.Tensor, keys: torch.Tensor) -> None:
    """select_above of relu?(h) @ w2.T + b2 (rounded to h's dtype) without writing the scores."""
    _select_above(h, w2, b2, relu, threshold, out, count, tally, keys)


# ------------------------------------------------------------------------------------------------
# quantized MLP scores: out[b, r] = |act(x[b] . gate~[r]) * (x[b] . up~[r])| (|act(x[b] . up~[r] + bias)| plain)
# from the 4- or 8-bit copies of quantized_predictor.py in its tile_rows layout: codes as int32 words [d * bits / 32,
# n] (one word: 32 / bits consecutive inputs of one row) and scales [G, n]. A program owns BLOCK_N rows; a step
# reads one group's words of all of them (contiguous along the rows: coalesced) and unpacks each word in the
# thread that loaded it, so the sum over a group's inputs stays in registers (no shuffles). A code becomes a float
# by bit arithmetic, not a conversion instruction: (code | 0x4B000000) read as fp32 is 2^23 + code.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _quant_group(x_ptr, words_ptr, scales_ptr, g, offs_n, mask_n, offs_b, mask_b, N, stride_xb,
                 BITS: tl.constexpr, GROUP: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """One group's contribution, [WORDS, BLOCK_N] at batch 1 and [B_PAD, WORDS, BLOCK_N] otherwise: the caller
    sums over the words once at the end (a sum over them at every step cost ~3x the time)."""
    WORDS: tl.constexpr = GROUP * BITS // 32
    PER_WORD: tl.constexpr = 32 // BITS
    LEVELS: tl.constexpr = 2 ** BITS - 1
    offs_k = tl.arange(0, WORDS)
    words = tl.load(words_ptr + (g * WORDS + offs_k[:, None]).to(tl.int64) * N + offs_n[None, :],
                    mask=mask_n[None, :], other=0)
    scale = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if B_PAD == 1:
        part = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
    else:
        part = tl.zeros((B_PAD, WORDS, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(PER_WORD):
        code = ((words >> (BITS * j)) & LEVELS) | 0x4B000000
        # 2^23 + code - (2^23 + the offset) is exact in fp32: the signed integer the code stands for
        q = code.to(tl.float32, bitcast=True) - (8388608.0 + 2 ** (BITS - 1))
        if B_PAD == 1:
            xj = tl.load(x_ptr + g * GROUP + PER_WORD * offs_k + j).to(tl.float32)
            part += q * xj[:, None]
        else:
            xj = tl.load(x_ptr + offs_b[:, None] * stride_xb + g * GROUP + PER_WORD * offs_k[None, :] + j,
                         mask=mask_b[:, None], other=0.0).to(tl.float32)
            part += q[None, :, :] * xj[:, :, None]
    if B_PAD == 1:  # one return: Triton refuses one inside a branch
        scaled = part * scale[None, :]
    else:
        scaled = part * scale[None, None, :]
    return scaled


@triton.jit
def _quant_scores_kernel(x_ptr, uw_ptr, us_ptr, ub_ptr, gw_ptr, gs_ptr, out_ptr, B, N, G, stride_xb, stride_ob,
                         BITS: tl.constexpr, GROUP: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                         ACT: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    _grid_dependency(PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_b = tl.arange(0, B_PAD)
    mask_b = offs_b < B
    WORDS: tl.constexpr = GROUP * BITS // 32
    if B_PAD == 1:
        acc_u = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
    else:
        acc_u = tl.zeros((B_PAD, WORDS, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((B_PAD, WORDS, BLOCK_N), dtype=tl.float32)
    for g in range(0, G):
        acc_u += _quant_group(x_ptr, uw_ptr, us_ptr, g, offs_n, mask_n, offs_b, mask_b, N, stride_xb, BITS, GROUP,
                              B_PAD, BLOCK_N)
        if GATED:
            acc_g += _quant_group(x_ptr, gw_ptr, gs_ptr, g, offs_n, mask_n, offs_b, mask_b, N, stride_xb, BITS,
                                  GROUP, B_PAD, BLOCK_N)
    if B_PAD == 1:
        acc_u = tl.sum(acc_u, axis=0, keep_dims=True)
        acc_g = tl.sum(acc_g, axis=0, keep_dims=True)
    else:
        acc_u = tl.sum(acc_u, axis=1)
        acc_g = tl.sum(acc_g, axis=1)
    if HAS_BIAS:
        acc_u += tl.load(ub_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GATED:
        y = _activation(acc_g, ACT) * acc_u
    else:
        y = _activation(acc_u, ACT)
    tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :], tl.abs(y),
             mask=mask_b[:, None] & mask_n[None, :])


# (rows a program, warps, stages) at batch 1 and at batches 2-16: the best of bench/quant_scores_config.py's 32
# shapes on the H100 at 7B shapes (BENCHMARKS.md, session 26)
QUANT_SCORES_LAUNCH = {1: (32, 8, 4), "batch": (16, 4, 4)}


def quant_scores(x: torch.Tensor, up_codes: torch.Tensor, up_scales: torch.Tensor, up_bias: torch.Tensor | None,
                 gate_codes: torch.Tensor | None, gate_scales: torch.Tensor | None, bits: int, act: int,
                 out: torch.Tensor, block: tuple | None = None) -> torch.Tensor:
    """out [B, n] fp32 = the quantized predictor's scores of x [B, d], its codes and scales in tile_rows' layout
    (quantized_predictor.tile_rows); the bias only without a gate, as the plain MLPs that have one.
    block: (rows a program, warps, stages), else QUANT_SCORES_LAUNCH's for the batch."""
    batch, d = x.shape
    g, n = up_scales.shape
    group = d // g
    assert batch <= DOT_BATCH and x.stride(1) == 1 and out.dtype == torch.float32 and out.shape == (batch, n)
    assert up_codes.is_contiguous() and up_scales.is_contiguous() and up_codes.dtype == torch.int32
    assert up_codes.shape == (d * bits // 32, n) and group * bits >= 32
    assert (gate_codes is None) == (gate_scales is None) and (gate_codes is None or up_bias is None)
    block_n, warps, stages = block or QUANT_SCORES_LAUNCH[1 if batch == 1 else "batch"]
    gc, gs = (gate_codes, gate_scales) if gate_codes is not None else (up_codes, up_scales)
    _quant_scores_kernel[(triton.cdiv(n, block_n),)](
        x, up_codes, up_scales, up_bias if up_bias is not None else up_scales, gc, gs, out, batch, n, g,
        x.stride(0), out.stride(0), BITS=bits, GROUP=group, GATED=gate_codes is not None, HAS_BIAS=up_bias is not None,
        ACT=act, B_PAD=triton.next_power_of_2(batch), BLOCK_N=block_n, num_warps=warps, num_stages=stages, **_pdl(x))
    return out
