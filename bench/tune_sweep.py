"""Tune one set of trained predictors several ways and bench each, all through the CLI.

Each variant gets its own run directory (WORK/NAME, predictors/ linked to the trained ones), then
`dejavu tune-predictors`, `dejavu export --run WORK/NAME/tuned` and `dejavu bench --no-speed`. The variant
`trained` (no settings) benches the predictors as trained. A summary table is printed and written as JSON.

    python bench/tune_sweep.py --predictors RUN/predictors --work /tmp/sweep --out results/ \
        --device cuda --dtype float32 trained lr5e-4:lr=0.0005,steps=600 heads05:head-density=0.5,lr=0.0005

A variant is NAME or NAME:flag=value,... where each flag is a tune-predictors option without its dashes
(steps, sequences, lr, mlp-density, head-density, eval-sequences, eval-every, mlp-selection,
mlp-candidate-density); a flag named bench-FLAG goes to `dejavu bench` instead (bench-mlp-density=0.3,
bench-head-density=0.5, bench-selection=oracle), one named export-FLAG to `dejavu export` (export-mlp-selection=threshold, export-mlp-density=0.46). Bench
densities otherwise follow the bundle (a tuned one's are those it was tuned at).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    flags = dict(item.split("=", 1) for item in rest.split(",") if item) if rest else {}
    return name, flags


def dejavu(*args: str, log: Path) -> None:
    cmd = [sys.executable, "-m", "dejavu.cli.main", *args]
    print("+", " ".join(cmd), flush=True)
    with open(log, "a") as fh:
        fh.write("+ " + " ".join(cmd) + "\n")
        fh.flush()
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}); see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--predictors", required=True, type=Path, help="RUN/predictors of `dejavu train-predictors`")
    ap.add_argument("--work", required=True, type=Path, help="directory for the variants' runs and bundles")
    ap.add_argument("--out", required=True, type=Path, help="directory for bench JSON, logs and summary.json")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--dataset", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    ap.add_argument("--max-eval-tokens", default="2048")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for text in args.variants:
        name, flags = parse_variant(text)
        if name in summary:
            print(f"{name}: already in {summary_path}, skipped", flush=True)
            continue
        run = args.work / name
        run.mkdir(parents=True, exist_ok=True)
        link = run / "predictors"
        if not link.exists():
            link.symlink_to(args.predictors.resolve())
        log = args.out / f"{name}.log"
        bench_flags = {k[len("bench-"):]: flags.pop(k) for k in list(flags) if k.startswith("bench-")}
        export_flags = {k[len("export-"):]: flags.pop(k) for k in list(flags) if k.startswith("export-")}
        started = time.time()
        row: dict = {"variant": text}
        if flags:
            tune_args = [f"--{k}={v}" for k, v in flags.items()]
            dejavu("tune-predictors", "--run", str(run), "--device", args.device, "--dtype", args.dtype, *tune_args,
                   log=log)
            row["tune_seconds"] = round(time.time() - started, 1)
            tuned = json.loads((run / "tuned" / "manifest.json").read_text())["tuned"]
            row["held_out_before"] = tuned["before"]
            row["held_out_after"] = tuned["after"]
            row["best_step"] = tuned.get("best_step")
            source = run / "tuned"
        else:
            source = run
        bundle = args.work / f"{name}-bundle"
        export = ["export", "--run", str(source), "--out", str(bundle)] + [f"--{k}={v}" for k, v in export_flags.items()]
        dejavu(*export, log=log)
        report = args.out / f"bench-{name}.json"
        bench = ["bench", "--model", args.model, "--bundle", str(bundle), "--dataset", args.dataset,
                 "--max-eval-tokens", args.max_eval_tokens, "--device", args.device, "--dtype", args.dtype,
                 "--no-speed", "--json", str(report)]
        bench += [f"--{k}={v}" for k, v in bench_flags.items()]
        dejavu(*bench, log=log)
        quality = json.loads(report.read_text())["quality"]
        row.update({k: quality[k] for k in ("dense_ppl", "sparse_ppl", "top1_agreement", "kl")})
        row["computed"] = quality["computed"]
        summary[name] = row
        summary_path.write_text(json.dumps(summary, indent=1))
        print(f"{name}: sparse ppl {row['sparse_ppl']:.3f} (dense {row['dense_ppl']:.3f}), "
              f"top-1 {row['top1_agreement']:.3f}, KL {row['kl']:.3f}", flush=True)
    print("\n| variant | bench ppl | KL | top-1 | held-out ppl before -> after | tune s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in summary.values():
        before, after = row.get("held_out_before"), row.get("held_out_after")
        held = f"{before['sparse_ppl']:.2f} -> {after['sparse_ppl']:.2f}" if before else "-"
        print(f"| {row['variant']} | {row['sparse_ppl']:.3f} | {row['kl']:.3f} | {row['top1_agreement']:.3f} | "
              f"{held} | {row.get('tune_seconds', '-')} |")


if __name__ == "__main__":
    main()
