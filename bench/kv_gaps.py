"""How much lazy k/v filling a skip_kv decode does: per step and layer, the KV groups read, how many of
them had skipped positions to fill, and the gap lengths. Lazy filling pays off when head selections
persist from token to token; random predictors on random weights (synthetic) are close to the worst case.

Usage: python bench/kv_gaps.py --synthetic llama-2-7b [--layers 4] [--heads 0.5] [--batch 1] [--steps 64]
       python bench/kv_gaps.py --model DIR_OR_ALIAS --bundle BUNDLE [--heads 0.5]   (a trained model)
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=float, default=0.5)
    ap.add_argument("--mlp", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    from dejavu.runtime.decode import DecodeModel

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.synthetic:
        from dejavu.runtime.synthetic import build_synthetic

        model, adapter, preds = build_synthetic(args.synthetic, args.layers, device, dtype, args.mlp, args.heads)
    else:
        from dejavu.export.bundle import load_bundle
        from dejavu.models.adapters import adapter_for
        from dejavu.models.loading import load_model

        model, _, _ = load_model(args.model, device=str(device), dtype=args.dtype)
        adapter = adapter_for(model)
        preds = load_bundle(args.bundle)[1].with_densities(args.mlp, args.heads)
    dm = DecodeModel(model, adapter, preds, device, dtype, max_len=32 + args.steps + 2, skip_kv=True)
    st = dm.new_state(args.batch)
    dm.prefill(st, torch.randint(1, dm.embed.shape[0], (args.batch, 32)))
    read = filled = 0
    gaps: list[int] = []
    for _ in range(args.steps):
        pos = int(st.pos.item())
        before = st.kv_last[:, pos % 2].clone()
        dm.step(st, sparse=True)
        after = st.kv_last[:, (pos + 1) % 2]
        was_read = after == pos
        gap = (pos - 1 - before)[was_read]
        read += int(was_read.sum())
        filled += int((gap > 0).sum())
        gaps += gap[gap > 0].tolist()
    result = {"model": args.synthetic or args.model, "synthetic": bool(args.synthetic), "batch": args.batch,
              "head_density": args.heads, "steps": args.steps, "layers": adapter.num_layers,
              "kv_groups": dm.KV, "groups_read_per_layer_step": read / args.steps / adapter.num_layers,
              "share_of_read_groups_with_a_gap": filled / max(read, 1),
              "mean_gap": sum(gaps) / max(len(gaps), 1), "max_gap": max(gaps, default=0)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
