"""Decode speed sweep: dense vs sparse ms/token over MLP densities x head densities x batch sizes,
in the graph-captured loop (CPU: eager), plus HF eager and copy bandwidth; JSON + PNG + table.

Usage: python bench/decode_speed.py --synthetic llama-2-7b [--layers N] [--device cuda] [--dtype bfloat16]
         [--batches 1,4,8] [--mlp 1.0,0.8,0.5,0.3,0.1] [--heads 1.0,0.5] [--tokens 64] [--prompt-len 16] [--out DIR]
         [--two-stage 0.75/0.5,0.9/0.6]   (CANDIDATES/FINAL MLP densities, two-stage MLP selection)
         [--exact-up 0.5:0.4,0.7:0.5]     (DENSITY:WEIGHT, exact-up MLP selection)
         [--kv all|skip|both]             (k/v of every KV group, or only of those the heads read)
         [--thresholds 0.8:0.5,0.7:0.5:0.5]   (KEEP_X:KEEP_H[:KEEP_ATTN], TEAL-style MLP thresholds instead of MLP
                                           predictors, calibrated on the synthetic model's own activations)
Synthetic (random) weights: speed only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dejavu.runtime import speed
from dejavu.runtime.decode import JOIN_ORDERS, SELECT_IMPLS, DecodeModel
from dejavu.runtime.synthetic import build_synthetic
from dejavu.runtime.thresholds import calibrate_on_random_tokens


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for b, by_b in result["sweep"].items():
        line = None
        for heads, all_pts in by_b["sparse"].items():
            for skip_kv in (False, True):
                pts = [p for p in all_pts if p.get("skip_kv", False) == skip_kv]
                if not pts:
                    continue
                xs = [p["mlp_density"] for p in pts]
                ys = [p["sparse_ms_per_token"] for p in pts]
                (line,) = ax.plot(xs, ys, marker="s" if skip_kv else "o",
                                  label=f"sparse, batch {b}, heads {heads}" + (", k/v skipped" if skip_kv else ""),
                                  color=line.get_color() if line else None,
                                  linestyle="-" if heads == "1.0" else ":" if skip_kv else "--")
        for heads, pts in by_b.get("exact_up", {}).items():
            if pts:
                ax.scatter([p["mlp_density"] for p in pts], [p["sparse_ms_per_token"] for p in pts], marker="^",
                           color=line.get_color() if line else None,
                           label=f"exact-up (x: gate/down density), batch {b}, heads {heads}")
        for heads, pts in by_b.get("two_stage", {}).items():
            if pts:
                ax.scatter([p["mlp_density"] for p in pts], [p["sparse_ms_per_token"] for p in pts], marker="x",
                           color=line.get_color() if line else None,
                           label=f"two-stage (x: final density), batch {b}, heads {heads}")
        ax.axhline(by_b["dense_ms_per_token"], color=line.get_color(), linestyle=":", label=f"dense, batch {b}")
    ax.set_xlabel("MLP density")
    ax.set_ylabel("ms / token")
    ax.set_title(f"{result['model']} (synthetic weights), {result['dtype']}, {result['device_name']}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--mlp", default="1.0,0.8,0.5,0.3,0.1")
    ap.add_argument("--heads", default="1.0,0.5")
    ap.add_argument("--two-stage", default="",
                    help="'CAND/FINAL,...' MLP densities (e.g. 0.75/0.5,0.9/0.6): also time two-stage MLP selection "
                         "(predictor picks CAND, the exact top FINAL of them by |act*up| runs down) at each heads density")
    ap.add_argument("--exact-up", default="",
                    help="'DENSITY:WEIGHT,...' (e.g. 0.5:0.4,0.7:0.5): also time exact-up MLP selection (up for every "
                         "neuron, gate and down for the top DENSITY by log|up| + WEIGHT x logit) at each heads density")
    ap.add_argument("--thresholds", default="",
                    help="KEEP_X:KEEP_H[:KEEP_ATTN] specs: MLP by per-layer magnitude thresholds (no MLP predictor), "
                         "set to keep these shares of the MLP input and of down's input on the model's own "
                         "activations; KEEP_ATTN: attention too (q/k/v's and o's inputs; every head, run once "
                         "at heads 1.0)")
    ap.add_argument("--kv", default="all", choices=["all", "skip", "both"],
                    help="sparse steps compute k/v for every KV group (all), only for the groups the selected "
                         "heads read, skipped positions filled lazily (skip), or each config both ways")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=speed.PROMPT_LEN,
                    help="prompt tokens before the timed decode (the context attention reads grows from here)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--hf-tokens", type=int, default=16, help="tokens of Hugging Face eager decode to time (0: skip)")
    ap.add_argument("--mlp-pairing", default="current", choices=["current", "lookahead"],
                    help="which block input the MLP predictor reads (lookahead lets it overlap a whole layer)")
    ap.add_argument("--select-impl", default="fused", choices=list(SELECT_IMPLS),
                    help="fused: shared first-layer GEMV + wide second-layer/top-k kernels; fused-cublas: the same with "
                         "the GEMV in cuBLAS; classic: the unfused path; static / static-sync: no predictor (ceilings)")
    ap.add_argument("--join-order", default="heads-first", choices=list(JOIN_ORDERS),
                    help="side-stream order of one input's predictors: consumption (each selection as early as "
                         "it is needed) or heads-first (the next layer's heads first, so one join a layer)")
    ap.add_argument("--priority", type=int, default=-1, help="predictor stream priority (-1 high, 0 normal)")
    ap.add_argument("--ablation", default="",
                    help="'MLP/HEADS,...' densities (e.g. 0.5/0.5,0.1/0.5): after the sweep, time sparse decode at the "
                         "first batch for select-impl x priority x MLP pairing")
    ap.add_argument("--cpu-threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    ap.add_argument("--gemm-tiles", default=None,
                    help="BLOCK_R,BLOCK_D,WARPS of the gate/up/qkv gather kernel, or by-rows (the earlier rule); "
                         "default: the kernel module's")
    ap.add_argument("--out", default="runs/decode-speed")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.gemm_tiles:
        from dejavu.runtime.kernels import triton_kernels

        triton_kernels.GEMM_TILES = (args.gemm_tiles if args.gemm_tiles == "by-rows"
                                     else tuple(int(v) for v in args.gemm_tiles.split(",")))
    if device.type == "cpu" and args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, adapter, preds = build_synthetic(args.synthetic, args.layers, device, dtype, 0.5, 0.5, rank=args.rank)
    preds.mlp_pairing = args.mlp_pairing
    print(f"built {args.synthetic} ({adapter.num_layers} layers) in {time.time() - t0:.0f}s", flush=True)
    max_len = speed.cache_length(args.prompt_len, args.warmup, args.tokens)
    dm = DecodeModel(model, adapter, None, device, dtype, max_len, select_impl=args.select_impl,
                     predictor_priority=args.priority, join_order=args.join_order)
    copy = speed.copy_bandwidth_gbps(device)
    # --hf-tokens 0 skips the HF eager baseline (minutes a step on the CPU at 7B shapes)
    hf = speed.hf_eager_ms_per_token(model, 1, args.hf_tokens, device, prompt_len=args.prompt_len) \
        if args.hf_tokens > 0 else None
    hf_text = "not timed" if hf is None else f"{hf:.2f} ms/token"
    pdl = False  # programmatic dependent launch of the Triton kernels (DEJAVU_PDL, Hopper+)
    if device.type == "cuda":
        from dejavu.runtime.kernels import triton_kernels

        pdl = triton_kernels.pdl_enabled(torch.empty(0, device=device))
    print(f"copy {copy:.0f} GB/s; HF eager {hf_text}; PDL {pdl}", flush=True)
    result = {"model": args.synthetic, "synthetic": True, "layers": adapter.num_layers, "device": str(device),
              "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "dtype": args.dtype, "copy_bandwidth_gbps": copy, "hf_eager_ms_per_token": hf,
              "predictor_rank": preds.meta.get("rank"), "decode_tokens": args.tokens, "warmup": args.warmup,
              "prompt_len": args.prompt_len,
              "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
              "kv": args.kv, "pdl": pdl, "mlp_pairing": preds.mlp_pairing, "head_pairing": preds.head_pairing,
              "select_impl": args.select_impl, "join_order": args.join_order, "predictor_priority": args.priority, "gemm_tiles": args.gemm_tiles,
              "sweep": {}}
    table = []
    for b in [int(x) for x in args.batches.split(",")]:
        dm.attach_predictors(None)
        dense_ms, by_impl = speed.best_dense_ms(dm, b, args.tokens, args.warmup, args.prompt_len)
        dense = speed.batch_figures(dm, b, args.tokens, args.warmup, copy, dense_ms=dense_ms, with_sparse=False,
                                    prompt_len=args.prompt_len)
        entry = {"dense_ms_per_token": dense_ms, "dense": dense, "dense_by_impl": by_impl,
                 "dense_impl": dm.dense_impl, "sparse": {}, "two_stage": {}, "exact_up": {}}
        print(f"batch {b}: dense {dense_ms:.3f} ms/token ({dense['dense_over_floor']:.2f}x floor) "
              f"by impl {by_impl}", flush=True)
        # (two-stage candidate density, MLP density, exact-up weight)
        configs = [(None, float(m), None) for m in args.mlp.split(",")]
        configs += [(*(float(v) for v in spec.split("/")), None) for spec in args.two_stage.split(",") if spec]
        configs += [(None, *(float(v) for v in spec.split(":"))) for spec in args.exact_up.split(",") if spec]
        for heads in args.heads.split(","):
            pts, two_pts, up_pts = [], [], []
            kv_modes = {"all": (False,), "skip": (True,), "both": (False, True)}[args.kv]
            for (cand, mlp, up_weight), skip_kv in [(c, k) for c in configs for k in kv_modes]:
                if mlp == 1.0 and float(heads) == 1.0:
                    continue
                if skip_kv and float(heads) == 1.0:
                    continue  # every group is read: nothing to skip
                dm.mlp_candidate_density, dm.mlp_up_weight, dm.skip_kv = cand, up_weight, skip_kv
                dm.attach_predictors(preds.with_densities(mlp, float(heads)))
                row = speed.batch_figures(dm, b, args.tokens, args.warmup, copy,
                                          dense_ms=dense["dense_ms_per_token"], prompt_len=args.prompt_len)
                row["mlp_density"], row["head_density"], row["mlp_candidate_density"] = mlp, float(heads), cand
                row["mlp_up_weight"], row["skip_kv"] = up_weight, skip_kv
                row["bytes_share"] = row["sparse_bytes_per_step"] / dense["dense_bytes_per_step"]
                (two_pts if cand is not None else up_pts if up_weight is not None else pts).append(row)
                table.append((b, cand if up_weight is None else f"up{up_weight:g}", mlp, float(heads),
                              dense["dense_ms_per_token"], row))
                name = (f"two-stage {cand}->{mlp}" if cand is not None else
                        f"exact-up {mlp} (weight {up_weight:g})" if up_weight is not None else f"mlp {mlp}")
                name += ", k/v skipped" if skip_kv else ""
                print(f"  {name} heads {heads}: sparse {row['sparse_ms_per_token']:.3f} ms x{row['speedup']:.2f} "
                      f"(bytes {row['bytes_share']:.0%} of dense, bound x{row['bound_speedup']:.2f}, "
                      f"{row['fraction_of_bound']:.0%} of it; predictors {row['predictor_share']:.0%})", flush=True)
            dm.mlp_candidate_density = dm.mlp_up_weight = None
            dm.skip_kv = False
            entry["sparse"][heads] = pts
            entry["two_stage"][heads] = two_pts
            entry["exact_up"][heads] = up_pts
        result["sweep"][str(b)] = entry
        (out / "decode_speed.json").write_text(json.dumps(result, indent=1))
    if args.thresholds:
        table += threshold_runs(args, model, adapter, preds, copy, result, out, dm.dense_impl)
    ablation_rows = ablation(args, dm, preds, copy, result, out) if args.ablation else []
    plot(result, out / "decode_speed.png")
    print("\nbatch cand  mlp heads kv   | dense ms sparse ms speedup bytes bound frac | dense GB/s sparse GB/s pred%")
    for b, cand, mlp, heads, dms, r in table:
        c = "-" if cand is None else cand if isinstance(cand, str) else f"{cand:.2f}"
        kv = "skip" if r["skip_kv"] else "all"
        print(f"{b:5d} {c:>4s} {mlp:4.2f} {heads:5.1f} {kv:4s} | {dms:8.3f} {r['sparse_ms_per_token']:9.3f} {r['speedup']:7.2f} "
              f"{r['bytes_share']:5.0%} {r['bound_speedup']:5.2f} {r['fraction_of_bound']:4.0%} | {r['dense_gbps']:10.0f} "
              f"{r['sparse_gbps']:11.0f} {r['predictor_share']:4.0%}")
    for line in ablation_rows:
        print(line)
    print(f"HF eager {hf_text}; copy {copy:.0f} GB/s; wrote {out}")


def measured_row_shares(dm: DecodeModel, batch: int, steps: int, prompt_len: int) -> dict:
    """The shares of gate/up and down rows the threshold kernels read (kept by any sequence) over eager
    sparse steps after a prefill like the timed one's: the bytes bound above counts the calibrated
    per-sequence shares, which random-weight activations need not keep in decode, nor a batch's union."""
    from dejavu.runtime.kernels import ops

    counts = {"x": [0, 0], "h": [0, 0], "attn_x": [0, 0], "attn_o": [0, 0]}
    original = ops.threshold_vecmat_acc

    def counting(h, wt, threshold, acc):
        side = ("x" if wt.shape[1] == 2 * dm.n else "h" if wt.shape[0] == dm.n
                else "attn_x" if wt.shape[1] == (dm.H + 2 * dm.KV) * dm.hd else "attn_o")
        counts[side][0] += int((h.abs() > threshold).any(0).sum())
        counts[side][1] += h.shape[1]
        original(h, wt, threshold, acc)

    st = dm.new_state(batch)
    gen = torch.Generator().manual_seed(0)
    dm.prefill(st, torch.randint(1, dm.embed.shape[0], (batch, prompt_len), generator=gen))
    ops.threshold_vecmat_acc = counting
    try:
        for _ in range(min(steps, 8)):
            dm.step(st, sparse=True)
    finally:
        ops.threshold_vecmat_acc = original
    return {f"read_share_{side}": kept / total for side, (kept, total) in counts.items() if total}


def threshold_runs(args, model, adapter, preds, copy: float, result: dict, out: Path, dense_impl: str) -> list:
    """Sparse decode with MLP thresholds (heads still predicted, or attention by thresholds too) at each
    batch, against the sweep's dense."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    pairs = [tuple(float(v) for v in spec.split(":")) for spec in args.thresholds.split(",")]
    thresholds = {pair: calibrate_on_random_tokens(model, adapter, pair[0], pair[1],
                                                   keep_attn=pair[2] if len(pair) > 2 else None) for pair in pairs}
    # built with attention thresholds when any spec has them, so the layers keep W_qkv^T too
    first = next((p for p in pairs if len(p) > 2), pairs[0])
    dm = DecodeModel(model, adapter, None, device, dtype, speed.cache_length(args.prompt_len, args.warmup, args.tokens),
                     select_impl=args.select_impl, predictor_priority=args.priority, join_order=args.join_order,
                     thresholds=thresholds[first])
    table = []
    for b in [int(x) for x in args.batches.split(",")]:
        entry = result["sweep"][str(b)]
        dense_ms = entry["dense_ms_per_token"]
        rows = entry.setdefault("thresholds", {})
        for heads in args.heads.split(","):
            for pair in pairs:
                attention = len(pair) > 2
                if attention and heads != args.heads.split(",")[0]:
                    continue  # every head computed: one run per batch
                dm.thresholds = thresholds[pair]
                dm.attach_predictors(None if attention else preds.with_densities(1.0, float(heads)))
                row = speed.batch_figures(dm, b, args.tokens, args.warmup, copy, dense_ms=dense_ms,
                                          prompt_len=args.prompt_len)
                row.update(measured_row_shares(dm, b, args.tokens, args.prompt_len))
                row.update(keep_x=pair[0], keep_h=pair[1], keep_attn=pair[2] if attention else None,
                           head_density=1.0 if attention else float(heads), skip_kv=False,
                           mlp_density=pair[1], bytes_share=row["sparse_bytes_per_step"]
                           / entry["dense"]["dense_bytes_per_step"])
                rows.setdefault(heads, []).append(row)
                label = f"t{pair[0]:g}" + (f"/a{pair[2]:g}" if attention else "")
                table.append((b, label, pair[1], row["head_density"], dense_ms, row))
                what = f"attention keep {pair[2]:g}" if attention else f"heads {heads}"
                attn_read = (f", q/k/v {row['read_share_attn_x']:.2f}, o {row['read_share_attn_o']:.2f}"
                             if attention else "")
                print(f"  thresholds keep x {pair[0]:g} / h {pair[1]:g}, {what}: sparse "
                      f"{row['sparse_ms_per_token']:.3f} ms x{row['speedup']:.2f} (bytes {row['bytes_share']:.0%} of "
                      f"dense, {row['fraction_of_bound']:.0%} of bound; rows read in decode: gate/up "
                      f"{row['read_share_x']:.2f}, down {row['read_share_h']:.2f}{attn_read})", flush=True)
        (out / "decode_speed.json").write_text(json.dumps(result, indent=1))
    result["threshold_calibration"] = {":".join(f"{v:g}" for v in k): {"x": t.x, "h": t.h, "attn_x": t.attn_x,
                                                                        "attn_o": t.attn_o}
                                       for k, t in thresholds.items()}
    (out / "decode_speed.json").write_text(json.dumps(result, indent=1))
    del dm
    return table


# (select impl, predictor stream priority, MLP pairing, join order); "static" runs no predictor (the
# ceiling), "static-sync" no predictor but the same joins; priority None runs the predictors inline on
# the main stream (no overlap at all)
ABLATION_CONFIGS = (("classic", 0, "current", "consumption"), ("fused-cublas", -1, "current", "consumption"),
                    ("fused", -1, "current", "consumption"), ("fused", -1, "current", "heads-first"),
                    ("fused", 0, "current", "heads-first"), ("fused", -1, "lookahead", "heads-first"),
                    ("fused", None, "current", "heads-first"), ("static", -1, "current", "heads-first"),
                    ("static-sync", -1, "current", "consumption"), ("static-sync", -1, "current", "heads-first"))


def ablation(args, dm: DecodeModel, preds, copy: float, result: dict, out: Path) -> list[str]:
    """Sparse ms/token at the first batch size for each selection path, stream priority and MLP pairing."""
    b = int(args.batches.split(",")[0])
    dense = result["sweep"][str(b)]["dense_ms_per_token"]
    dm.dense_impl = result["sweep"][str(b)]["dense_impl"]
    rows, lines = [], [f"ablation, batch {b} (dense {dense:.3f} ms): mlp heads | impl prio pairing join | ms speedup frac pred%"]
    for spec in args.ablation.split(","):
        mlp, heads = (float(v) for v in spec.split("/"))
        for impl, prio, pairing, join_order in ABLATION_CONFIGS:
            dm.select_impl, dm.join_order = impl, join_order
            dm.pred_stream = (torch.cuda.Stream(dm.device, priority=prio)
                              if dm.device.type == "cuda" and prio is not None else None)
            preds.mlp_pairing = pairing
            dm.attach_predictors(preds.with_densities(mlp, heads))
            r = speed.batch_figures(dm, b, args.tokens, args.warmup, copy, dense_ms=dense, prompt_len=args.prompt_len)
            rows.append({"mlp_density": mlp, "head_density": heads, "select_impl": impl, "priority": prio,
                         "mlp_pairing": pairing, "join_order": join_order, **r})
            lines.append(f"  {mlp:3.1f} {heads:4.1f} | {impl:7s} {'inline' if prio is None else prio:>6} {pairing:9s} {join_order:11s} | {r['sparse_ms_per_token']:.3f} "
                         f"x{r['speedup']:.2f} {r['fraction_of_bound']:4.0%} {r['predictor_share']:4.0%}")
            print(lines[-1], flush=True)
    preds.mlp_pairing, dm.join_order = args.mlp_pairing, args.join_order
    result["ablation"] = {"batch": b, "rows": rows}
    (out / "decode_speed.json").write_text(json.dumps(result, indent=1))
    return lines


if __name__ == "__main__":
    main()
