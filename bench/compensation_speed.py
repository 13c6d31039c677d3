"""What the MLP compensation costs in the graph-captured decode step: ms/token with and without a random
low-rank term of each rank, same predictors, same densities (synthetic weights: speed only).

Usage: python bench/compensation_speed.py --synthetic llama-2-7b [--ranks 0,32,128] [--mlp 0.5] [--heads 0.5]
         [--batches 1,8] [--tokens 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dejavu.runtime import speed
from dejavu.runtime.compensation import Compensation
from dejavu.runtime.decode import DecodeModel
from dejavu.runtime.synthetic import build_synthetic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--ranks", default="0,32,128")
    ap.add_argument("--mlp", type=float, default=0.5)
    ap.add_argument("--heads", type=float, default=0.5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, adapter, preds = build_synthetic(args.synthetic, args.layers, device, dtype, args.mlp, args.heads)
    d, layers = adapter.shape().hidden_size, adapter.num_layers
    gen = torch.Generator().manual_seed(0)
    rows = []
    for rank in [int(r) for r in args.ranks.split(",")]:
        preds.mlp_compensation = None if rank == 0 else Compensation(
            [(torch.randn(rank, d, generator=gen) / d**0.5, torch.randn(d, rank, generator=gen) * 1e-3, torch.zeros(d))
             for _ in range(layers)])
        dm = DecodeModel(model, adapter, preds, device, dtype, max_len=speed.cache_length(16, args.warmup, args.tokens))
        for batch in [int(b) for b in args.batches.split(",")]:
            ms = speed.decode_ms_per_token(dm, batch, True, args.tokens, args.warmup)
            step_bytes = dm.step_bytes(batch, 16 + args.tokens // 2, sparse=True)
            rows.append({"rank": rank, "batch": batch, "ms_per_token": ms, "predictor_bytes": step_bytes["predictors"],
                         "total_bytes": step_bytes["total"]})
            print(f"rank {rank:4d} batch {batch}: {ms:.3f} ms/token, bytes {step_bytes['total'] / 1e6:.1f} MB "
                  f"(predictors and compensation {step_bytes['predictors'] / 1e6:.1f} MB)", flush=True)
        del dm
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compensation_speed.json").write_text(json.dumps({
        "synthetic": args.synthetic, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype), "mlp_density": args.mlp, "head_density": args.heads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
