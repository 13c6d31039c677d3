"""Decode speed of MLP score thresholds against the top-k at the same MLP density, in the same decode loop.

Usage: python bench/score_threshold_speed.py --synthetic llama-2-7b [--layers N] [--device cuda]
         [--dtype bfloat16] [--mlp 0.5,0.25] [--heads 0.5] [--batches 1,8] [--tokens 64] [--out DIR]

For each MLP density: the random predictors' top-k, then the same predictors with score thresholds calibrated
(runtime/score_thresholds.py) on 256 random tokens through the random model to keep that density on average.
A threshold step computes as many neurons as its scores put above the thresholds, so the table gives the share
of the MLP the timed steps really read, and the byte bound is taken at that share. Synthetic (random) weights:
speed only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dejavu.runtime import speed
from dejavu.runtime.score_thresholds import calibrate_score_thresholds
from dejavu.runtime.synthetic import build_synthetic
from dejavu.runtime.thresholds import RANDOM_CALIBRATION_TOKENS as CALIBRATION_TOKENS
from dejavu.runtime.thresholds import random_calibration_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--mlp", default="0.5,0.25", help="MLP densities, comma-separated")
    ap.add_argument("--heads", type=float, default=0.5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    densities = [float(d) for d in args.mlp.split(",")]
    model, adapter, preds = build_synthetic(args.synthetic, args.layers, args.device, dtype, densities[0], args.heads)
    ids = random_calibration_ids(model)
    rows = []
    for density in densities:
        preds.with_densities(density, args.heads)
        for rule in ("topk", "threshold"):
            preds.mlp_score_thresholds = None
            if rule == "threshold":
                preds.mlp_score_thresholds = calibrate_score_thresholds(model, adapter, preds, ids, CALIBRATION_TOKENS)
            report = speed.speed_report(model, adapter, preds, device=torch.device(args.device), dtype=dtype,
                                        batch_sizes=batches, decode_tokens=args.tokens, warmup=args.warmup,
                                        hf_eager_tokens=4)
            for b, row in report["batches"].items():
                rows.append({"mlp_density": density, "head_density": args.heads, "rule": rule, "batch": int(b),
                             "mlp_share_read": row.get("sparse_mlp_share_read", density), **row})
                r = rows[-1]
                print(f"MLP {density:g} / heads {args.heads:g}, {rule:9s} batch {b}: dense {r['dense_ms_per_token']:.3f}"
                      f" ms, sparse {r['sparse_ms_per_token']:.3f} ms, {r['speedup']:.2f}x (bound {r['bound_speedup']:.2f}x,"
                      f" {r['fraction_of_bound']:.0%} of it), MLP share read {r['mlp_share_read']:.3f}", flush=True)
    result = {"model": args.synthetic, "synthetic": True, "layers": args.layers, "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "dtype": args.dtype,
              "calibration": f"{CALIBRATION_TOKENS} random tokens through the synthetic model", "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"score_threshold_speed_{args.synthetic}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
