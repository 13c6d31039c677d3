"""Quantized-weight MLP predictors in the graph-captured decode step: ms/token of dense, of the trained-shape
(random low-rank) predictors and of 4- or 8-bit copies of gate and up as predictors, at the same densities,
each against the bound its bytes allow (dense bytes over sparse bytes, predictors included). Synthetic
weights: speed only; the copies quantize the random weights, which costs the same bytes as real ones.

Usage: python bench/quantized_speed.py --synthetic llama-2-7b [--mlp 0.5,0.3] [--bits 4] [--batches 1,8]
         [--tokens 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dejavu.predictor import LayerPredictors, PredictorSet
from dejavu.quantized_predictor import MLP_INPUT, QuantizedMLPPredictor, quantize_mlp
from dejavu.runtime import speed
from dejavu.runtime.decode import DecodeModel
from dejavu.runtime.synthetic import build_synthetic


def quantized_predictors(adapter, bits: int, density: float) -> PredictorSet:
    act = adapter.activation_name()
    layers = [LayerPredictors(QuantizedMLPPredictor(quantize_mlp(adapter.mlp_weights(layer), bits, 64), bits, 64, act),
                              None, density, 1.0) for layer in adapter.decoder_layers()]
    return PredictorSet(layers, mlp_pairing=MLP_INPUT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--mlp", default="0.5,0.3")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--triton-too", action="store_true",
                    help="also time 4-bit copies through the Triton scores kernel instead of PyTorch's int4 matmul")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, adapter, lowrank = build_synthetic(args.synthetic, args.layers, device, dtype, 0.5, 1.0)
    context = 16 + args.tokens // 2
    max_len = speed.cache_length(16, args.warmup, args.tokens)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []

    def measure(name: str, preds: PredictorSet | None, density: float) -> None:
        dm = DecodeModel(model, adapter, preds, device, dtype, max_len=max_len)
        for batch in batches:
            sparse = preds is not None
            ms = speed.decode_ms_per_token(dm, batch, sparse, args.tokens, args.warmup)
            step_bytes = dm.step_bytes(batch, context, sparse=sparse)
            dense_bytes = dm.step_bytes(batch, context, sparse=False)["total"]
            rows.append({"rule": name, "mlp_density": density, "batch": batch, "ms_per_token": ms,
                         "bytes": step_bytes["total"], "predictor_bytes": step_bytes["predictors"],
                         "byte_bound": dense_bytes / step_bytes["total"]})
            print(f"{name:>18} MLP {density:g} batch {batch}: {ms:.3f} ms/token, {step_bytes['total'] / 1e6:.1f} MB "
                  f"(predictors {step_bytes['predictors'] / 1e6:.1f} MB), byte bound "
                  f"{dense_bytes / step_bytes['total']:.2f}x", flush=True)
        del dm

    measure("dense", None, 1.0)
    for density in [float(m) for m in args.mlp.split(",")]:
        measure("low-rank", lowrank.with_densities(density, 1.0), density)
        for bits in [int(b) for b in args.bits.split(",")]:
            quantized = quantized_predictors(adapter, bits, density)
            measure(f"{bits}-bit gate/up", quantized, density)
            if bits == 4 and args.triton_too:  # the Triton scores kernel in place of PyTorch's int4 matmul
                import dejavu.runtime.decode as decode

                use = decode._int4_matmul
                decode._int4_matmul = lambda *a: None
                measure("4-bit, Triton", quantized, density)
                decode._int4_matmul = use
    dense = {r["batch"]: r["ms_per_token"] for r in rows if r["rule"] == "dense"}
    for r in rows:
        r["speedup"] = dense[r["batch"]] / r["ms_per_token"]
        r["share_of_bound"] = r["speedup"] / r["byte_bound"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantized_speed.json").write_text(json.dumps({
        "synthetic": args.synthetic, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype), "head_density": 1.0, "rows": rows}, indent=1))
    for r in rows:
        print(f"{r['rule']:>18} MLP {r['mlp_density']:g} batch {r['batch']}: {r['speedup']:.2f}x "
              f"({r['share_of_bound']:.0%} of {r['byte_bound']:.2f}x)")


if __name__ == "__main__":
    main()
