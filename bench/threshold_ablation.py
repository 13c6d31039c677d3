"""What each small kernel of the threshold (TEAL-style) decode step costs in place: the graphed step is
timed as is, then with one op at a time replaced by a no-op. The no-op runs give wrong tokens but read
about the same bytes (thresholds keep a share of whatever values they see), so the difference bounds
what fusing that op away could save. Speed only, synthetic weights.

Usage: python bench/threshold_ablation.py [--synthetic llama-2-7b] [--keep 0.5:0.5:0.5] [--tokens 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from dejavu.runtime import speed
from dejavu.runtime.decode import DecodeModel, GraphedStep
from dejavu.runtime.kernels import ops
from dejavu.runtime.synthetic import build_synthetic
from dejavu.runtime.thresholds import calibrate_on_random_tokens

# op name in `ops` -> what it does in a threshold step
ABLATABLE = {
    "act_mul_acc": "act(gate) x up out of the gate/up accumulator",
    "rope_cache_write_acc": "q/k/v out of their accumulator, rotated, k/v cached",
    "decode_attention": "attention over the cache",
    "residual_rmsnorm": "residual add + RMSNorm (twice a layer)",
}


def _recording(op, into: list):
    def run(*args, **kwargs):
        into.append(op(*args, **kwargs))
        return into[-1]
    return run


def _replaying(outputs: list):
    calls = itertools.count()
    return lambda *args, **kwargs: outputs[next(calls) % len(outputs)]


def _no_op(*args, **kwargs) -> None:
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--keep", default="0.5:0.5:0.5", help="KEEP_X:KEEP_H:KEEP_ATTN")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timings per variant (the best is kept)")
    ap.add_argument("--out", default="runs/threshold-ablation")
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    keep_x, keep_h, keep_attn = (float(v) for v in args.keep.split(":"))
    model, adapter, _ = build_synthetic(args.synthetic, args.layers, device, dtype, 1.0, 1.0)
    thresholds = calibrate_on_random_tokens(model, adapter, keep_x, keep_h, keep_attn=keep_attn)
    dm = DecodeModel(model, adapter, None, device, dtype, speed.cache_length(speed.PROMPT_LEN, args.warmup, args.tokens),
                     thresholds=thresholds)

    def timed(sparse: bool, patch: str | tuple | None = None) -> float:
        best = float("inf")
        for seed in range(args.repeats):
            st = dm.new_state(args.batch, dense_only=not sparse)
            prompt = torch.randint(1, dm.embed.shape[0], (args.batch, speed.PROMPT_LEN),
                                   generator=torch.Generator().manual_seed(seed))
            dm.prefill(st, prompt)
            # real steps first, so every buffer the patched op would have written holds real values
            recorded = []
            original = ops.decode_attention
            ops.decode_attention = _recording(original, recorded)
            try:
                for _ in range(3):
                    dm.step(st, sparse)
            finally:
                ops.decode_attention = original
            patches = (patch,) if isinstance(patch, str) else patch or ()
            saved = {name: getattr(ops, name) for name in patches}
            for name in patches:
                # attention's stand-in returns the last real output of that layer
                setattr(ops, name, _replaying(recorded[-len(dm.layers):]) if name == "decode_attention" else _no_op)
            try:
                step = GraphedStep(dm, st, sparse)
                best = min(best, speed.timed_loop(step, dm.device, args.warmup, args.tokens))
            finally:
                for name, op in saved.items():
                    setattr(ops, name, op)
            del step, st
        return best

    result = {"model": args.synthetic, "synthetic": True, "keep": args.keep, "batch": args.batch,
              "device_name": torch.cuda.get_device_name(), "dense_ms": timed(False), "sparse_ms": timed(True),
              "without": {}}
    print(f"dense {result['dense_ms']:.3f} ms, thresholds {args.keep} {result['sparse_ms']:.3f} ms", flush=True)
    for name, what in ABLATABLE.items():
        ms = timed(True, name)
        calls = len(dm.layers) * (2 if name == "residual_rmsnorm" else 1)
        saved_us = (result["sparse_ms"] - ms) * 1e3 / calls
        result["without"][name] = {"ms": ms, "saved_us_per_call": saved_us, "what": what}
        print(f"  without {name}: {ms:.3f} ms ({saved_us:.2f} us a call; {what})", flush=True)
    # all the small kernels at once: what a step of the projections and attention alone would take
    small = ("act_mul_acc", "rope_cache_write_acc", "residual_rmsnorm")
    ms = timed(True, small)
    result["without"]["all small kernels"] = {"ms": ms, "saved_us_per_layer": (result["sparse_ms"] - ms) * 1e3
                                              / len(dm.layers), "what": " + ".join(small)}
    print(f"  without {' + '.join(small)}: {ms:.3f} ms "
          f"({(result['sparse_ms'] - ms) * 1e3 / len(dm.layers):.2f} us a layer)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "threshold_ablation.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
