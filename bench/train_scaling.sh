#!/usr/bin/env bash
# Scaling of `dejavu train-predictors` from one GPU to two, over the same collected data.
# Usage: bench/train_scaling.sh TOKENIZER_DIR CORPUS OUTDIR [LAYERS] [TOKENS]
# The model has Llama-2-7B layer shapes with random weights (its vocabulary sized to the given
# tokenizer): the activations are not a trained model's, so this measures training speed only.
# DEJAVU_TRAIN_PREFETCH=0 turns off reading the next layer while one trains (to compare; default on GPUs).
# TRAIN_ARGS: extra train-predictors flags for every run (e.g. "--cpu-threads 4"); REUSE_RUN=1 keeps the
# model and collect data of an earlier call in the same WORK directory (to compare settings on them).
set -euo pipefail
TOK=$1; CORPUS=$2; OUTDIR=$3; LAYERS=${4:-8}; TOKENS=${5:-32768}
WORK=${WORK:-/tmp/dejavu-scaling}
mkdir -p "$WORK" "$OUTDIR"
# A fresh image may ship its packages without bytecode (and read-only): every process would then
# compile torch/transformers/accelerate from source on import (5.7 s measured on the H100 device), a
# cost an installed environment does not pay. Cache bytecode in a writable place and warm it once.
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-$WORK/pycache}
python -c "import accelerate, torch, transformers, safetensors, tqdm, typer; import dejavu.cli.main, dejavu.train.train"
RUN=$WORK/run
read -r -a EXTRA <<< "${TRAIN_ARGS:-}"
if [ "${REUSE_RUN:-0}" = 1 ] && [ -f "$RUN/collect/manifest.json" ]; then
    echo "reusing $RUN/collect"
else
python - "$TOK" "$WORK/model" "$LAYERS" <<'PY'
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
tok_dir, out, layers = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(tok_dir)
cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                  num_hidden_layers=layers, vocab_size=len(tok), max_position_embeddings=4096)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out)
tok.save_pretrained(out)
PY
python -m dejavu.cli.main collect --model "$WORK/model" --dataset "$CORPUS" --out "$RUN" \
    --max-tokens "$TOKENS" --device cuda --dtype bfloat16 2>&1 | tail -3
fi
echo "== 1 GPU"
S1=$(date +%s.%N); CUDA_VISIBLE_DEVICES=0 python -m dejavu.cli.main train-predictors --run "$RUN" --overwrite \
    "${EXTRA[@]}" > "$OUTDIR/train_1gpu.log" 2>&1; E1=$(date +%s.%N)
cp "$RUN/predictors/metrics.json" "$OUTDIR/metrics_1gpu.json"
python -c "import json; m = json.load(open('$OUTDIR/metrics_1gpu.json')); print('1 GPU:', round($E1 - $S1, 1), 's wall,', 'layer seconds', round(sum(m['train_seconds'].values()), 1), 'mean', json.dumps(m['mean']))"
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -lt 2 ]; then
    echo "one GPU only: skipping the 2-GPU run"; exit 0
fi
# LAUNCHER: accelerate (default), torchrun, or both (one after the other, over the same data).
# accelerate launch itself took ~15 s longer than torchrun to start and stop two processes on the
# 2x H200 machine (bench/launcher_overhead.sh).
LAUNCHERS=${LAUNCHER:-accelerate}
[ "$LAUNCHERS" = both ] && LAUNCHERS="torchrun accelerate"
TIMES=()
for L in $LAUNCHERS; do
    echo "== 2 GPUs, $L"
    S2=$(date +%s.%N)
    if [ "$L" = torchrun ]; then
        # -r, not --run: torchrun's parser takes --run for an abbreviation of its own --run-path
        torchrun --standalone --nproc_per_node 2 -m dejavu.cli.main train-predictors -r "$RUN" --overwrite \
            "${EXTRA[@]}" > "$OUTDIR/train_2gpu_$L.log" 2>&1
    else
        accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
            --dynamo_backend no -m dejavu.cli.main train-predictors --run "$RUN" --overwrite \
            "${EXTRA[@]}" > "$OUTDIR/train_2gpu_$L.log" 2>&1
    fi
    E2=$(date +%s.%N)
    cp "$RUN/predictors/metrics.json" "$OUTDIR/metrics_2gpu_$L.json"
    TIMES+=("$L:$(python -c "print($E2 - $S2)")")
done
python - "$E1" "$S1" "$OUTDIR" "${TIMES[@]}" <<'PY'
import json, sys
e1, s1, out = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
m1 = json.load(open(f"{out}/metrics_1gpu.json"))
t1 = e1 - s1
def split(m):
    return {name: round(sum(v or 0 for v in m.get(f"{name}_seconds", {}).values()), 1)
            for name in ("load_wait", "fit")}
layer_s1 = sum(m1["train_seconds"].values())
res = {"wall_1gpu_s": round(t1, 1), "layer_seconds_1gpu": round(layer_s1, 1), "phases_1gpu": m1.get("process_phases"),
       # where the layers' seconds went, summed over layers (all processes)
       "layer_split_1gpu": split(m1), "mean_1gpu": m1["mean"], "two_gpus": {}}
for item in sys.argv[4:]:
    launcher, t2 = item.split(":")[0], float(item.split(":")[1])
    m2 = json.load(open(f"{out}/metrics_2gpu_{launcher}.json"))
    layer_s2 = max(sum(v for k, v in m2["train_seconds"].items() if int(k) % 2 == r) for r in (0, 1))
    res["two_gpus"][launcher] = {
        "wall_2gpu_s": round(t2, 1), "wall_speedup": round(t1 / t2, 2),
        "layer_seconds_2gpu_slowest_rank": round(layer_s2, 1), "layer_speedup": round(layer_s1 / layer_s2, 2),
        "phases_2gpu": m2.get("process_phases"), "layer_split_2gpu": split(m2),
        "same_means_as_1gpu": m2["mean"] == m1["mean"]}
json.dump(res, open(f"{out}/scaling.json", "w"), indent=2)
print(json.dumps(res, indent=2))
PY
