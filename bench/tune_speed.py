"""Time `dejavu tune-predictors` at real shapes: a model built from a preset's config with random weights and
random rank-r predictors (speed and memory only: the KL it reports means nothing).

    python bench/tune_speed.py --synthetic llama-2-7b --tokenizer DIR --dataset valid.txt --out OUT

The model takes the tokenizer's vocabulary size (the preset's own vocabulary would not cover its ids).
Two tunings of the same run, `--steps-short` and `--steps-long` steps, each loading the model; the
difference of their wall times over the difference of their steps is one step's time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def build_run(args, work: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dejavu.artifacts import file_entry, save_tensors, write_manifest
    from dejavu.config import RunConfig
    from dejavu.models.adapters import adapter_for
    from dejavu.models.identity import model_identity
    from dejavu.predictor import LowRankPredictor, predictor_rank
    from dejavu.runtime.synthetic import PRESETS

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    preset = dict(PRESETS[args.synthetic])
    model_type = preset.pop("model_type")
    preset["vocab_size"] = len(tokenizer)
    if args.layers:
        preset["num_hidden_layers"] = args.layers
    config = AutoConfig.for_model(model_type, **preset)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model_dir = work / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    adapter = adapter_for(model)
    s = adapter.shape()
    out = work / "run" / "predictors"
    files = []
    torch.manual_seed(0)
    for layer in range(adapter.num_layers):
        tensors = {}
        for kind, n_out in (("mlp", s.intermediate_size), ("attn", s.num_heads)):
            pred = LowRankPredictor(s.hidden_size, n_out, predictor_rank(args.rank, n_out))
            tensors.update({f"{kind}.{k}": v for k, v in pred.tensors().items()})
        path = out / "layers" / f"layer-{layer:03d}.safetensors"
        files.append(file_entry(path, out, save_tensors(path, tensors)))
    cfg = RunConfig()
    cfg.model.name = str(model_dir)
    write_manifest(out, "dejavu.predictors", cfg.to_dict(), files, parent=None,
                   model=model_identity(adapter, str(model_dir)), layers=adapter.num_layers, rank=args.rank,
                   hidden_activation="none", mlp_pairing="current", head_pairing="lookahead",
                   mlp_density=args.mlp_density, head_density=args.head_density, metrics={})
    del model
    torch.cuda.empty_cache()
    return work / "run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", default="llama-2-7b")
    parser.add_argument("--layers", type=int, default=0, help="keep only the first N layers (0: all)")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rank", type=int, default=40)
    parser.add_argument("--mlp-density", type=float, default=0.5)
    parser.add_argument("--head-density", type=float, default=1.0)
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps-short", type=int, default=5)
    parser.add_argument("--steps-long", type=int, default=105)
    parser.add_argument("--work", default="/tmp/tune-speed", help="where the model and the run are built")
    parser.add_argument("--build-only", action="store_true",
                        help="build WORK/model and WORK/run (predictors) and stop (bench/tune_scaling.sh)")
    args = parser.parse_args()

    from dejavu.train.tune import run_tune

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = build_run(args, Path(args.work))
    built = time.perf_counter() - t0
    if args.build_only:
        print(f"built {run} in {built:.1f} s")
        return
    runs = {}
    for steps in (args.steps_short, args.steps_long):
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        manifest = run_tune(run, overwrite=True, overrides={
            "model.device": "cuda", "model.dtype": "bfloat16", "data.dataset": args.dataset,
            "data.seq_len": args.seq_len, "tune.steps": steps, "tune.sequences": args.sequences,
            "tune.eval_sequences": 2, "tune.checkpoint_every": 10_000,
            "tune.eval_every": 0})
        runs[steps] = {"wall_seconds": time.perf_counter() - t0,
                       "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
                       "kl_before": manifest["tuned"]["before"]["kl"], "kl_after": manifest["tuned"]["after"]["kl"]}
    short, long = runs[args.steps_short], runs[args.steps_long]
    report = {
        "synthetic": args.synthetic, "note": "random weights and predictors: speed and memory only",
        "layers": args.layers or "all", "device": torch.cuda.get_device_name(), "dtype": "bfloat16",
        "rank": args.rank, "mlp_density": args.mlp_density, "head_density": args.head_density,
        "tokens_per_step": args.sequences * args.seq_len, "build_seconds": built, "runs": runs,
        "seconds_per_step": (long["wall_seconds"] - short["wall_seconds"]) / (args.steps_long - args.steps_short),
    }
    (out / f"tune_speed-{args.synthetic}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
