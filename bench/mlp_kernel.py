"""Sparse MLP kernels vs dense (cuBLAS) and index_select+matmul at Llama-2-7B MLP shapes.

Each variant is captured in a CUDA graph of ROT calls cycling over ROT independent weight sets
(4 x 270 MB >> 50 MB L2) and timed by replay; ms is per MLP call. GB/s counts the bytes the
variant must read (selected rows of gate, up and down^T; all rows for dense) over its time.
Usage: python bench/mlp_kernel.py [--out DIR] [--batches 1,4,8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dejavu.runtime.kernels import triton_kernels as T
from dejavu.runtime.speed import copy_bandwidth_gbps

ROT = 4


def graph_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(ROT):
            fn(i)
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / ROT)
    times.sort()
    return times[len(times) // 2]


def rotated_mlp_weights(d: int, n: int, dtype: torch.dtype, device: str) -> tuple[list, list]:
    """ROT independent sets of stacked [gate; up] and down^T, together far larger than L2."""
    gu = [torch.randn(2, n, d, device=device, dtype=dtype) * 0.02 for _ in range(ROT)]
    down_t = [torch.randn(n, d, device=device, dtype=dtype) * 0.02 for _ in range(ROT)]
    return gu, down_t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--n", type=int, default=11008)
    args = ap.parse_args()
    torch.manual_seed(0)
    d, n, dt, dev = args.d, args.n, torch.bfloat16, "cuda"
    bw = copy_bandwidth_gbps(torch.device(dev))
    gu, down_t = rotated_mlp_weights(d, n, dt, dev)
    rows = []
    print(f"copy bandwidth {bw:.0f} GB/s; Llama MLP d={d} n={n} bf16")
    for batch in [int(b) for b in args.batches.split(",")]:
        x = torch.randn(batch, d, device=dev, dtype=dt)
        acc = torch.zeros(batch, d, device=dev, dtype=torch.float32)

        def dense(i=0, x=x):
            g = x @ gu[i].view(2 * n, d).T
            a = T.act_mul(g, 1)
            return a @ down_t[i]

        dense_ms = graph_ms(dense)
        dense_bytes = 3 * n * d * 2
        rows.append(dict(batch=batch, variant="dense-cublas", density=1.0, ms=dense_ms,
                         gbps=dense_bytes / dense_ms / 1e6))
        for density in (1.0, 0.8, 0.5, 0.3, 0.1):
            k = int(n * density)
            idx = torch.randperm(n, device=dev)[:k]
            sel_bytes = 3 * k * d * 2
            configs = [None, (16, 128, 4), (16, 256, 4), (32, 128, 4), (32, 64, 4), (64, 64, 4), (16, 128, 8)]
            best = default_ms = None
            for cfg in configs:
                def sparse(i=0, cfg=cfg, x=x, idx=idx, acc=acc):
                    a = T.gather_matvec(x, gu[i][1], idx, 1, gu[i][0], 1, config=cfg)
                    T.gather_vecmat_acc(a, down_t[i], idx, 1, acc)
                try:
                    ms = graph_ms(sparse)
                except Exception as exc:  # a config that does not compile is skipped, and said
                    print(f"config {cfg} failed: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                rec = dict(batch=batch, variant=f"triton{'' if cfg is None else cfg}", density=density, ms=ms,
                           gbps=sel_bytes / ms / 1e6, frac_copy_bw=sel_bytes / ms / 1e6 / bw,
                           vs_dense=dense_ms / ms)
                rows.append(rec)
                default_ms = ms if cfg is None else default_ms
                if best is None or ms < best["ms"]:
                    best = rec

            def isel(i=0, x=x, idx=idx, k=k):
                w = gu[i].index_select(1, idx)
                g = x @ w.view(2 * k, d).T
                a = T.act_mul(g, 1)
                return a @ down_t[i].index_select(0, idx)

            isel_ms = graph_ms(isel)
            rows.append(dict(batch=batch, variant="index_select+matmul", density=density, ms=isel_ms,
                             gbps=sel_bytes / isel_ms / 1e6, vs_dense=dense_ms / isel_ms))
            print(f"b={batch} dens={density:.1f} dense {dense_ms * 1e3:7.1f} us | best triton {best['variant']:>22s} "
                  f"{best['ms'] * 1e3:7.1f} us {best['gbps']:6.0f} GB/s ({best['frac_copy_bw']:.2f} of copy) "
                  f"x{best['vs_dense']:.2f} vs dense | default {(default_ms or 0) * 1e3:7.1f} us"
                  f" | index_select {isel_ms * 1e3:7.1f} us")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mlp_kernel.json").write_text(json.dumps({"copy_bandwidth_gbps": bw, "d": d, "n": n,
                                                      "device": torch.cuda.get_device_name(), "rows": rows},
                                                     indent=1))


if __name__ == "__main__":
    main()
