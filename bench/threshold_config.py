"""Tile sweep of threshold_vecmat_acc (batch 1) at the decode loop's four shapes (Llama-2-7B): which
(BLOCK_R, BLOCK_N, num_warps, programs per SM) reads the kept rows fastest at each keep share.

The default (vecmat_config) is timed too; times as in bench/mlp_kernel.py (CUDA graphs over 4
weight sets larger than L2).
Usage: python bench/threshold_config.py [--out DIR] [--keeps 0.5,0.8] [--shapes o_t,qkv_t] [--stages 1,2,3,4]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton
from mlp_kernel import ROT, graph_ms
from triton.runtime.errors import OutOfResources

from dejavu.runtime.kernels import triton_kernels as T
from dejavu.runtime.speed import copy_bandwidth_gbps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--keeps", default="0.5,0.8")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--shapes", default="gate_up_t,down_t,qkv_t,o_t")
    ap.add_argument("--stages", default="", help="also sweep the software pipeline's depth (num_stages), e.g. 1,2,3,4")
    args = ap.parse_args()
    stage_options = [int(v) for v in args.stages.split(",") if v] or [None]
    torch.manual_seed(0)
    d, n, dt, dev = args.d, args.n, torch.bfloat16, "cuda"
    bw = copy_bandwidth_gbps(torch.device(dev))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = {"gate_up_t": (d, 2 * n), "down_t": (n, d), "qkv_t": (d, 3 * d), "o_t": (d, d)}
    results = []
    for name, (rows, width) in ((k, v) for k, v in shapes.items() if k in args.shapes.split(",")):
        wt = [torch.randn(rows, width, device=dev, dtype=dt) * 0.02 for _ in range(ROT)]
        h = torch.randn(1, rows, device=dev, dtype=dt)
        acc = torch.zeros(1, width, device=dev, dtype=torch.float32)
        for keep in (float(k) for k in args.keeps.split(",")):
            ah = h.float().abs().flatten()
            t = float(ah.kthvalue(max(1, round((1 - keep) * rows))).values)
            nbytes = int((ah > t).sum()) * width * 2
            default = T.vecmat_config(1, rows, width, sms)
            timed = []
            for block_r, block_n, warps, per_sm, stages in itertools.product((16, 32, 64), (128, 256, 512), (4, 8),
                                                                             (2, 4, 8), stage_options):
                if block_r * block_n // (32 * warps) > 256:  # tile elements per thread: spills beyond this
                    continue
                col_blocks = triton.cdiv(width, block_n)
                splits = max(1, min(triton.cdiv(rows, block_r), triton.cdiv(per_sm * sms, col_blocks)))
                cfg = (block_r, block_n, warps, splits) + ((stages,) if stages else ())
                try:
                    ms = graph_ms(lambda i=0, cfg=cfg, t=t, wt=wt, h=h, acc=acc: T.threshold_vecmat_acc(h, wt[i], t, acc,
                                                                                                      cfg))
                except OutOfResources:  # deep pipelines of large tiles outgrow shared memory
                    continue
                timed.append(dict(config=cfg, per_sm=per_sm, us=ms * 1e3, frac_copy_bw=nbytes / ms / 1e6 / bw))
            base_ms = graph_ms(lambda i=0, t=t, wt=wt, h=h, acc=acc: T.threshold_vecmat_acc(h, wt[i], t, acc))
            timed.sort(key=lambda r: r["us"])
            best = timed[0]
            results.append(dict(shape=name, rows=rows, width=width, keep=keep, default=default,
                                default_us=base_ms * 1e3, default_frac=nbytes / base_ms / 1e6 / bw, top=timed[:5]))
            print(f"{name} [{rows}, {width}] keep {keep:g}: default {default} {base_ms * 1e3:.1f} us "
                  f"({results[-1]['default_frac']:.2f} of copy); best {best['config']} ({best['per_sm']}/SM) "
                  f"{best['us']:.1f} us ({best['frac_copy_bw']:.2f}); next "
                  + ", ".join(f"{r['config']} {r['us']:.1f}" for r in timed[1:4]), flush=True)
        del wt
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "threshold_config.json").write_text(json.dumps({"copy_bandwidth_gbps": bw, "sms": sms,
                                                            "device": torch.cuda.get_device_name(),
                                                            "results": results}, indent=1))


if __name__ == "__main__":
    main()
