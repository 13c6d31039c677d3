"""Launch settings (rows a program, warps, stages) of the quantized-weight MLP predictor's scores kernel: time
per call and bandwidth against a copy measured in the same run, at Llama-2-7B MLP shapes (d 4096, n 11008), gate
and up quantized. ROT weight sets in rotation (bench/mlp_kernel.py's timer), so the 48 MB of a 4-bit set never
sits in the H100's 50 MB L2 between calls. At 4 bits it also times PyTorch's int4 matmul (tinygemm, what the
decode loop uses in bf16) on the same codes, for comparison.

Usage: python bench/quant_scores_config.py [--bits 4] [--batches 1,8] [--dtype bfloat16] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from mlp_kernel import ROT, graph_ms

from dejavu.quantized_predictor import quantize_rows, tile_rows
from dejavu.runtime.kernels import triton_kernels as T
from dejavu.runtime.speed import copy_bandwidth_gbps


def int4_sets(raw, d: int) -> list:
    """[gate; up] of each set packed for torch's int4 matmul, as runtime/decode.py's _int4_matmul packs them."""
    out = []
    for (uc, us), (gc, gs) in raw:
        codes, scales = torch.cat([gc, uc]), torch.cat([gs, us])
        packed = torch.ops.aten._convert_weight_to_int4pack(((codes & 0xF) << 4) | (codes >> 4), 8)
        zeros = torch.zeros_like(scales.t(), dtype=torch.bfloat16)
        out.append((packed, torch.stack([scales.t().to(torch.bfloat16), zeros], -1).contiguous()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    d, n = args.d, args.n
    sets, raw = [], []
    for _ in range(ROT):
        up = quantize_rows(torch.randn(n, d, device="cuda") * d ** -0.5, args.bits, 64)
        gate = quantize_rows(torch.randn(n, d, device="cuda") * d ** -0.5, args.bits, 64)
        raw.append((up, gate))
        sets.append((tile_rows(*up), tile_rows(*gate)))
    nbytes = sum(t.numel() * t.element_size() for t in (*sets[0][0], *sets[0][1]))
    copy_bw = copy_bandwidth_gbps(torch.device("cuda"))
    print(f"copy bandwidth {copy_bw:.0f} GB/s; {nbytes / 1e6:.1f} MB of codes and scales a call", flush=True)
    rows = []
    configs = list(itertools.product((16, 32, 64, 128), (1, 2, 4, 8), (2, 4)))
    int4 = int4_sets(raw, d) if args.bits == 4 else None
    for batch in [int(b) for b in args.batches.split(",")]:
        x = torch.randn(batch, d, device="cuda", dtype=getattr(torch, args.dtype))
        if int4 is not None:
            xb = x.to(torch.bfloat16)
            us_call = graph_ms(lambda i=0, xb=xb: torch.ops.aten._weight_int4pack_mm(xb, int4[i % ROT][0], 64,
                                                                                     int4[i % ROT][1])) * 1000
            bw = nbytes / us_call / 1e3
            rows.append({"batch": batch, "config": "int4 matmul", "us": us_call, "gbps": bw,
                         "share_of_copy": bw / copy_bw})
            print(f"batch {batch} int4 matmul: {us_call:.1f} us, {bw:.0f} GB/s ({bw / copy_bw:.2f} of copy)",
                  flush=True)
        out = torch.empty(batch, n, device="cuda")
        for cfg in configs:
            def call(i=0, cfg=cfg, x=x, out=out):
                (uc, us), (gc, gs) = sets[i % ROT]
                T.quant_scores(x, uc, us, None, gc, gs, args.bits, 1, out, block=cfg)
            try:
                us_call = graph_ms(call) * 1000
            except Exception as exc:  # a tile whose pipeline outgrows shared memory
                print(f"batch {batch} {cfg}: failed ({str(exc).splitlines()[0][:80]})", flush=True)
                continue
            bw = nbytes / us_call / 1e3
            rows.append({"batch": batch, "config": cfg, "us": us_call, "gbps": bw, "share_of_copy": bw / copy_bw})
            print(f"batch {batch} {cfg}: {us_call:.1f} us, {bw:.0f} GB/s ({bw / copy_bw:.2f} of copy)", flush=True)
    for batch in {r["batch"] for r in rows}:
        best = min((r for r in rows if r["batch"] == batch and r["config"] != "int4 matmul"), key=lambda r: r["us"])
        print(f"best at batch {batch}: {best['config']} {best['us']:.1f} us ({best['share_of_copy']:.2f} of copy)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quant_scores_config.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "bits": args.bits, "dtype": args.dtype, "d": d, "n": n, "bytes": nbytes,
         "copy_gbps": copy_bw, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
