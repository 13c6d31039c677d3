"""Does `dejavu generate` deliver the speed `dejavu bench` reports? Speed only, random weights.

A synthetic model (runtime/synthetic.py, real shapes, random weights and predictors) is driven three
ways on one device:
- the generation path users call (`SparseModel.generate`, engine decode-loop: prefill, then a graph
  replay per token, the token copied out and an end-of-sequence check every 16 tokens), dense and sparse;
- the bench's own timing of the same decode loop (`runtime.speed.decode_ms_per_token`);
- Hugging Face `model.generate` (greedy, eager), what users have without this tool.

With `--batch N` (N > 1) the generation path is `SparseModel.generate_batch` over N prompts of unequal
lengths (left-padded), against the bench's timing at batch N; ms are per step of the whole batch.

The text is meaningless (random weights): only ms/token counts. Any tokenizer with fewer ids than the
preset's vocabulary works, e.g. SmolLM2's with the llama-3-8b preset.

    python bench/generate_speed.py --tokenizer DIR --synthetic llama-3-8b --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="Directory of a Hugging Face tokenizer.")
    ap.add_argument("--synthetic", default="llama-3-8b", help="Preset of runtime/synthetic.py.")
    ap.add_argument("--layers", type=int, default=None, help="Keep only the first N decoder layers.")
    ap.add_argument("--mlp-density", type=float, default=0.5)
    ap.add_argument("--head-density", type=float, default=0.5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-tokens", type=int, default=16, help="Tokens for Hugging Face's generate (slow).")
    ap.add_argument("--batch", type=int, default=1, help="Prompts generated together (unequal lengths).")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from dejavu.config import load_config
    from dejavu.runtime.generate import SparseModel
    from dejavu.runtime.plan import resolve_plan
    from dejavu.runtime.speed import cache_length, decode_ms_per_token, sync_device
    from dejavu.runtime.synthetic import build_synthetic

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    model, adapter, preds = build_synthetic(args.synthetic, args.layers, device, dtype, args.mlp_density,
                                            args.head_density)
    if len(tokenizer) > model.config.vocab_size:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} ids, the preset's vocabulary {model.config.vocab_size}")
    plan = resolve_plan(load_config(None, {}), None, preds, model, adapter, tokenizer)
    sm = SparseModel(model, tokenizer, adapter, plan, device=device, dtype=dtype, name=args.synthetic,
                     engine="decode-loop")
    prompt = "The history of the city begins in the early middle ages, when a small settlement grew"
    # unequal lengths in a batch: the prompt, then 3 words shorter each time (2 words at least)
    words = prompt.split()
    prompts = [" ".join(words[:max(2, len(words) - 3 * i)]) for i in range(args.batch)]
    results: dict = {"synthetic": args.synthetic, "layers": args.layers, "device": str(device),
                     "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "dtype": args.dtype, "mlp_density": args.mlp_density, "head_density": args.head_density,
                     "new_tokens": args.new_tokens, "batch": args.batch,
                     "prompt_tokens": [int(sm.encode(p).shape[1]) for p in prompts]}
    longest = max(results["prompt_tokens"])

    def generate(sparse: bool, stop: bool):
        if args.batch == 1:
            return sm.generate(prompt, args.new_tokens, sparse=sparse, stop_at_eos=stop)
        return sm.generate_batch(prompts, args.new_tokens, sparse=sparse, stop_at_eos=stop)[0]

    # one loop long enough for the bench's timing too (its warm-up steps), so both time the same weights
    sm._loop_state(cache_length(longest, 5, args.new_tokens), False)
    for sparse in (False, True):
        generate(sparse, True)  # builds the loop and captures the graph
        runs = [generate(sparse, True) for _ in range(args.repeats)]
        key = "sparse" if sparse else "dense"
        results[f"generate_{key}_ms_per_token"] = [g.ms_per_token for g in runs]
        results[f"generate_{key}_prefill_ms"] = [g.prefill_ms for g in runs]
        results[f"generate_{key}_tokens"] = [len(g.token_ids) for g in runs]
        # the bench's timing of the same loop and state length (its own state, prompt of random ids)
        results[f"bench_{key}_ms_per_token"] = decode_ms_per_token(
            sm._loop, args.batch, sparse, args.new_tokens, 5, prompt_len=longest)
    ids, lengths = sm.encode_batch(prompts) if args.batch > 1 else (sm.encode(prompt), None)
    mask = None if lengths is None else sm.padding_mask(ids.shape[1], lengths)
    ids = ids.to(device)
    times = []
    with torch.no_grad():
        for _ in range(2):
            sync_device(device)
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=mask.to(device) if mask is not None else None,
                           max_new_tokens=args.hf_tokens, min_new_tokens=args.hf_tokens, do_sample=False,
                           pad_token_id=0)
            sync_device(device)
            times.append((time.perf_counter() - t0) * 1e3 / args.hf_tokens)
    results["hf_generate_ms_per_token"] = times[-1]  # the first call pays warm-up
    for key in ("dense", "sparse"):
        results[f"generate_{key}_median"] = statistics.median(results[f"generate_{key}_ms_per_token"])
    results["generate_speedup"] = results["generate_dense_median"] / results["generate_sparse_median"]
    results["bench_speedup"] = results["bench_dense_ms_per_token"] / results["bench_sparse_ms_per_token"]
    results["sparse_vs_hf_generate"] = results["hf_generate_ms_per_token"] / results["generate_sparse_median"]
    print(json.dumps(results, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
