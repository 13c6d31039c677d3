"""TEAL-style threshold sparsity for the MLP at batch 1, timed on the GPU (the decode loop's kernels).

No predictor and no selection step. Gate and up are stored transposed ([d, 2n]), and
threshold_vecmat_acc skips every row whose |x_j| is at or below the layer's threshold (its loads are
predicated off, so those bytes are never read). act_mul_acc forms act(gate) * up. Down^T's rows are
skipped the same way by |down input|. Three launches in all (see BENCHMARKS.md, "Input sparsity
without a predictor").

Thresholds are set from this input's own magnitudes so that X of x and D of the down input are kept.
Timing is as in bench/mlp_kernel.py: CUDA graphs over 4 weight sets larger than L2. The one-launch
top-k kernel (sparse_mlp_gemv) at the same bytes is timed alongside.
--attention also times the attention projections the same way (TEAL's whole-model rule): q/k/v from
W_qkv^T [d, 3d] and o from W_o^T [d, d], each one threshold_vecmat_acc launch, against cuBLAS.
Usage: python bench/mlp_threshold.py [--out DIR] [--pairs 0.8:0.5,0.7:0.5,0.9:0.5,0.5:0.5] [--attention]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# a sibling script: bench/ is on sys.path when this one runs
from mlp_kernel import graph_ms, rotated_mlp_weights

from dejavu.runtime.kernels import triton_kernels as T
from dejavu.runtime.speed import copy_bandwidth_gbps


def threshold_mlp(x, gate_up_t, down_t, tx: float, th: float, acc2, h, out) -> None:
    T.threshold_vecmat_acc(x, gate_up_t, tx, acc2)
    T.act_mul_acc(acc2, 1, h)
    T.threshold_vecmat_acc(h, down_t, th, out)


def attention_rows(d: int, dt, dev: str, bw: float, keeps: list[float]) -> list[dict]:
    """q/k/v ([d, 3d]) and o ([d, d]) as threshold_vecmat_acc launches at each keep share, vs cuBLAS."""
    rows = []
    for name, width in (("qkv", 3 * d), ("o", d)):
        rows += projection_rows(name, d, width, dt, dev, bw, keeps)
    return rows


def projection_rows(name: str, d: int, width: int, dt, dev: str, bw: float, keeps: list[float]) -> list[dict]:
    from mlp_kernel import ROT

    wt = [torch.randn(d, width, device=dev, dtype=dt) * 0.02 for _ in range(ROT)]
    x = torch.randn(1, d, device=dev, dtype=dt)
    acc = torch.zeros(1, width, device=dev, dtype=torch.float32)
    dense_ms = graph_ms(lambda i=0: x @ wt[i])
    print(f"{name} [{d}, {width}]: dense (cuBLAS) {dense_ms * 1e3:.1f} us "
          f"({d * width * 2 / dense_ms / 1e6 / bw:.2f} of copy)", flush=True)
    rows = []
    for keep in keeps:
        ax = x.float().abs().flatten()
        t = -1.0 if keep >= 1 else float(ax.kthvalue(max(1, round((1 - keep) * d))).values)
        kept = int((ax > t).sum())
        ms = graph_ms(lambda i=0, t=t: T.threshold_vecmat_acc(x, wt[i], t, acc))
        nbytes = kept * width * 2
        rows.append(dict(projection=name, keep=kept / d, ms=ms, dense_ms=dense_ms, bytes=nbytes,
                         frac_copy_bw=nbytes / ms / 1e6 / bw, vs_dense=dense_ms / ms))
        print(f"  keep {kept / d:.2f}: {ms * 1e3:6.1f} us ({rows[-1]['frac_copy_bw']:.2f} of copy, "
              f"x{rows[-1]['vs_dense']:.2f} vs dense)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--pairs", default="1.0:1.0,0.9:0.5,0.8:0.5,0.7:0.5,0.5:0.5",
                    help="X:D pairs: shares of x and of the down input kept")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--attention", action="store_true", help="also time q/k/v and o by thresholds")
    args = ap.parse_args()
    torch.manual_seed(0)
    d, n, dt, dev = args.d, args.n, torch.bfloat16, "cuda"
    bw = copy_bandwidth_gbps(torch.device(dev))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gate_up, down_t = rotated_mlp_weights(d, n, dt, dev)
    gate_up_t = [w.view(2 * n, d).T.contiguous() for w in gate_up]  # the same weights, [d, 2n]
    x = torch.randn(1, d, device=dev, dtype=dt)
    acc2 = torch.zeros(1, 2 * n, device=dev, dtype=torch.float32)
    h = torch.empty(1, n, device=dev, dtype=dt)
    out = torch.zeros(1, d, device=dev, dtype=torch.float32)

    def dense(i=0):
        g = x @ gate_up[i].view(2 * n, d).T
        return T.act_mul(g, 1) @ down_t[i]

    dense_ms = graph_ms(dense)
    dense_bytes = 3 * n * d * 2
    rows = [dict(variant="dense-cublas", ms=dense_ms, bytes=dense_bytes, frac_copy_bw=dense_bytes / dense_ms / 1e6 / bw)]
    print(f"copy bandwidth {bw:.0f} GB/s; d={d} n={n} bf16 batch 1; dense (cuBLAS) {dense_ms * 1e3:.1f} us",
          flush=True)
    for pair in args.pairs.split(","):
        keep_x, keep_h = (float(v) for v in pair.split(":"))
        ax = x.float().abs().flatten()
        tx = -1.0 if keep_x >= 1 else float(ax.kthvalue(max(1, round((1 - keep_x) * d))).values)
        # the down input this x gives, for its threshold and the correctness check
        xs = torch.where(x.float().abs() > tx, x.float(), 0.0)
        gu = xs @ gate_up_t[0].float()
        hv = (torch.nn.functional.silu(gu[:, :n]) * gu[:, n:]).to(dt).float()
        ah = hv.abs().flatten()
        th = -1.0 if keep_h >= 1 else float(ah.kthvalue(max(1, round((1 - keep_h) * n))).values)
        kx, kh = int((ax > tx).sum()), int((ah > th).sum())
        nbytes = (2 * kx * n + kh * d) * 2
        want = torch.where(hv.abs() > th, hv, 0.0) @ down_t[0].float()
        out.zero_()
        threshold_mlp(x, gate_up_t[0], down_t[0], tx, th, acc2, h, out)
        err = ((out - want).norm() / want.norm()).item()

        def sparse(i=0, tx=tx, th=th):
            threshold_mlp(x, gate_up_t[i], down_t[i], tx, th, acc2, h, out)

        ms = graph_ms(sparse)
        # the one-launch top-k kernel reading the same bytes: (2 kx n + kh d) = 3 k d  ->  k neurons
        k = max(1, round(nbytes / 2 / (3 * d)))
        idx = torch.randperm(n, device=dev)[:k]

        def topk_mlp(i=0, idx=idx):
            T.sparse_mlp_gemv(x, gate_up[i][0], gate_up[i][1], down_t[i], idx, 1, out)

        topk_ms = graph_ms(topk_mlp)
        rec = dict(variant="threshold", keep_x=kx / d, keep_h=kh / n, bytes=nbytes, share_of_dense=nbytes / dense_bytes,
                   ms=ms, frac_copy_bw=nbytes / ms / 1e6 / bw, vs_dense=dense_ms / ms, rel_err=err,
                   topk_same_bytes_ms=topk_ms)
        rows.append(rec)
        print(f"keep x {kx / d:.2f} / h {kh / n:.2f}: {nbytes / dense_bytes:.3f} of dense bytes, {ms * 1e3:6.1f} us "
              f"({rec['frac_copy_bw']:.2f} of copy, x{rec['vs_dense']:.2f} vs dense, err {err:.1e}) | top-k kernel, "
              f"same bytes: {topk_ms * 1e3:6.1f} us", flush=True)
    attention = attention_rows(d, dt, dev, bw, [float(p.split(":")[0]) for p in args.pairs.split(",")]) \
        if args.attention else []
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "mlp_threshold.json").write_text(json.dumps({"copy_bandwidth_gbps": bw, "sms": sms, "d": d, "n": n,
                                                         "device": torch.cuda.get_device_name(), "rows": rows,
                                                         "attention": attention},
                                                        indent=1))


if __name__ == "__main__":
    main()
