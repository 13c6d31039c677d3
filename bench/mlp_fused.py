"""One-launch sparse MLP (batch 1) against the two-kernel path and a copy of the same bytes.

Times, at Llama-2-7B MLP shapes (bf16, H100), at each density: the two-kernel path (gather_matvec +
gather_vecmat_acc), sparse_mlp_gemv over a sweep of (BLOCK_R, num_warps, programs per SM), and
torch's copy of a buffer whose read + written bytes equal the selected weight bytes (what a copy of
that size reaches, its own launch ramp and tail included). Same timing as bench/mlp_kernel.py.
Usage: python bench/mlp_fused.py [--out DIR] [--densities 0.5,0.3,0.1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# a sibling script: bench/ is on sys.path when this one runs
from mlp_kernel import ROT, graph_ms, rotated_mlp_weights

from dejavu.runtime.kernels import triton_kernels as T
from dejavu.runtime.speed import copy_bandwidth_gbps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--densities", default="0.8,0.5,0.3,0.1")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--rows", default="1,2,4", help="BLOCK_R values swept (rows a program holds at once)")
    ap.add_argument("--warps", default="4,8", help="num_warps values swept")
    ap.add_argument("--per-sm", default="1,2,4", help="programs per SM swept")
    args = ap.parse_args()
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    sweep = [(b, w, p) for b in ints(args.rows) for w in ints(args.warps) for p in ints(args.per_sm)]
    torch.manual_seed(0)
    d, n, dt, dev = args.d, args.n, torch.bfloat16, "cuda"
    bw = copy_bandwidth_gbps(torch.device(dev))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gu, down_t = rotated_mlp_weights(d, n, dt, dev)
    x = torch.randn(1, d, device=dev, dtype=dt)
    acc = torch.zeros(1, d, device=dev, dtype=torch.float32)
    rows = []
    print(f"copy bandwidth {bw:.0f} GB/s; {sms} SMs; d={d} n={n} bf16 batch 1", flush=True)
    for density in [float(v) for v in args.densities.split(",")]:
        k = int(n * density)
        idx = torch.randperm(n, device=dev)[:k]
        nbytes = 3 * k * d * 2

        def record(variant, ms, density=density, nbytes=nbytes, **extra):
            rec = dict(density=density, variant=variant, us=ms * 1e3, gbps=nbytes / ms / 1e6,
                       frac_copy_bw=nbytes / ms / 1e6 / bw, **extra)
            rows.append(rec)
            return rec

        def two_kernel(i=0, idx=idx):
            a = T.gather_matvec(x, gu[i][1], idx, 1, gu[i][0], 1)
            T.gather_vecmat_acc(a, down_t[i], idx, 1, acc)

        base = record("two-kernel", graph_ms(two_kernel))
        # 2 x ROT buffers of nbytes/2 each: read + written = nbytes a call, together larger than L2
        srcs = [torch.empty(nbytes // 2, device=dev, dtype=torch.uint8) for _ in range(ROT)]
        dsts = [torch.empty_like(s) for s in srcs]
        copy = record("copy-same-bytes", graph_ms(lambda i=0, srcs=srcs, dsts=dsts: dsts[i].copy_(srcs[i])))
        del srcs, dsts
        ref = torch.zeros_like(acc)
        a = T.gather_matvec(x, gu[0][1], idx, 1, gu[0][0], 1)
        T.gather_vecmat_acc(a, down_t[0], idx, 1, ref)
        best = None
        for block_r, warps, per_sm in sweep:
            cfg = (block_r, warps, min(k, per_sm * sms))
            out = torch.zeros_like(acc)
            try:
                T.sparse_mlp_gemv(x, gu[0][0], gu[0][1], down_t[0], idx, 1, out, config=cfg)
                err = ((out - ref).abs().max() / ref.abs().max()).item()

                def fused(i=0, cfg=cfg, idx=idx):
                    T.sparse_mlp_gemv(x, gu[i][0], gu[i][1], down_t[i], idx, 1, acc, config=cfg)

                rec = record("fused", graph_ms(fused), config=list(cfg), per_sm=per_sm, rel_err=err,
                             default=cfg == T.sparse_mlp_config(k, d, sms))
            except Exception as exc:  # a shape that does not compile is skipped, and said
                print(f"config {cfg} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            if best is None or rec["us"] < best["us"]:
                best = rec
        default = next((r for r in rows if r["density"] == density and r.get("default")), None)
        print(f"dens {density:.1f}: two-kernel {base['us']:6.1f} us ({base['frac_copy_bw']:.2f}) | copy same bytes "
              f"{copy['us']:6.1f} us ({copy['frac_copy_bw']:.2f}) | fused best {best['config']} {best['us']:6.1f} us "
              f"({best['frac_copy_bw']:.2f}, err {best['rel_err']:.1e}) | fused default "
              f"{default['us'] if default else float('nan'):6.1f} us", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mlp_fused.json").write_text(json.dumps({"copy_bandwidth_gbps": bw, "sms": sms, "d": d, "n": n,
                                                     "device": torch.cuda.get_device_name(), "rows": rows},
                                                    indent=1))


if __name__ == "__main__":
    main()
