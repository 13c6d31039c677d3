"""Repeat the residual-norm test's sequence; on a mismatch print where rows differ."""
import os
import sys

import torch

from dejavu.runtime import reference as R
from dejavu.runtime.kernels import triton_kernels as T


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()

fails = []
for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 1):
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        dev, B, d = "cuda", 3, 2304
        h = torch.randn(B, d, device=dev, dtype=dtype)
        delta = torch.randn(B, d, device=dev) * 40
        w, post = (torch.randn(d, device=dev, dtype=dtype) for _ in range(2))
        bias, norm_bias = (torch.randn(d, device=dev, dtype=dtype) for _ in range(2))
        cases = [(w, post, 1.0, None, None, False), (None, post, 0.0, None, None, False), (None, None, 0.0, None, None, False),
                 (w, None, 0.0, None, None, False), (w, None, 0.0, bias, norm_bias, True), (w, None, 0.0, None, None, True)]
        for ci, (weight, delta_norm, offset, delta_bias, nb, centered) in enumerate(cases):
            h1, h2, d1, d2 = h.clone(), h.clone(), delta.clone(), delta.clone()
            o1, o2, n1, n2 = (torch.empty_like(h) for _ in range(4))
            R.residual_rmsnorm(h1, d1, weight, o1, 1e-6, offset, True, n1, delta_norm, delta_bias, nb, centered)
            T.residual_rmsnorm(h2, d2, weight, o2, 1e-6, offset, True, n2, delta_norm, delta_bias, nb, centered)
            torch.cuda.synchronize()
            ro, rn = rel(o2, o1), rel(n2, n1)
            if ro > 1e-2 or rn > 1e-2 or d2.abs().max() != 0:
                info = []
                for r in range(B):
                    bad = ((o2[r].float() - o1[r].float()).abs() > 0.05 * o1[r].float().abs().max()).nonzero().flatten()
                    badn = ((n2[r].float() - n1[r].float()).abs() > 0.05 * n1[r].float().abs().max()).nonzero().flatten()
                    info.append((r, bad.numel(), bad.min().item() if bad.numel() else None, bad.max().item() if bad.numel() else None,
                                 badn.numel(), badn.min().item() if badn.numel() else None))
                fails.append((rep, str(dtype), ci, round(ro, 4), round(rn, 4), info))
                print("FAIL", fails[-1], flush=True)
print("PDL env", os.environ.get("DEJAVU_PDL"), "fails", len(fails))
