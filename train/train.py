"""`dejavu train-predictors`: one low-rank predictor per layer for MLP neurons and one for heads.

Layers are independent, so processes split them (the layers are dealt round-robin) rather than
splitting batches: no gradient traffic, and the same command runs on a CPU, one GPU or many
(`torchrun` / `accelerate launch`). Only with more processes than layers do several processes share a
layer, each taking a slice of every batch with gradients averaged per step (Replicas). Each layer is
seeded with seed + layer, so a layer's predictor does not depend on how many processes there were.
A finished layer is written atomically and recorded in predictors/progress/, so a killed run resumes
without retraining it; rank 0 writes metrics.json and the manifest last, after every rank has finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from dejavu.artifacts import (
    MANIFEST,
    WriterLock,
    atomic_write_json,
    file_entry,
    remove_stale_temps,
    save_tensors,
    sha256_file,
    stop_together,
    verify_files,
    write_manifest,
)
from dejavu.config import RunConfig, load_config
from dejavu.errors import DejavuError
from dejavu.fp8 import dequantize_rows
from dejavu.predictor import KINDS, LowRankPredictor, predictor_rank, topk_mask, units_for_density
from dejavu.train.data import CollectRun, LayerData, StoredLayer
from dejavu.train.metrics import format_table, mean_metrics, output_error, output_metrics, selection_metrics

LOSSES = ("auto", "bce", "bce+rank", "bce+output")
TRAINED_LOSSES = LOSSES[1:]  # what "auto" resolves to
# bce+output: tokens of each batch the output term is computed on. It costs three [rows, n] x [n, d]
# products a step; on every token of a 1,024 batch that made a CPU step ~5x slower than BCE alone.
OUTPUT_ROWS = 256
EVAL_CHUNK = 8192
# Steps between checks that the loss is still finite. A check waits for the device to catch up; a
# layer's ~1400 tiny steps are bound by launching them, so a check per step left the GPU idle each step.
FINITE_CHECK_STEPS = 64
# "1" / "0": read each layer while the previous one trains, or when it is reached. Unset: read ahead
# when training on an accelerator; on the CPU the reading would compete with training for the cores.
PREFETCH_ENV = "DEJAVU_TRAIN_PREFETCH"
CHANCE_MARGIN = 0.02  # mean recall within this of a random choice's (its density) is warned about
CHECK_FAILED = "collect-check-failed"  # progress/ marker: a process's share of the collect hashes failed


def resolve_config(base: dict, config_file: str | None, overrides: dict[str, Any]) -> RunConfig:
    """The collect run's config, then the --config file, then flags (None: unset)."""
    cfg = load_config(config_file, overrides, base=base, base_source="collect manifest's config",
                      fixed=("model", "data", "collect"))
    t = cfg.train
    if t.loss not in LOSSES:
        raise DejavuError(f"train.loss must be one of {', '.join(LOSSES)}; got {t.loss!r}")
    if not (t.output_weight >= 0 and math.isfinite(t.output_weight)):  # (NaN compares false: it would turn the term off)
        raise DejavuError(f"train.output_weight must be a finite number of 0 or more, got {t.output_weight}")
    if t.hidden_activation not in ("none", "relu"):
        raise DejavuError(f"train.hidden_activation must be none or relu; got {t.hidden_activation!r}")
    for name in ("rank", "epochs", "batch_size"):
        if getattr(t, name) <= 0:
            raise DejavuError(f"train.{name} must be positive, got {getattr(t, name)}")
    return cfg


# train settings that change how fast a layer trains, never what it learns
EXECUTION_ONLY = ("layers", "cpu_threads")


def share_cpu_threads(requested: int, local_processes: int) -> int:
    """Threads for this process: `requested`, or (0) this machine's cores over its processes."""
    threads = requested if requested > 0 else max(1, (os.cpu_count() or 1) // max(1, local_processes))
    torch.set_num_threads(threads)
    return threads


def training_inputs(cfg: RunConfig, parent: dict) -> dict:
    """What a finished layer depends on: the train settings (bar the layer list) and the collect data."""
    settings = {k: v for k, v in cfg.to_dict()["train"].items() if k not in EXECUTION_ONLY}
    if settings.get("loss") != "bce+output":  # a weight of a term not trained with changes nothing
        settings.pop("output_weight", None)
    return {"train": settings, "collect": parent["sha256"]}


def training_key(cfg: RunConfig, parent: dict) -> str:
    blob = json.dumps(training_inputs(cfg, parent), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _inputs_difference(old: dict | None, new: dict) -> str:
    """Which train settings (or the collect data) a stale layer differs in, for the refusal message;
    records written before the inputs were stored name nothing."""
    if not isinstance(old, dict) or not isinstance(old.get("train", {}), dict) or not old:
        return "other settings or other collect data"
    parts = [f"train.{k}: {old.get('train', {}).get(k)!r} -> {v!r}" for k, v in new["train"].items()
             if old.get("train", {}).get(k) != v]
    if old.get("collect") != new["collect"]:
        parts.append("other collect data")
    return "; ".join(parts) or "other settings"


# ---------------------------------------------------------------- fitting one predictor

def resolve_loss(loss: str, collect: CollectRun) -> tuple[str, str | None]:
    """(the loss to train with, a note for the user or None): "auto" is bce+output when the collect run
    kept the MLP's down inputs, bce otherwise."""
    if loss == "auto":
        if collect.down_inputs:
            return "bce+output", None
        return "bce", (f"note: {collect.dir} has no MLP down inputs (collected with collect.record_down_input false "
                       "or by an older version), so the loss is bce alone; collect again for bce+output, the "
                       "better predictors")
    if loss == "bce+output" and not collect.down_inputs:
        raise DejavuError(f"--loss bce+output needs the MLP down inputs, which {collect.dir} lacks (collected with "
                          "collect.record_down_input false or by an older version): collect again, or use --loss bce")
    return loss, None


def _loss(scores: torch.Tensor, target: torch.Tensor, kind: str, pos_weight: torch.Tensor, k: int,
          gen: torch.Generator, act: torch.Tensor | None = None, w_down: torch.Tensor | None = None,
          output_weight: float = 1.0) -> torch.Tensor:
    # One class weight for all units: per-unit weights would shift each unit's logit by a different
    # constant and so reorder units within a token, which is exactly the decision top-k makes.
    loss = F.binary_cross_entropy_with_logits(scores, target, pos_weight=pos_weight)
    # (BCE around each token's own top-k threshold was tried too: identical held-out figures on
    # SmolLM2 at density 0.5, at 2.5x the time, so it was dropped.)
    if kind == "bce+rank":
        # Pairwise logistic ranking on sampled (active, inactive) pairs of the same token.
        pairs = 32
        weights_pos = target + 1e-6
        weights_neg = (1 - target) + 1e-6
        pos = torch.multinomial(weights_pos.cpu(), pairs, replacement=True, generator=gen).to(scores.device)
        neg = torch.multinomial(weights_neg.cpu(), pairs, replacement=True, generator=gen).to(scores.device)
        margin = scores.gather(1, pos) - scores.gather(1, neg)
        loss = loss + F.softplus(-margin).mean()
    if kind == "bce+output" and act is not None:  # act: the down inputs of the batch's first rows
        # The labels rank neurons by |activation| alone; what a dropped neuron costs is its share of the
        # MLP's output, through down and together with the other dropped ones. Measured on SmolLM2 (every
        # layer, MLP 0.5, rank 128, 37K tokens): perplexity 50.0 with BCE alone, 32.0 with this term.
        loss = loss + output_weight * output_error(scores[:act.shape[0]], act, w_down, k).mean()
    return loss


@dataclass
class Replicas:
    """Processes training one layer together (more processes than layers): each takes its slice of
    every batch and the gradients are averaged each step, so they follow the one-process run's updates.
    The loss travels in the same all-reduce, so a NaN stops every member at the same step."""

    group: Any
    size: int
    member: int

    def batch_slice(self, idx: torch.Tensor) -> torch.Tensor:
        # a batch smaller than the group is taken whole by every member (the average is unchanged)
        return idx[self.member::self.size] if idx.numel() >= self.size else idx

    def average(self, params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.detach().reshape(1)])
        dist.all_reduce(flat, group=self.group)
        flat /= self.size
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return flat[-1]


def split_batch(batch: torch.Tensor, replicas: Replicas | None) -> tuple[torch.Tensor, int]:
    """(this process's rows of the batch, how many of them lead into the bce+output term). The term runs
    on the batch's first OUTPUT_ROWS rows (a random subset: the order is shuffled); replicas each take
    their slice of those, which are the first rows of their slice of the batch, so the averaged gradient
    is the one-process run's (exactly when the replica count divides the batch and those rows, as for BCE:
    each replica's loss is the mean of its own rows)."""
    if replicas is None:
        return batch, min(OUTPUT_ROWS, batch.numel())
    mine = replicas.batch_slice(batch)
    return mine, min(mine.numel(), replicas.batch_slice(batch[:OUTPUT_ROWS]).numel())


def plan_layers(layers: list[int], rank: int, world: int) -> tuple[list[int], Replicas | None]:
    """This process's layers: layers are dealt round-robin; with more processes than layers, each layer
    gets world // len(layers) processes training it data-parallel (any remainder idles)."""
    if world <= len(layers):
        return layers[rank::world], None
    import torch.distributed as dist

    size = world // len(layers)
    groups = [list(range(i * size, (i + 1) * size)) for i in range(len(layers))]
    handles = [dist.new_group(ranks) for ranks in groups]  # every process must create every group
    for layer, ranks, handle in zip(layers, groups, handles, strict=True):
        if rank in ranks:
            return [layer], Replicas(handle, size, ranks.index(rank))
    return [], None


def fit_predictor(x: torch.Tensor, target: torch.Tensor, *, cfg: RunConfig, density: float, seed: int,
                  device: torch.device, desc: str, show: bool, replicas: Replicas | None = None,
                  down: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  loss_kind: str | None = None) -> LowRankPredictor:
    """Train one predictor on x [T, d] -> target [T, n] (bool); returns it on the CPU, float32.
    down: (down inputs as fp8 [T, n], their row scales [T], W_down [d, n]) for the bce+output loss;
    loss_kind: the loss (default train.loss; the heads' predictors, which have no down, take bce)."""
    t = cfg.train
    tokens, d_in = x.shape
    n_out = target.shape[1]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    pred = LowRankPredictor(d_in, n_out, predictor_rank(t.rank, n_out, t.hidden_activation), t.hidden_activation)
    mean, std = _input_stats(x)
    pred.set_input_stats(mean, std)
    pred.to(device)
    positive = (torch.count_nonzero(target) / target.numel()).float().clamp(1e-4, 1 - 1e-4)
    pos_weight = ((1 - positive) / positive).to(device)
    k = units_for_density(density, n_out)

    params = [p for p in pred.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    steps_per_epoch = math.ceil(tokens / t.batch_size)
    total = t.epochs * steps_per_epoch
    warmup = max(1, total // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))))
    # One layer's data fits on any accelerator; moving it once beats a host copy per batch.
    x, target = x.to(device), target.to(device)
    kind = loss_kind or t.loss
    if kind not in TRAINED_LOSSES:
        raise DejavuError(f"{desc}: cannot train with loss {kind!r} (one of {', '.join(TRAINED_LOSSES)}; "
                          "resolve_loss turns auto into one)")
    use_output = kind == "bce+output" and t.output_weight > 0
    if kind == "bce+output":
        if down is None:
            raise DejavuError(f"{desc}: the bce+output loss needs the MLP's down inputs")
        down_q, down_scale, w_down = down[0].to(device), down[1].to(device), down[2].to(device, torch.float32)
    bar = tqdm(total=total, desc=desc, leave=False, disable=not show, unit="step")
    # A NaN or infinite loss makes this sum non-finite too, so one look at it covers every step since
    # the last look (a Replicas loss is the averaged one, so every member stops at the same check).
    loss_sum = torch.zeros((), device=device)
    step = checked = 0
    for _ in range(t.epochs):
        order = torch.randperm(tokens, generator=gen).to(device)
        for start in range(0, tokens, t.batch_size):
            idx, output_rows = split_batch(order[start:start + t.batch_size], replicas)
            xb = x[idx].to(device, torch.float32, non_blocking=True)
            yb = target[idx].to(device, torch.float32, non_blocking=True)
            act = dequantize_rows(down_q[idx[:output_rows]], down_scale[idx[:output_rows]]) if use_output else None
            loss = _loss(pred(xb), yb, kind, pos_weight, k, gen, act, w_down if act is not None else None,
                         t.output_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if replicas is not None:
                loss = replicas.average(params, loss)
            loss_sum += loss.detach()
            opt.step()
            sched.step()
            bar.update()
            step += 1
            if step % FINITE_CHECK_STEPS == 0:
                checked = _check_finite(loss_sum, desc, checked, step, total)
        checked = _check_finite(loss_sum, desc, checked, step, total)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return pred.cpu().float()


def _check_finite(loss_sum: torch.Tensor, desc: str, checked: int, step: int, total: int) -> int:
    """Raise if a loss since step `checked` was NaN or infinite; returns the step now checked."""
    if step == checked:
        return step
    if not torch.isfinite(loss_sum):
        raise DejavuError(f"{desc}: the loss became NaN or infinite within steps {checked + 1}-{step} of {total} "
                          "(lower --lr, or check the collect data)")
    loss_sum.zero_()
    return step


def _input_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    square = torch.zeros_like(total)
    for start in range(0, x.shape[0], EVAL_CHUNK):
        chunk = x[start:start + EVAL_CHUNK].double()
        total += chunk.sum(0)
        square += (chunk * chunk).sum(0)
    mean = total / x.shape[0]
    var = (square / x.shape[0] - mean * mean).clamp_min(0)
    return mean.float().cpu(), var.sqrt().float().cpu()


@torch.no_grad()
def predict(pred: LowRankPredictor, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The predictor's scores for x, on `device`."""
    pred = pred.to(device)
    out = [pred(x[s:s + EVAL_CHUNK].to(device, torch.float32)) for s in range(0, x.shape[0], EVAL_CHUNK)]
    pred.cpu()
    return torch.cat(out)


def head_targets(head_norms: torch.Tensor, density: float) -> torch.Tensor:
    return topk_mask(head_norms, density)


def train_layer(train: LayerData, held_out: LayerData, layer: int, cfg: RunConfig, device: torch.device,
                show: bool, replicas: Replicas | None = None,
                w_down: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Fit and evaluate both predictors of one layer; returns (tensors to save, metrics). w_down: the
    layer's down projection, for the bce+output loss and the held-out output error."""
    t = cfg.train
    seed = t.seed + layer
    down = None if train.down_input is None else (train.down_input, train.down_scale, w_down)
    mlp = fit_predictor(train.x_mlp, train.mlp_labels, cfg=cfg, density=t.mlp_density, seed=seed,
                        device=device, desc=f"layer {layer} mlp", show=show, replicas=replicas, down=down)
    attn = fit_predictor(train.x_attn, head_targets(train.head_norms, t.head_density), cfg=cfg,
                         density=t.head_density, seed=seed, device=device, desc=f"layer {layer} attn", show=show,
                         replicas=replicas, loss_kind="bce" if t.loss == "bce+output" else None)
    # The held-out metrics run where the predictors trained: their top-k over every held-out token was
    # the CPU's largest share of a GPU fit (measured on 2x H200: ~1 s a layer, and slower still with two
    # processes sharing the host's cores).
    held = held_out.to(device)
    mlp_scores = predict(mlp, held.x_mlp, device)
    metrics = {
        "mlp": selection_metrics(mlp_scores, held.mlp_labels, held.mlp_act, t.mlp_density),
        "attn": selection_metrics(predict(attn, held.x_attn, device), head_targets(held.head_norms, t.head_density),
                                  held.head_norms, t.head_density),
    }
    if held.down_input is not None and w_down is not None:  # the share of the MLP's output left out
        metrics["mlp"].update(output_metrics(mlp_scores, held.down_input, held.down_scale, w_down.to(device),
                                             t.mlp_density))
    tensors = {f"{kind}.{name}": value.float().contiguous()
               for kind, pred in (("mlp", mlp), ("attn", attn)) for name, value in pred.tensors().items()}
    for name, value in tensors.items():
        if not torch.isfinite(value).all():
            raise DejavuError(f"layer {layer}: predictor tensor {name} is not finite after training")
    return tensors, metrics


# ---------------------------------------------------------------- the stage

def layer_file(layer: int) -> str:
    return f"layers/layer-{layer:03d}.safetensors"


def _record_path(out: Path, layer: int) -> Path:
    return out / "progress" / f"layer-{layer:03d}.json"


def _read_json(path: Path) -> dict | None:
    """A JSON object's contents; None where the file is missing, unreadable or holds another JSON value (an
    edited record is then treated like a missing one: its layer is trained again)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def finished_record(out: Path, layer: int, key: str) -> dict | None:
    """The progress record of a layer already trained with these settings, if its file is intact."""
    record = _read_json(_record_path(out, layer))
    if record is None or record.get("key") != key or not isinstance(record.get("file"), str):
        return None
    weights = out / record["file"]
    if not weights.is_file() or weights.stat().st_size != record.get("bytes") \
            or sha256_file(weights) != record.get("sha256"):
        return None
    return record


def _stale_layers(out: Path, key: str) -> list[dict]:
    """Progress records of layers trained with other inputs than `key`'s."""
    stale = []
    for path in sorted((out / "progress").glob("layer-*.json")):
        record = _read_json(path)
        if record is not None and record.get("key") != key:
            stale.append(record)
    return stale


def layer_weight_bytes(model: dict, itemsize: int = 2) -> int:
    """Bytes of one decoder layer's MLP + attention projection weights (16-bit by default)."""
    h, n = model["hidden_size"], model["intermediate_size"]
    q = model["num_heads"] * model["head_dim"]
    kv = model["num_kv_heads"] * model["head_dim"]
    mlp = (3 if model.get("gated_mlp", True) else 2) * h * n
    return (mlp + h * q + 2 * h * kv + q * h) * itemsize


def predictor_cost(model: dict, rank: int, activation: str = "none", itemsize: int = 2) -> dict:
    """Predictor bytes per layer, alone and as a share of the layer's weight bytes (same dtype)."""
    h = model["hidden_size"]

    def size(n_out: int) -> int:
        r = predictor_rank(rank, n_out, activation)
        return (r * h + r + n_out * r + n_out + 2 * h) * itemsize

    mlp, attn = size(model["intermediate_size"]), size(model["num_heads"])
    layer = layer_weight_bytes(model, itemsize)
    return {"mlp_bytes": mlp, "attn_bytes": attn, "layer_weight_bytes": layer,
            "mlp_fraction": mlp / layer, "total_fraction": (mlp + attn) / layer}


def _process_age() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere): interpreter and import time."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return time.time() - (boot + int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class PhaseClock:
    """Wall seconds per phase of one process's run: where a multi-process start-up goes."""

    def __init__(self):
        age = _process_age()
        self.phases: dict[str, float] = {} if age is None else {"start_and_imports": round(age, 2)}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = round(now - self._last, 2)
        self._last = now


class LayerPrefetch:
    """Hands out the layers' data in order, reading the next layer on one background thread while the
    current one trains, so the device does not idle through shard reads between layers. Host memory
    holds at most two layers: the one handed out and the one being read. A layer whose read failed
    raises its error when it is reached, so the layers before it still finish and stay saved."""

    def __init__(self, read: Callable[[int], tuple], layers: list[int], ahead: bool):
        self._read = read
        self._following = dict(zip(layers, layers[1:], strict=False))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dejavu-prefetch") if ahead else None
        self._pending: tuple[int, Future] | None = None
        if layers:
            self._start(layers[0])

    def _start(self, layer: int) -> None:
        if self._pool is not None:
            self._pending = (layer, self._pool.submit(self._read, layer))

    def take(self, layer: int) -> tuple:
        """The layer's data, or the error its read raised; starts reading the layer after it."""
        pending, self._pending = self._pending, None
        data = pending[1].result() if pending is not None and pending[0] == layer else self._read(layer)
        if layer in self._following:
            self._start(self._following[layer])
        return data

    def close(self) -> None:
        # waits for a read in flight (at most one layer's) so no thread is left reading as the run unwinds
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def prefetch_enabled(device: torch.device) -> bool:
    setting = os.environ.get(PREFETCH_ENV, "").strip().lower()
    if setting in ("", "auto"):
        return device.type != "cpu"
    return setting not in ("0", "false", "no", "off")


def _sync(device: torch.device) -> None:
    """Wait for this thread's stream only: a whole-device sync would also wait on a collective of the
    process group that is waiting for a slower process."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class CollectCheck:
    """Hashes this process's share of the collect files on a background thread while the layers train.
    Up front, the sha256 of tens of GB was most of a multi-GPU run's fixed start-up (7-9 s for 30 GB on
    2x H200), paid before any layer began; presence and sizes are still checked before training."""

    def __init__(self, collect: CollectRun, share: tuple[int, int]):
        self._stop = threading.Event()
        pool = ThreadPoolExecutor(1, thread_name_prefix="dejavu-verify")
        self._future = pool.submit(verify_files, collect.dir, collect.manifest, share, stop=self._stop)
        pool.shutdown(wait=False)

    def cancel(self) -> None:
        """Stop hashing: the run is ending on an error or Ctrl-C, and Python would otherwise wait for
        the hash threads (tens of seconds at tens of GB) before it exits."""
        self._stop.set()

    def failed(self) -> bool:
        """Whether the check has already found a problem (never waits)."""
        return self._future.done() and self._future.exception() is not None

    def wait(self) -> DejavuError | None:
        """The problem the check found, once it has finished; None when every file matched."""
        problem = self._future.exception()
        if problem is not None and not isinstance(problem, DejavuError):
            raise problem
        return problem


def _forget_layers(out: Path, layers: list[int]) -> None:
    """Remove layers trained from collect data that then failed its check, so no later run resumes
    from them; layers finished by earlier runs stay."""
    for layer in layers:
        _record_path(out, layer).unlink(missing_ok=True)
        (out / layer_file(layer)).unlink(missing_ok=True)


def run_train(run: Path, config_file: str | None = None, overrides: dict | None = None,
              overwrite: bool = False) -> dict | None:
    """Train every layer's predictors from RUN/collect/ into RUN/predictors/; returns the manifest (rank 0)."""
    locks: list[WriterLock] = []
    try:
        return _train(run, config_file, overrides, overwrite, locks)
    finally:  # an error or Ctrl-C too: the next run must not be told that this one still writes
        for lock in locks:
            lock.release()


def _train(run: Path, config_file: str | None, overrides: dict | None, overwrite: bool, locks: list) -> dict | None:
    from accelerate import Accelerator, InitProcessGroupKwargs

    run = Path(run)
    clock = PhaseClock()
    # cpu=True is what makes accelerate join a torchrun group over gloo when there is no GPU; the long
    # timeout lets rank 0 wait at the final barrier for the slowest rank's layers.
    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=12))])
    clock.mark("accelerator")
    collect = CollectRun(run, hash_share=None)  # files present with their sizes; hashed once layers start
    clock.mark("check_collect")
    cfg = resolve_config(collect.manifest.get("config") or {}, config_file, overrides or {})
    cfg.train.loss, loss_note = resolve_loss(cfg.train.loss, collect)
    tag = collect.label_tag(cfg.train.mlp_density)
    key, inputs = training_key(cfg, collect.parent), training_inputs(cfg, collect.parent)
    layers = sorted(set(cfg.train.layers)) if cfg.train.layers else list(range(collect.num_layers))
    for layer in layers:
        if not 0 <= layer < collect.num_layers:
            raise DejavuError(f"train.layers lists layer {layer}; the model has {collect.num_layers}")

    main = acc.is_main_process
    if main and loss_note:
        print(loss_note, flush=True)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
    share_cpu_threads(cfg.train.cpu_threads, local)
    out = run / "predictors"
    problem = None
    if main:  # (the run's other processes write their layers under the main process's lock)
        try:
            locks.append(WriterLock(run / ".predictors.lock", str(out)))
            remove_stale_temps(out)
            if overwrite and out.exists():
                for name in ("layers", "progress"):
                    shutil.rmtree(out / name, ignore_errors=True)
                (out / "metrics.json").unlink(missing_ok=True)
            stale = _stale_layers(out, key)
            if stale:
                layers_stale = sorted(r["layer"] if isinstance(r.get("layer"), int) else -1 for r in stale)
                shown = ", ".join(map(str, layers_stale[:12])) + (f" and {len(stale) - 12} more" if len(stale) > 12 else "")
                raise DejavuError(
                    f"{out} holds {len(stale)} layer(s) ({shown}) trained with "
                    f"{_inputs_difference(stale[0].get('inputs'), inputs)}; "
                    "pass --overwrite to replace them (or use another --run directory)")
            # The manifest marks a finished stage; drop it until this run has finished again.
            (out / MANIFEST).unlink(missing_ok=True)
            (out / "layers").mkdir(parents=True, exist_ok=True)
            (out / "progress").mkdir(parents=True, exist_ok=True)
            for marker in (out / "progress").glob(f"{CHECK_FAILED}-*"):
                marker.unlink()  # left by an earlier run whose collect data has since been checked again
        except (DejavuError, OSError) as exc:
            problem = exc
    stop_together(problem, acc.device, str(out))
    clock.mark("prepare")
    check = CollectCheck(collect, (acc.process_index, acc.num_processes))

    mine, replicas = plan_layers(layers, acc.process_index, acc.num_processes)
    writer = replicas is None or replicas.member == 0
    todo = [layer for layer in mine if finished_record(out, layer, key) is None]
    if main and len(todo) < len(mine):
        print(f"{len(mine) - len(todo)} of {len(mine)} layers{' of this process' if acc.num_processes > 1 else ''} "
              "already trained with these settings: kept" + ("" if todo else "; rewriting the manifest"), flush=True)
    ahead = prefetch_enabled(acc.device)
    # Layers read ahead are read on the CPU and moved to the device by this thread; read when reached,
    # a layer goes straight to the device, which then runs its checks and label unpacking.
    read_device = torch.device("cpu") if ahead else acc.device
    pin = ahead and acc.device.type == "cuda"
    data = LayerPrefetch(lambda layer: _read_layer(collect, layer, cfg, tag, read_device, pin), todo, ahead)
    overall = tqdm(total=len(mine), desc="layers", disable=not main, unit="layer")
    written: list[int] = []
    skipped = 0
    try:
        for layer in mine:
            # A process stops at the first layer after its own check failed, leaving a marker in the
            # shared run directory, and at the first layer after another's marker appears. Replicas of
            # a layer train on to the joint check below: one leaving early would stall their collectives.
            if replicas is None:
                if check.failed():
                    (out / "progress" / f"{CHECK_FAILED}-{acc.process_index}").touch()
                    break
                if acc.num_processes > 1 and any((out / "progress").glob(f"{CHECK_FAILED}-*")):
                    break
            if layer not in todo:
                skipped += 1
                overall.set_postfix(skipped=skipped)  # how many were already finished, not a layer index
                overall.update()
                continue
            started = time.perf_counter()
            stored, eval_data, w_down = data.take(layer)
            train_data = stored.to(acc.device, non_blocking=pin).unpacked()
            _sync(acc.device)
            del stored  # after the sync: an asynchronous copy may still be reading the pinned pages
            # a process's first fit also pays the device's one-off start-up (CUDA context, cuBLAS,
            # first kernels): warming up on a thread beside the first read measured slower (3.3 s on
            # an H100) once the collect hashes no longer ran up front to hide it
            loaded = time.perf_counter()
            tensors, metrics = train_layer(train_data, eval_data, layer, cfg, acc.device, show=main,
                                           replicas=replicas, w_down=w_down)
            fitted = time.perf_counter()
            del train_data, eval_data
            if writer:
                _save_layer(out, layer, key, tensors, {
                    "metrics": metrics, "load_wait_seconds": round(loaded - started, 3),
                    "fit_seconds": round(fitted - loaded, 3),
                    "process": acc.process_index, "replicas": 1 if replicas is None else replicas.size,
                    "inputs": inputs,
                }, started)
                written.append(layer)
            overall.set_postfix(mlp_mass=f"{metrics['mlp']['mass_kept']:.3f}")
            overall.update()
    except BaseException:
        check.cancel()
        raise
    finally:
        data.close()
    overall.close()
    clock.mark("layers")
    problem = check.wait()
    clock.mark("check_wait")
    failed = problem is not None
    if acc.num_processes > 1:  # also the barrier before rank 0 gathers every layer
        failed = acc.reduce(torch.tensor([float(failed)], device=acc.device), reduction="sum").item() > 0
    clock.mark("wait_for_others")
    if failed:
        _forget_layers(out, written)
        raise problem or DejavuError(f"{run}/collect: another process found a damaged file (its error names it); "
                                     "collect again")
    atomic_write_json(out / "progress" / f"phases-{acc.process_index}.json", clock.phases)
    acc.wait_for_everyone()
    try:
        return _finish(out, cfg, collect, layers, key, acc.num_processes) if main else None
    finally:
        acc.end_training()  # releases the process group (NCCL warns at exit otherwise)


def _save_layer(out: Path, layer: int, key: str, tensors: dict[str, torch.Tensor], details: dict,
                started: float) -> None:
    """Write the layer's predictors, then its progress record: the record is what marks it finished."""
    path = out / layer_file(layer)
    digest = save_tensors(path, tensors, metadata={"format": "dejavu.predictors", "layer": str(layer)})
    atomic_write_json(_record_path(out, layer), {
        "layer": layer, "key": key, "file": layer_file(layer), "bytes": path.stat().st_size, "sha256": digest,
        "seconds": round(time.perf_counter() - started, 3), **details,
    })


def _read_layer(collect: CollectRun, layer: int, cfg: RunConfig, tag: str, device: torch.device,
                pin: bool = False) -> tuple[StoredLayer, LayerData, torch.Tensor | None]:
    """One layer's train split (labels still packed, on `device`; pinned if asked, for a GPU to copy),
    held-out split (on the CPU; train_layer moves it where the predictors are) and, where the run kept
    them, its down projection (the down inputs come with the train split for the bce+output loss, with
    the held-out split whenever they exist, for the output-error metric)."""
    pairing = (cfg.train.mlp_pairing, cfg.train.head_pairing)
    train = collect.read_layer(layer, "train", *pairing, tag, device=device, down=cfg.train.loss == "bce+output")
    held_out = collect.load_layer(layer, "eval", *pairing, tag, down=collect.down_inputs)
    w_down = collect.down_weight(layer) if collect.down_inputs else None
    return train.pinned() if pin else train, held_out, w_down


def chance_warnings(means: dict) -> list[str]:
    """A random choice of the same size has recall equal to its density; a diverged run lands there."""
    return [f"warning: the {kind} predictors barely beat a random choice (mean recall {m['recall']:.3f} at "
            f"predicted density {m['predicted_density']:.3f}); training may have diverged (a lower --lr?) or had "
            "too little data"
            for kind, m in means.items()
            if m and m["predicted_density"] < 1 - CHANCE_MARGIN and m["recall"] < m["predicted_density"] + CHANCE_MARGIN]


def _finish(out: Path, cfg: RunConfig, collect: CollectRun, layers: list[int], key: str,
            processes: int = 1) -> dict:
    records = {}
    for layer in layers:
        record = finished_record(out, layer, key)
        if record is None:
            raise DejavuError(f"layer {layer} has no finished predictor in {out}: run the command again to resume")
        records[layer] = record
    per_layer = {str(layer): records[layer]["metrics"] for layer in layers}
    means = {kind: mean_metrics([per_layer[str(layer)][kind] for layer in layers]) for kind in KINDS}
    cost = predictor_cost(collect.model, cfg.train.rank, cfg.train.hidden_activation)
    metrics = {
        "mlp_density": cfg.train.mlp_density, "head_density": cfg.train.head_density,
        "mlp_pairing": cfg.train.mlp_pairing, "head_pairing": cfg.train.head_pairing,
        "rank": cfg.train.rank, "loss": cfg.train.loss, "mlp_label_tag": collect.label_tag(cfg.train.mlp_density),
        **({"output_weight": cfg.train.output_weight} if cfg.train.loss == "bce+output" else {}),
        "layers": per_layer, "mean": means, "cost": cost,
        "train_seconds": {str(layer): records[layer]["seconds"] for layer in layers},
        # train_seconds split: waiting for the layer's data (read ahead, then moved to the device), and
        # fitting plus held-out metrics (a process's first fit includes the device's start-up)
        **{name: {str(layer): records[layer].get(name) for layer in layers}
           for name in ("load_wait_seconds", "fit_seconds")},
        # per process: seconds from its start to the end of its layers, by phase (execution detail:
        # it differs between runs and is not part of what the predictors are)
        "process_phases": {str(r): _read_json(out / "progress" / f"phases-{r}.json") for r in range(processes)},
    }
    atomic_write_json(out / "metrics.json", metrics)
    files = [file_entry(out / records[layer]["file"], out, records[layer]["sha256"]) for layer in layers]
    files.append(file_entry(out / "metrics.json", out))
    manifest = write_manifest(
        out, "dejavu.predictors", cfg.to_dict(), files, parent=collect.parent,
        model=collect.model, layers=len(layers), layer_indices=layers, rank=cfg.train.rank,
        attn_rank=predictor_rank(cfg.train.rank, collect.heads, cfg.train.hidden_activation),
        hidden_activation=cfg.train.hidden_activation, mlp_pairing=cfg.train.mlp_pairing,
        head_pairing=cfg.train.head_pairing, mlp_density=cfg.train.mlp_density,
        head_density=cfg.train.head_density, metrics=means, predictor_cost=cost,
    )
    tqdm.write(format_table(per_layer, means))
    for warning in chance_warnings(means):
        tqdm.write(warning)
    tqdm.write(f"predictors: {out} (rank {cfg.train.rank}, {cost['total_fraction']:.1%} of a layer's weight bytes)")
    return manifest
