"""Predictor pieces at Llama-2-7B shapes (bf16, batch 1 and 8), each timed as a CUDA graph of 32 calls
(one per layer): torch.topk, the single-program select_topk, the wide select_topk_wide; a whole predictor
unfused (matmul, matmul, select_topk) and fused (matmul, then second layer + wide top-k in one pass);
and one layer's pair (MLP "current" + next layer's heads "lookahead", both reading one input): separate
vs one concatenated first-layer GEMV. Checks the wide selection equals the single-program one."""

from __future__ import annotations

import json
import os
import sys

import torch

from dejavu.predictor import LowRankPredictor
from dejavu.runtime.decode import FoldedPredictor, PredictorGroup
from dejavu.runtime.kernels import triton_kernels as T


def graph_us(fn, calls: int = 32, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(reps):
        g.replay()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) * 1e3 / reps / calls


def main() -> None:
    dev, dt, d = "cuda", torch.bfloat16, 4096
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, d, device=dev, dtype=dt)
        for n, k, rank in ((11008, 5504, 256), (11008, 1101, 256), (32, 16, 256), (32, 16, 32)):
            scores = torch.randn(batch, n, device=dev, dtype=dt)
            ws = T.TopkWorkspace(n, dt, dev)
            single, wide = T.select_topk(scores, k), T.select_topk_wide(scores, k, ws=ws)
            if not torch.equal(single, wide):
                print(f"WARNING: wide selection differs from the single-program one (batch {batch}, n {n}, k {k})")
            pred = FoldedPredictor.fold(LowRankPredictor(d, n, rank), k, 0, dev, dt)
            h = torch.addmm(pred.b1, x, pred.w1.T)
            row = {"batch": batch, "n": n, "k": k, "rank": rank,
                   "torch_topk_us": graph_us(lambda s=scores, k=k: torch.topk(s.amax(0), k, sorted=False)),
                   "select_topk_us": graph_us(lambda s=scores, k=k: T.select_topk(s, k)),
                   "select_topk_wide_us": graph_us(lambda s=scores, k=k, w=ws: T.select_topk_wide(s, k, ws=w)),
                   "predictor_classic_us": graph_us(lambda p=pred, x=x: p.select(x)),
                   "predictor_fused_us": graph_us(
                       lambda p=pred, x=x: p.select_from_hidden(torch.addmm(p.b1, x, p.w1.T))),
                   "second_layer_fused_us": graph_us(lambda p=pred, h=h: p.select_from_hidden(h))}
            rows.append(row)
            print(" ".join(f"{key} {val:.1f}" if isinstance(val, float) else f"{key} {val}"
                           for key, val in row.items()), flush=True)
        # one layer's pair: MLP (rank 256, 11008 -> 5504) + heads (rank 32 as trained, 32 -> 16)
        for head_rank in (32, 256):
            mlp = FoldedPredictor.fold(LowRankPredictor(d, 11008, 256), 5504, 0, dev, dt)
            heads = FoldedPredictor.fold(LowRankPredictor(d, 32, head_rank), 16, 0, dev, dt)
            classic = graph_us(lambda m=mlp, hp=heads, x=x: (m.select(x), hp.select(x)))
            group = PredictorGroup.build([("mlp", 0, mlp), ("heads", 1, heads)])
            fused = graph_us(lambda g=group, x=x: g.run(x, "fused"))
            row = {"batch": batch, "pair_head_rank": head_rank, "pair_classic_us": classic, "pair_fused_us": fused}
            rows.append(row)
            print(f"batch {batch} MLP+heads pair (head rank {head_rank}): classic {classic:.1f} us, "
                  f"fused {fused:.1f} us", flush=True)
    out = os.environ.get("OUT") or (sys.argv[1] if len(sys.argv) > 1 else None)
    if out:
        with open(os.path.join(out, "topk_speed.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
