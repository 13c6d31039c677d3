#!/usr/bin/env bash
# Wall time of starting N processes that only import torch/accelerate, build an Accelerator, reduce
# one tensor and exit: the fixed cost a multi-process `dejavu train-predictors` pays before and
# after its layers, per launcher. Usage: bench/launcher_overhead.sh [N]   (GPU machine, N GPUs)
set -euo pipefail
N=${1:-2}
PROBE=$(mktemp --suffix .py)
cat > "$PROBE" <<'PY'
import time
t0 = time.time()
import torch
from accelerate import Accelerator
t1 = time.time()
acc = Accelerator()
acc.reduce(torch.ones(1, device=acc.device))
acc.wait_for_everyone()
t2 = time.time()
acc.end_training()
print(f"rank {acc.process_index}: imports {t1 - t0:.2f}s init+reduce {t2 - t1:.2f}s "
      f"end_training {time.time() - t2:.2f}s", flush=True)
PY
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache}  # as bench/train_scaling.sh
python -c "import accelerate, torch, transformers, accelerate.commands.launch, torch.distributed.run"
timed() { local s; s=$(date +%s.%N); "$@" 2>&1 | grep rank; echo "  -> $(python -c "print(round($(date +%s.%N) - $s, 2))") s: $*"; }
timed python "$PROBE"
timed accelerate launch --multi_gpu --num_processes "$N" --num_machines 1 --mixed_precision no --dynamo_backend no "$PROBE"
timed torchrun --nproc_per_node "$N" "$PROBE"
