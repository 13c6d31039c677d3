"""What the sparse MLP costs inside the graphed decode step, where PDL lets each kernel start while the one
before it finishes: the step is timed as is, then with `ops.sparse_mlp_acc` made a no-op (the selection
still runs). The difference, per layer, against the bytes the MLP reads gives its bandwidth in place, beside
the kernel timed alone (bench/mlp_fused.py's way: four calls in a CUDA graph). Speed only, synthetic
weights; heads all computed, so only the MLP's density changes.

    python bench/mlp_in_step.py --synthetic llama-2-7b --densities 0.5,0.3,0.1 --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def timed(dm, args, without_mlp: bool) -> float:
    """Best ms per graphed sparse step over args.repeats prompts; without_mlp: the MLP made a no-op."""
    from dejavu.runtime import speed
    from dejavu.runtime.decode import GraphedStep
    from dejavu.runtime.kernels import ops

    best = float("inf")
    saved = ops.sparse_mlp_acc
    for seed in range(args.repeats):
        st = dm.new_state(1)
        dm.prefill(st, torch.randint(1, dm.embed.shape[0], (1, speed.PROMPT_LEN),
                                     generator=torch.Generator().manual_seed(seed)))
        if without_mlp:
            ops.sparse_mlp_acc = lambda *a, **k: None
        try:
            step = GraphedStep(dm, st, True)
            best = min(best, speed.timed_loop(step, dm.device, 5, args.tokens))
        finally:
            ops.sparse_mlp_acc = saved
        del step, st
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", default="llama-2-7b")
    ap.add_argument("--densities", default="0.5,0.3,0.1")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timings per variant (the best is kept)")
    ap.add_argument("--out", type=Path, default=Path("runs/mlp-in-step"))
    args = ap.parse_args()

    from dejavu.runtime import speed
    from dejavu.runtime.decode import DecodeModel
    from dejavu.runtime.synthetic import build_synthetic

    device, dtype = torch.device("cuda"), torch.bfloat16
    copy = speed.copy_bandwidth_gbps(device)
    result = {"synthetic": args.synthetic, "device_name": torch.cuda.get_device_name(), "copy_gbps": copy,
              "densities": {}}
    print(f"copy {copy:.0f} GB/s")
    for density in (float(d) for d in args.densities.split(",")):
        model, adapter, preds = build_synthetic(args.synthetic, None, device, dtype, density, 1.0)
        dm = DecodeModel(model, adapter, preds, device, dtype,
                         speed.cache_length(speed.PROMPT_LEN, 5, args.tokens), dense_impl="triton")

        with_mlp, without = timed(dm, args, False), timed(dm, args, True)
        k = dm.layers[0].mlp_pred.k if getattr(dm.layers[0], "mlp_pred", None) is not None else round(density * dm.n)
        mlp_bytes = 3 * k * dm.d * torch.finfo(dtype).bits // 8  # gate, up and down^T rows of the selected neurons
        per_layer_us = (with_mlp - without) * 1e3 / len(dm.layers)
        gbps = mlp_bytes / (per_layer_us * 1e-6) / 1e9
        result["densities"][str(density)] = {"step_ms": with_mlp, "step_without_mlp_ms": without, "k": k,
                                             "mlp_bytes_per_layer": mlp_bytes, "mlp_us_per_layer": per_layer_us,
                                             "gbps": gbps, "share_of_copy": gbps / copy}
        print(f"density {density:g} (k {k}): step {with_mlp:.3f} ms, without the MLP {without:.3f} ms -> "
              f"{per_layer_us:.2f} us a layer for {mlp_bytes / 1e6:.1f} MB: {gbps:.0f} GB/s, {gbps / copy:.2f} of copy",
              flush=True)
        del dm, model, preds
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mlp_in_step.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
