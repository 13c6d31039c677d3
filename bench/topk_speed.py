"""Predictor pieces at Llama-2-7B shapes (bf16, batch 1 and 8): torch.topk vs the Triton select_topk,
and one whole FoldedPredictor.select, each timed as a CUDA graph of 32 calls (one per layer)."""

from __future__ import annotations

import torch

from dejavu.predictor import LowRankPredictor
from dejavu.runtime.decode import FoldedPredictor
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
    dev, dt = "cuda", torch.bfloat16
    for batch in (1, 8):
        for n, k in ((11008, 5504), (11008, 1101), (32, 16)):
            scores = torch.randn(batch, n, device=dev, dtype=dt)
            tk = graph_us(lambda s=scores, k=k: torch.topk(s.amax(0), k, sorted=False))
            ours = graph_us(lambda s=scores, k=k: T.select_topk(s, k))
            pred = FoldedPredictor.fold(LowRankPredictor(4096, n, 256 if n > 32 else 32), k, 0, dev, dt)
            x = torch.randn(batch, 4096, device=dev, dtype=dt)
            whole = graph_us(lambda p=pred, x=x: p.select(x))
            print(f"batch {batch} n {n:5d} k {k:5d}: torch.topk {tk:6.1f} us | select_topk {ours:6.1f} us | "
                  f"predictor.select {whole:6.1f} us")


if __name__ == "__main__":
    main()
