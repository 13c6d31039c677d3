"""Collection overhead: `dejavu collect`'s per-shard work vs a plain forward pass over the same tokens.

    python bench/collect_overhead.py --model smollm2-135m --dataset ../shared/data/wikitext-2/valid.txt \
        --max-tokens 16384 [--json out.json]

For every shard of the collection plan, in turn (interleaved, so load from other processes on a
shared machine hits all three alike):
- plain:   the full causal LM forward (with logits), what "running the model over the corpus" costs;
- body:    the decoder stack only (no LM head), which is what collection runs under its hooks;
- collect: hooks + labels + statistics + the safetensors write of the shard (to a temp dir).
Prints seconds and tokens/s for each, and the ratios collect/plain and collect/body.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from dejavu.collect import collect as C
from dejavu.collect import labels as L
from dejavu.config import load_config
from dejavu.corpus import fixed_length_sequences, load_texts, tokenize_stream
from dejavu.models.adapters import adapter_for
from dejavu.models.loading import load_model


@torch.inference_mode()
def plain_forward(module, spec: C.ShardSpec, batch_size: int, device) -> None:
    for start in range(0, spec.sequences.shape[0], batch_size):
        module(input_ids=spec.sequences[start:start + batch_size].to(device), use_cache=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="../shared/data/wikitext-2/valid.txt")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--config", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    cfg = load_config(args.config, {"model.name": args.model, "data.dataset": args.dataset,
                                    "collect.max_tokens": args.max_tokens, "model.device": args.device})
    cc = cfg.collect
    model, tokenizer, source = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    stream = tokenize_stream(load_texts(cfg.data.dataset, cfg.data.split, cfg.data.text_field), tokenizer)
    seqs = fixed_length_sequences(stream, cfg.data.seq_len, cc.max_tokens, cfg.data.seed)
    plan = C.make_plan(seqs, cc.eval_tokens, cc.shard_tokens, 1)
    rule = L.resolve_label_rule(cc.mlp_label_rule, adapter.gated, adapter.activation_name())
    input_dtype = C.DTYPES[cc.input_dtype]

    # Warm-up on one batch, so one-time costs (allocations, lazy init) count for neither side.
    warm = C.ShardSpec("train", 0, 0, plan.shards[0].sequences[: cc.batch_size])
    plain_forward(model, warm, cc.batch_size, device)
    C.record_shard(model, adapter, warm, cc.batch_size, rule, cc.mlp_label_densities, input_dtype)

    times = {"plain": 0.0, "body": 0.0, "collect": 0.0}
    with tempfile.TemporaryDirectory(prefix="dejavu-overhead-") as tmp:
        for spec in plan.shards:
            t0 = time.perf_counter()
            plain_forward(model, spec, cc.batch_size, device)
            t1 = time.perf_counter()
            plain_forward(model.base_model, spec, cc.batch_size, device)
            t2 = time.perf_counter()
            tensors, stats = C.record_shard(model, adapter, spec, cc.batch_size, rule, cc.mlp_label_densities,
                                            input_dtype)
            C.write_shard(Path(tmp) / spec.path, tensors, C.shard_info(spec, stats))
            t3 = time.perf_counter()
            times["plain"] += t1 - t0
            times["body"] += t2 - t1
            times["collect"] += t3 - t2
            print(f"{spec.name}: plain {t1 - t0:.2f}s body {t2 - t1:.2f}s collect {t3 - t2:.2f}s", flush=True)

    tokens = seqs.numel()
    report = {
        "model": source.display, "device": str(device), "dtype": str(next(model.parameters()).dtype),
        "tokens": tokens, "seq_len": cfg.data.seq_len, "batch_size": cc.batch_size,
        "torch_threads": torch.get_num_threads(), "machine": platform.node(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **{f"{k}_s": round(v, 3) for k, v in times.items()},
        **{f"{k}_tokens_per_s": round(tokens / v, 1) for k, v in times.items()},
        "collect_over_plain": round(times["collect"] / times["plain"], 3),
        "collect_over_body": round(times["collect"] / times["body"], 3),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
