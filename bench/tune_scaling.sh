#!/usr/bin/env bash
# Scaling of `dejavu tune-predictors` from one GPU to two (accelerate launch), on the same run.
# Usage: bench/tune_scaling.sh TOKENIZER_DIR CORPUS OUTDIR [LAYERS] [SEQUENCES]
# The model has Llama-2-7B shapes with random weights and random rank-40 predictors (bench/tune_speed.py
# builds them): speed only. Each setting runs twice, SHORT and LONG steps; the difference of the runs'
# own tuning seconds (manifest: seconds_this_process) over the difference of steps is one step's time,
# free of model loading and of the held-out measurements.
set -euo pipefail
TOK=$1; CORPUS=$2; OUTDIR=$3; LAYERS=${4:-8}; SEQUENCES=${5:-4}
SHORT=${SHORT:-5}; LONG=${LONG:-45}
WORK=${WORK:-/tmp/tune-scaling}
mkdir -p "$OUTDIR"
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-$WORK/pycache}
python bench/tune_speed.py --build-only --synthetic llama-2-7b --layers "$LAYERS" --tokenizer "$TOK" \
    --dataset "$CORPUS" --out "$OUTDIR" --work "$WORK"
FLAGS=(--overwrite --sequences "$SEQUENCES" --dataset "$CORPUS" --eval-sequences 2 --eval-every 0
       --device cuda --dtype bfloat16)
for GPUS in 1 2; do
    for STEPS in "$SHORT" "$LONG"; do
        S=$(date +%s.%N)
        if [ "$GPUS" = 1 ]; then
            CUDA_VISIBLE_DEVICES=0 python -m dejavu.cli.main tune-predictors --run "$WORK/run" --steps "$STEPS" \
                "${FLAGS[@]}" > "$OUTDIR/tune-${GPUS}gpu-${STEPS}.log" 2>&1
        else
            accelerate launch --multi_gpu --num_processes 2 -m dejavu.cli.main tune-predictors --run "$WORK/run" \
                --steps "$STEPS" "${FLAGS[@]}" > "$OUTDIR/tune-${GPUS}gpu-${STEPS}.log" 2>&1
        fi
        E=$(date +%s.%N)
        python - "$WORK/run/tuned/manifest.json" "$GPUS" "$STEPS" "$S" "$E" "$OUTDIR/tune_scaling.jsonl" <<'PY'
import json, sys
manifest, gpus, steps, start, end, out = sys.argv[1:]
wall = float(end) - float(start)
t = json.load(open(manifest))["tuned"]
row = {"gpus": int(gpus), "processes": t["processes"], "steps": int(steps), "wall_seconds": float(wall),
       "tuning_seconds": t["seconds_this_process"], "kl_before": t["before"]["kl"], "kl_final": t["final"]["kl"]}
print(json.dumps(row))
open(out, "a").write(json.dumps(row) + "\n")
PY
    done
done
python - "$OUTDIR/tune_scaling.jsonl" "$SHORT" "$LONG" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
short, long = int(sys.argv[2]), int(sys.argv[3])
per_step = {}
for gpus in (1, 2):
    t = {r["steps"]: r["tuning_seconds"] for r in rows if r["gpus"] == gpus}
    per_step[gpus] = (t[long] - t[short]) / (long - short)
    print(f"{gpus} GPU(s): {per_step[gpus]:.4f} s a step")
print(f"speedup a step: {per_step[1] / per_step[2]:.2f}x")
PY
