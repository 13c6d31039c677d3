"""Decode attention over the KV cache: one program per head (the kernel before session 9) against the
positions split over several programs (flash-decoding), and with GQA one program for each KV head's
group of q heads, at several context lengths and batch sizes.

Each variant runs in a CUDA graph over ROT caches, together larger than L2, and is reported as
us per call and the GB/s its k/v reads reach. Speed only, random values.
Usage: python bench/attention_kernel.py [--out DIR] [--contexts 96,512,2048,4096] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# a sibling script: bench/ is on sys.path when this one runs
from mlp_kernel import ROT, graph_ms

from dejavu.runtime.kernels import triton_kernels as T
from dejavu.runtime.speed import copy_bandwidth_gbps


def _attention_call(q, kc: list, vc: list, heads, group: int, pos, options: dict):
    def run(i: int = 0):
        return T.decode_attention(q, kc[i], vc[i], heads, group, pos, q.shape[-1] ** -0.5, **options)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--contexts", default="96,512,2048,4096")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--capacity", type=int, default=4096, help="cache length (the decode loop's max_len)")
    ap.add_argument("--sweep", action="store_true", help="also sweep programs an SM x block lengths")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    H, KV, hd, cap = args.heads, args.kv_heads, args.head_dim, args.capacity
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy = copy_bandwidth_gbps(torch.device(dev))
    variants = {"one program per head (before)": dict(splits=1, block_t=64, grouped=False)}
    if args.sweep:
        for block in (32, 64):
            for per_sm in (2, 4, 8):
                variants[f"{per_sm} programs an SM, blocks of {block}"] = dict(block_t=block, per_sm=per_sm,
                                                                            grouped=False)
    variants["split, one program a q head"] = dict(grouped=False)
    # without GQA the grouped kernel is one program a head too, with tensor-core dots
    variants["split, one program a KV group" if H > KV else "split, tensor-core dots"] = dict(grouped=True)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        kc = [torch.randn(batch, KV, cap, hd, device=dev, dtype=dt) for _ in range(ROT)]
        vc = [torch.randn_like(k) for k in kc]
        q = torch.randn(batch, H, hd, device=dev, dtype=dt)
        heads = torch.arange(H, device=dev)
        for context in (int(c) for c in args.contexts.split(",")):
            pos = torch.tensor([context - 1], device=dev)
            nbytes = 2 * batch * KV * context * hd * kc[0].element_size()
            for name, kw in variants.items():
                us = graph_ms(_attention_call(q, kc, vc, heads, H // KV, pos, kw)) * 1e3
                splits = kw.get("splits") or T.attention_splits(KV if kw["grouped"] else H, batch, cap,
                                                                kw.get("block_t") or T.ATTENTION_BLOCK_T, sms,
                                                                kw.get("per_sm"))
                rows.append(dict(batch=batch, context=context, variant=name, splits=splits, us=us,
                                 gbps=nbytes / us / 1e3, share_of_copy=nbytes / us / 1e3 / copy))
                print(f"batch {batch} context {context:5d} {name:34s} splits {splits:2d}: {us:7.2f} us "
                      f"({nbytes / us / 1e3:6.0f} GB/s, {nbytes / us / 1e3 / copy:.2f} of copy)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_kernel.json").write_text(json.dumps(
        {"device_name": torch.cuda.get_device_name(), "copy_gbps": copy, "heads": H, "kv_heads": KV,
         "head_dim": hd, "capacity": cap, "dtype": "bfloat16", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
