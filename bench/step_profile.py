"""Where a graphed decode step's time goes, kernel by kernel: the step is replayed under torch.profiler
(CUPTI records the kernels a CUDA graph launches), and each kernel's time per step is summed by name.
"busy" is the time some kernel ran (the union of their intervals); the rest of the step is the GPU idle
between kernels (launch gaps, waits on the side stream). Speed only, synthetic weights.

With programmatic dependent launch a kernel starts before its predecessor ends and waits inside, so
its recorded time includes that wait: run with DEJAVU_PDL=0 for each kernel's own time.

    python bench/step_profile.py --synthetic llama-2-7b --mlp 0.25 --heads 0.5 --out DIR
    python bench/step_profile.py --synthetic llama-2-7b --thresholds 0.5:0.5:0.5 --out DIR
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch


def _union_us(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--mlp", type=float, default=0.5)
    ap.add_argument("--heads", type=float, default=0.5)
    ap.add_argument("--thresholds", default=None, help="KEEP_X:KEEP_H[:KEEP_ATTN] instead of MLP predictors")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dense", action="store_true", help="profile the dense step instead")
    ap.add_argument("--dense-impl", default="triton", help="cublas or triton (the faster at Llama-2-7B shapes)")
    ap.add_argument("--out", type=Path, default=Path("runs/step-profile"))
    args = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from dejavu.runtime import speed
    from dejavu.runtime.decode import DecodeModel, GraphedStep
    from dejavu.runtime.synthetic import build_synthetic

    device, dtype = torch.device("cuda"), torch.bfloat16
    model, adapter, preds = build_synthetic(args.synthetic, args.layers, device, dtype, args.mlp, args.heads)
    thresholds = None
    if args.thresholds:
        from dejavu.runtime.thresholds import calibrate_on_random_tokens

        keep = [float(v) for v in args.thresholds.split(":")]
        thresholds = calibrate_on_random_tokens(model, adapter, keep[0], keep[1],
                                                keep_attn=keep[2] if len(keep) > 2 else None)
    dm = DecodeModel(model, adapter, preds, device, dtype, speed.cache_length(speed.PROMPT_LEN, 5, args.steps + 40),
                     thresholds=thresholds, dense_impl=args.dense_impl)
    sparse = not args.dense
    st = dm.new_state(args.batch, dense_only=not sparse)
    dm.prefill(st, torch.randint(1, dm.embed.shape[0], (args.batch, speed.PROMPT_LEN),
                                 generator=torch.Generator().manual_seed(0)))
    step = GraphedStep(dm, st, sparse)
    step_ms = speed.timed_loop(step, device, 5, args.steps)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    per_name: dict[str, list[float]] = defaultdict(list)
    intervals = []
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA or ev.name.startswith("Memcpy") or ev.name.startswith("Memset"):
            continue
        start, dur = ev.time_range.start, ev.time_range.elapsed_us()
        per_name[ev.name].append(dur)
        intervals.append((start, start + dur))
    steps, layers = args.steps, len(dm.layers)
    rows = sorted(({"kernel": name, "us_per_step": sum(d) / steps, "calls_per_step": len(d) / steps,
                    "us_per_call": sum(d) / len(d)} for name, d in per_name.items()),
                  key=lambda r: -r["us_per_step"])
    kernel_us = sum(r["us_per_step"] for r in rows)
    busy_us = _union_us(intervals) / steps
    from dejavu.runtime.kernels.triton_kernels import USE_PDL

    result = {"pdl": USE_PDL, "synthetic": args.synthetic, "layers": layers, "batch": args.batch, "mlp": args.mlp, "heads": args.heads,
              "thresholds": args.thresholds, "sparse": sparse, "device_name": torch.cuda.get_device_name(),
              "step_ms": step_ms, "kernel_us_per_step": kernel_us, "busy_us_per_step": busy_us, "kernels": rows}
    print(f"step {step_ms * 1e3:.0f} us ({step_ms * 1e3 / layers:.1f} a layer); kernels summed {kernel_us:.0f} us, "
          f"busy {busy_us:.0f} us (idle {step_ms * 1e3 - busy_us:.0f} us)")
    for r in rows[:25]:
        print(f"  {r['us_per_step']:8.1f} us/step  {r['calls_per_step']:6.1f} calls  {r['us_per_call']:7.2f} us/call  "
              f"{r['kernel'][:90]}")
    args.out.mkdir(parents=True, exist_ok=True)
    name = "dense" if args.dense else (f"thresholds-{args.thresholds.replace(':', '_')}" if args.thresholds else f"mlp{args.mlp}-heads{args.heads}")
    (args.out / f"step_profile-{name}-b{args.batch}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
