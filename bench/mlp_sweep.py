"""Per-kernel sweep of the sparse MLP's launch shapes at Llama-2-7B MLP shapes (bf16, H100).

Times the gate/up gather kernel and the down^T accumulate kernel separately, each over tile shapes
and splits, at the densities of issue 5's goal, so that the default rules (gemm_splits,
vecmat_config) can be checked against the best measured shape. Same timing as bench/mlp_kernel.py
(CUDA graphs over ROT weight sets larger than L2).
Usage: python bench/mlp_sweep.py [--out DIR] [--batches 1] [--densities 0.5,0.3,0.1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

# a sibling script: bench/ is on sys.path when this one runs
from mlp_kernel import graph_ms, rotated_mlp_weights

from dejavu.runtime.kernels import triton_kernels as T
from dejavu.runtime.speed import copy_bandwidth_gbps

GATE_UP_TILES = ((32, 128, 4), (16, 128, 4), (16, 256, 4), (64, 64, 4), (32, 256, 8))
DOWN_TILES = ((32, 256, 4), (32, 128, 4), (64, 128, 4), (16, 256, 4), (64, 256, 8), (32, 512, 4))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--densities", default="0.5,0.3,0.1")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--n", type=int, default=11008)
    args = ap.parse_args()
    torch.manual_seed(0)
    d, n, dt, dev = args.d, args.n, torch.bfloat16, "cuda"
    bw = copy_bandwidth_gbps(torch.device(dev))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gu, down_t = rotated_mlp_weights(d, n, dt, dev)
    rows = []
    print(f"copy bandwidth {bw:.0f} GB/s; {sms} SMs; d={d} n={n} bf16", flush=True)
    for batch in [int(b) for b in args.batches.split(",")]:
        x = torch.randn(batch, d, device=dev, dtype=dt)
        acc = torch.zeros(batch, d, device=dev, dtype=torch.float32)
        for density in [float(v) for v in args.densities.split(",")]:
            k = int(n * density)
            idx = torch.randperm(n, device=dev)[:k].sort().values
            a = torch.randn(batch, k, device=dev, dtype=dt)
            gu_bytes, down_bytes = 2 * k * d * 2, k * d * 2

            def record(kernel, cfg, ms, nbytes, default, batch=batch, density=density):
                rec = dict(batch=batch, density=density, kernel=kernel, config=cfg, default=default, us=ms * 1e3,
                           frac_copy_bw=nbytes / ms / 1e6 / bw)
                rows.append(rec)
                return rec

            found = []
            default_splits = None
            for tiles in GATE_UP_TILES:
                auto = T.gemm_splits(k, d, tiles[0], tiles[1], sms)
                for splits in sorted({1, 2, 3, 4, 6, 8, auto}):
                    cfg = (*tiles, splits)

                    def gate_up(i=0, cfg=cfg, x=x, idx=idx):
                        T.gather_matvec(x, gu[i][1], idx, 1, gu[i][0], 1, config=cfg)
                    found.append(record("gate_up", cfg, graph_ms(gate_up), gu_bytes,
                                        tiles == (32, 128, 4) and splits == auto))
                    if found[-1]["default"]:
                        default_splits = found[-1]
            best = min(found, key=lambda r: r["us"])
            print(f"b={batch} density {density}: gate/up default {default_splits['config']} {default_splits['us']:.1f} us "
                  f"({default_splits['frac_copy_bw']:.2f}); best {best['config']} {best['us']:.1f} us "
                  f"({best['frac_copy_bw']:.2f})", flush=True)
            found = []
            default_down = T.vecmat_config(batch if dt == torch.float32 else 2, k, d, sms)
            for tiles in DOWN_TILES:
                col_blocks = triton.cdiv(d, tiles[1])
                base = max(1, triton.cdiv(4 * sms, col_blocks))
                for splits in sorted({max(1, base // 2), base, 2 * base, 4 * base}):
                    cfg = (*tiles, splits)

                    def down(i=0, cfg=cfg, a=a, idx=idx, acc=acc):
                        T.gather_vecmat_acc(a, down_t[i], idx, 1, acc, config=cfg)
                    found.append(record("down", cfg, graph_ms(down), down_bytes, cfg == default_down))
            auto_rec = next((r for r in found if r["default"]), None)
            if auto_rec is None:
                def down_default(i=0, a=a, idx=idx, acc=acc):
                    T.gather_vecmat_acc(a, down_t[i], idx, 1, acc)
                auto_rec = record("down", default_down, graph_ms(down_default), down_bytes, True)
            best = min(found, key=lambda r: r["us"])
            print(f"b={batch} density {density}: down default {auto_rec['config']} {auto_rec['us']:.1f} us "
                  f"({auto_rec['frac_copy_bw']:.2f}); best {best['config']} {best['us']:.1f} us "
                  f"({best['frac_copy_bw']:.2f})", flush=True)
            for r in sorted(found, key=lambda r: r["us"])[:4]:
                print(f"    down {r['config']} {r['us']:.1f} us", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mlp_sweep.json").write_text(json.dumps({"copy_bandwidth_gbps": bw, "sms": sms, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
