"""Quality grid: dense vs oracle vs predicted sparsity at MLP {0.7, 0.5, 0.3} x heads {1.0, 0.5}.

    python bench/quality_grid.py --model smollm2-135m --bundle runs/smol65k/bundle --max-eval-tokens 8192

Dense log-probs are computed once and reused by every cell. Every evaluated token is sparse (its own
MLP and heads; earlier tokens' K/V from their sparse states: see dejavu/runtime/quality.py). The
oracle keeps the true top-k of the same forward (|down input|, head-output norm), so "predicted vs
oracle" isolates predictor error from sparsity error. Without --bundle only the oracle half runs.
Results are written to --json after every cell, so an interrupted grid keeps what it measured.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dejavu.artifacts import atomic_write_json
from dejavu.models.adapters import adapter_for
from dejavu.models.loading import load_model
from dejavu.runtime.apply import SparseRuntime
from dejavu.runtime.quality import (
    DenseReference,
    default_eval_dataset,
    dense_reference,
    eval_tokens,
    model_context,
    reference_ppl,
    score_against,
    strided_windows,
)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _cached_reference(path: Path | None, model, tokens, window: int, stride: int) -> DenseReference:
    """The dense reference, from `path` when it was computed for the same tokens and windows."""
    from safetensors.torch import load_file, save_file

    key = {"window": str(window), "stride": str(stride), "tokens": str(tokens.numel()),
           "sum": str(int(tokens.sum()))}
    if path is not None and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
        if meta == key:
            stored = load_file(str(path))
            ref = DenseReference(tokens, strided_windows(tokens.numel(), window, stride))
            ref.log_probs = [stored[f"window.{i}"] for i in range(len(ref.windows))]
            print(f"dense log-probs from {path}", flush=True)
            return ref
    ref = dense_reference(model, tokens, window, stride)
    if path is not None:
        save_file({f"window.{i}": lp for i, lp in enumerate(ref.log_probs)}, str(path), metadata=key)
    return ref


def markdown(rows: list[dict], dense_ppl: float) -> str:
    lines = ["| selection | MLP density | head density | perplexity | vs dense | vs oracle | top-1 agreement | KL(dense‖sparse) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| dense | 1.0 | 1.0 | {dense_ppl:.3f} | - | - | 1.0000 | 0.0000 |"]
    oracle = {(r["mlp_density"], r["head_density"]): r["ppl"] for r in rows if r["selection"] == "oracle"}
    for r in rows:
        key = (r["mlp_density"], r["head_density"])
        vs_oracle = f"{(r['ppl'] / oracle[key] - 1) * 100:+.2f} %" if r["selection"] == "predictor" and key in oracle else "-"
        lines.append(f"| {r['selection']} | {r['mlp_density']:g} | {r['head_density']:g} | {r['ppl']:.3f} | "
                     f"{(r['ppl'] / dense_ppl - 1) * 100:+.2f} % | {vs_oracle} | {r['top1_agreement']:.4f} | {r['kl']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: the bundle's, else smollm2-135m)")
    ap.add_argument("--bundle", type=Path, default=None, help="bundle from `dejavu export` (omit: oracle only)")
    ap.add_argument("--dataset", default=None, help="evaluation corpus (default: wikitext-2-raw test)")
    ap.add_argument("--max-eval-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--stride", type=int, default=1024)
    ap.add_argument("--mlp", type=_floats, default=[0.7, 0.5, 0.3])
    ap.add_argument("--heads", type=_floats, default=[1.0, 0.5])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--selections", default="oracle,predictor", help="which halves to run (oracle,predictor)")
    ap.add_argument("--dense-cache", type=Path, default=None,
                    help="safetensors file keeping the dense log-probs between runs (reused when it matches)")
    ap.add_argument("--json", type=Path, default=None, help="write results here (after every cell)")
    args = ap.parse_args(argv)

    manifest = predictors = None
    if args.bundle is not None:
        from dejavu.export.bundle import check_bundle_matches, load_bundle

        manifest, predictors = load_bundle(args.bundle)
    name = args.model or (manifest["model"]["name"] if manifest else "smollm2-135m")
    model, tokenizer, source = load_model(name, device=args.device, dtype=args.dtype)
    adapter = adapter_for(model)
    if manifest is not None:
        check_bundle_matches(manifest, adapter)
    dataset = args.dataset or default_eval_dataset()
    window = min(model_context(model), args.window)
    stride = min(args.stride, window)
    tokens = eval_tokens(tokenizer, dataset, args.max_eval_tokens)
    t0 = time.perf_counter()
    ref = _cached_reference(args.dense_cache, model, tokens, window, stride)
    dense = reference_ppl(ref)
    result = {
        "model": source.display, "bundle": str(args.bundle) if args.bundle else None, "dataset": dataset,
        "eval_tokens": int(tokens.numel()), "scored_tokens": dense["scored_tokens"], "window": window,
        "stride": stride, "device": args.device, "dtype": args.dtype,
        "sparse_tokens": "every evaluated token (scored and context)",
        "mlp_pairing": predictors.mlp_pairing if predictors else None,
        "head_pairing": predictors.head_pairing if predictors else None,
        "dense_ppl": dense["dense_ppl"], "rows": [],
    }
    print(f"dense perplexity {dense['dense_ppl']:.3f} on {dense['scored_tokens']} tokens "
          f"(windows {window}, stride {stride}) in {time.perf_counter() - t0:.0f} s", flush=True)
    selections = [s for s in args.selections.split(",") if s != "predictor" or predictors is not None]
    for heads in args.heads:
        for mlp in args.mlp:
            for selection in selections:
                t1 = time.perf_counter()
                with SparseRuntime(model, adapter, predictors if selection == "predictor" else None,
                                   selection=selection, mlp_density=mlp, head_density=heads) as rt:
                    scores = score_against(model, rt, ref, desc=f"{selection} mlp={mlp:g} heads={heads:g}")
                    computed = rt.stats.summary()
                row = {"selection": selection, "mlp_density": mlp, "head_density": heads, "ppl": scores["sparse_ppl"],
                       "top1_agreement": scores["top1_agreement"], "kl": scores["kl"], "computed": computed,
                       "seconds": time.perf_counter() - t1}
                result["rows"].append(row)
                print(f"{selection:9s} mlp {mlp:g} heads {heads:g}: ppl {row['ppl']:.3f} "
                      f"({(row['ppl'] / dense['dense_ppl'] - 1) * 100:+.2f} %), agreement "
                      f"{row['top1_agreement']:.4f}, KL {row['kl']:.4f} [{row['seconds']:.0f} s]", flush=True)
                if args.json:
                    atomic_write_json(args.json, result)
    result["markdown"] = markdown(result["rows"], dense["dense_ppl"])
    if args.json:
        atomic_write_json(args.json, result)
    print()
    print(result["markdown"])
    return result


if __name__ == "__main__":
    with torch.no_grad():
        main()
