"""`dejavu tune-predictors`: tune every layer's trained predictors together, end to end.

`train-predictors` fits each layer alone, on the dense model's block inputs. At inference the layers
run sparse one after another: each predictor reads inputs that earlier layers' selections have already
changed, and what a miss costs depends on the layers after it. Here the loaded model runs sparse with
all predictors at once (runtime/apply.py, straight-through top-k: hard selections forward, sigmoid
gradients back) and the predictors are trained on KL(dense || sparse) of the next-token distribution,
over sequences of the calibration corpus. The model's own weights stay frozen.

Reads RUN/predictors/; writes RUN/tuned/ in the same format (layer files, metrics.json, a manifest of
kind dejavu.predictors naming the predictors it started from), so `dejavu export --run RUN/tuned` reads it
as it reads RUN/predictors. A checkpoint every `tune.checkpoint_every` steps (and after the last) lets a
killed run resume where it stopped and end where an uninterrupted one would. Every `tune.eval_every` steps
the held-out sequences are measured again and the predictors with the lowest held-out KL are the ones
written: a run too long or too fast for its predictors drifts (measured: BENCHMARKS.md, session 19), and
the trained predictors themselves come back when nothing beats them. The held-out figures reported are
those of the predictors written, so they are chosen on the sequences they are measured on; `dejavu bench`
on other text is the independent check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dejavu.artifacts import (
    MANIFEST,
    WriterLock,
    atomic_write_json,
    check_can_write,
    check_finite,
    file_entry,
    load_tensors,
    manifest_hash,
    parent_ref,
    read_manifest,
    remove_stale_temps,
    save_tensors,
    stop_together,
    tokens_sha256,
    write_manifest,
)
from dejavu.config import RunConfig, load_config
from dejavu.corpus import absolute_spec
from dejavu.errors import DejavuError
from dejavu.predictor import KINDS, PREDICTOR_TENSORS, LayerPredictors, LowRankPredictor, PredictorSet
from dejavu.runtime.compensation import PARTS as COMPENSATION_PARTS
from dejavu.runtime.compensation import TENSOR_PREFIX as COMPENSATION_KIND
from dejavu.train.train import layer_file

PREDICTORS_KIND = "dejavu.predictors"
CHECKPOINT = "progress/checkpoint.safetensors"


def resolve_tune_config(base: dict, config_file: str | None, overrides: dict[str, Any]) -> RunConfig:
    """The training run's config, then the --config file, then flags; what earlier stages ran with stays.
    The tune section itself is not the run's: collect and train store every section as it stood then, and
    a default changed since (lr 0.002 -> 0.0005 in session 19) would otherwise stay behind without a word."""
    base = {section: value for section, value in base.items() if section != "tune"}
    cfg = load_config(config_file, overrides, base=base, base_source="predictors manifest's config",
                      fixed=("model", "collect", "train"))
    ran = load_config(None, None, base=base, base_source="predictors manifest's config").data
    flagged = {key.partition(".")[2] for key, value in overrides.items() if key.startswith("data.") and value is not None}
    # the file's corpus settings are taken (tuning text may differ from what collect read), but never unsaid: every
    # shipped config names a corpus
    changed = [f.name for f in dataclasses.fields(ran)
               if f.name not in flagged and getattr(ran, f.name) != getattr(cfg.data, f.name)]
    if config_file is not None and changed:
        taken = ", ".join(f"data.{k} = {getattr(cfg.data, k)!r} (collect: {getattr(ran, k)!r})" for k in changed)
        print(f"note: {config_file} sets the tuning's corpus settings: {taken}", file=sys.stderr, flush=True)
    t = cfg.tune
    for name in ("steps", "sequences", "eval_sequences", "checkpoint_every"):
        if getattr(t, name) <= 0:
            raise DejavuError(f"tune.{name} must be positive, got {getattr(t, name)}")
    if t.eval_every < 0:
        raise DejavuError(f"tune.eval_every must be 0 (measure before and after only) or positive, got {t.eval_every}")
    if not (t.lr > 0 and math.isfinite(t.lr)):
        raise DejavuError(f"tune.lr must be a positive number, got {t.lr}")
    if not (t.sharpness > 0 and math.isfinite(t.sharpness)):
        raise DejavuError(f"tune.sharpness must be a positive number, got {t.sharpness}")
    return cfg


def tune_densities(cfg: RunConfig, pm: dict) -> tuple[float, float]:
    """The densities to tune at: tune.*, else what `export` would give the bundle by default."""
    t = cfg.tune
    mlp = t.mlp_density or cfg.export.mlp_density or pm.get("mlp_density") or cfg.train.mlp_density
    heads = t.head_density or cfg.export.head_density or pm.get("head_density") or cfg.train.head_density
    return float(mlp), float(heads)


def predictors_identity(pm: dict) -> str:
    """What defines a set of trained predictors: their layer files' hashes, shapes and pairings, and the collect
    data they came from. Not the manifest's own hash: rerunning train-predictors on a finished run rewrites the
    manifest (its date, its timings) and leaves the predictors as they were."""
    layers = sorted((entry["path"], entry.get("sha256")) for entry in pm.get("files", [])
                    if str(entry.get("path", "")).startswith("layers/"))
    what = {"layers": layers, "parent": (pm.get("parent") or {}).get("sha256"),
            **{k: pm.get(k) for k in ("rank", "attn_rank", "hidden_activation", "mlp_pairing", "head_pairing")}}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def tuning_inputs(cfg: RunConfig, pm: dict, densities: tuple[float, float], dtype: str) -> dict:
    """What a tuning depends on: the tune settings, the densities, corpus and model dtype, and the predictors
    it started from. (The densities as resolved: restating a default changes nothing.)"""
    settings = {k: v for k, v in cfg.to_dict()["tune"].items()
                if k not in ("checkpoint_every", "mlp_density", "head_density")}
    if not 0 < settings["eval_every"] < settings["steps"]:  # no measurement between before and after either way
        settings["eval_every"] = 0
    if settings.get("mlp_selection") == "topk":  # as before the setting existed: earlier tunings stay current
        del settings["mlp_selection"]
    if settings.get("mlp_candidate_density") is None:
        settings.pop("mlp_candidate_density", None)
    if not settings.get("mlp_compensation_rank"):
        settings.pop("mlp_compensation_rank", None)
    if settings.get("mlp_compensation_lr") is None:
        settings.pop("mlp_compensation_lr", None)
    d = cfg.data
    # a local corpus by its absolute path: the same file named from another directory is the same corpus
    dataset = absolute_spec(d.dataset)
    return {"tune": settings, "mlp_density": densities[0], "head_density": densities[1],
            "dataset": dataset, "split": d.split, "text_field": d.text_field, "seq_len": d.seq_len,
            "data_seed": d.seed, "dtype": dtype, "predictors": predictors_identity(pm)}


def inputs_difference(old: dict | None, new: dict) -> str:
    """The settings a refused rerun differs in, stored value first: `other settings (tune.lr: 0.002 -> 0.01)`."""
    if not old:
        return "other settings"

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(old), flat(new)
    parts = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" if k != "predictors" else "other trained predictors"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return f"other settings ({', '.join(parts)})" if parts else "other settings"


def read_predictors(pred_dir: Path, pm: dict) -> tuple[PredictorSet, list[int]]:
    """The trained predictors of every layer listed in the manifest (float32, CPU)."""
    num_layers = int((pm.get("model") or {}).get("num_layers") or 0)
    listed = {entry["path"] for entry in pm.get("files", [])}
    layers, present = [], []
    for l in range(num_layers):  # noqa: E741
        if layer_file(l) not in listed:
            layers.append(LayerPredictors(None, None))
            continue
        tensors = load_tensors(pred_dir / layer_file(l))
        by_kind = {}
        for kind in KINDS:
            part = {name: tensors.get(f"{kind}.{name}") for name in PREDICTOR_TENSORS}
            missing = [name for name, value in part.items() if value is None]
            if missing:
                raise DejavuError(f"{pred_dir / layer_file(l)} lacks {kind}.{missing[0]}: train the predictors again")
            for name, value in part.items():
                check_finite(f"{pred_dir / layer_file(l)}: {kind}.{name}", value)
            by_kind[kind] = LowRankPredictor.from_tensors(part, pm.get("hidden_activation", "none"),
                                                          where=f"{pred_dir / layer_file(l)}: {kind}").float()
        layers.append(LayerPredictors(by_kind["mlp"], by_kind["attn"]))
        present.append(l)
    if not present:
        raise DejavuError(f"{pred_dir} lists no trained layer files ({layer_file(0)}, ...)")
    return PredictorSet(layers, pm.get("mlp_pairing", "current"), pm.get("head_pairing", "lookahead")), present


def trainable(predictors: PredictorSet, densities: tuple[float, float]) -> list[torch.nn.Parameter]:
    """The parameters tuned: every MLP predictor when the MLP is sparse, every head predictor when heads are."""
    params = []
    for lp in predictors.layers:
        for pred, density in ((lp.mlp, densities[0]), (lp.attn, densities[1])):
            if pred is not None and density < 1.0:
                params.extend(pred.parameters())
    return params


def learnable_compensation(predictors: PredictorSet, adapter, rank: int, device):
    """An MLP compensation to tune (runtime/compensation.py), zero at the start: b and the bias are zero and a
    random (a and b both zero would get no gradient), so tuning begins from the predictors alone."""
    from dejavu.runtime.compensation import Compensation

    d = adapter.shape().hidden_size
    generator = torch.Generator().manual_seed(0)
    layers = []
    for lp in predictors.layers:
        if lp.mlp is None:
            layers.append(None)
            continue
        a = torch.randn(rank, d, generator=generator) / d**0.5  # a x of order 1, as LoRA starts its A
        layers.append(tuple(torch.nn.Parameter(t.to(device)) for t in (a, torch.zeros(d, rank), torch.zeros(d))))
    return Compensation(layers)


def calibration_sequences(cfg: RunConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(training sequences, held-out sequences) of data.seq_len tokens from data.dataset, seeded-shuffled;
    the held-out ones are the last `tune.eval_sequences` and never trained on."""
    from dejavu.corpus import fixed_length_sequences, load_texts, tokenize_stream

    texts = load_texts(cfg.data.dataset, split=cfg.data.split, text_field=cfg.data.text_field)
    stream = tokenize_stream(texts, tokenizer, f"calibration corpus {cfg.data.dataset}")
    seqs = fixed_length_sequences(stream, cfg.data.seq_len, None, cfg.data.seed)
    held = cfg.tune.eval_sequences
    if seqs.shape[0] <= held:
        raise DejavuError(f"{cfg.data.dataset} holds {seqs.shape[0]} sequences of {cfg.data.seq_len} tokens; tuning needs "
                          f"more than tune.eval_sequences ({held}) so some are left to train on")
    return seqs[:-held], seqs[-held:]


def _batch(train: torch.Tensor, step: int, per_step: int) -> torch.Tensor:
    """The sequences of one step: consecutive in the shuffled order, wrapping around (a pure function of
    the step, so a resumed run reads what an uninterrupted one would)."""
    n = train.shape[0]
    return train[[(step * per_step + i) % n for i in range(per_step)]]


def _kl_and_logits(model, runtime, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        runtime.enabled = False
        dense = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
        runtime.enabled = True
    sparse = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
    kl = (dense.exp() * (dense - sparse)).sum(-1).mean()
    return kl, dense, sparse


@torch.no_grad()
def held_out_quality(model, runtime, held: torch.Tensor, device, desc: str, world: tuple[int, int] = (0, 1)) -> dict:
    """Perplexity (dense and sparse), top-1 agreement and KL over the held-out calibration sequences; with
    several processes (world: this one's index, their number) each measures its share and the sums are
    combined, so every process gets the same figures."""
    from dejavu.runtime.quality import Totals

    index, processes = world
    totals = Totals()
    for seq in tqdm(held[index::processes], desc=desc, unit="seq", leave=False, disable=index != 0):
        ids = seq[None].to(device)
        _, dense, sparse = _kl_and_logits(model, runtime, ids)
        totals.add(dense[0, :-1], sparse[0, :-1], ids[0, 1:])
    if processes > 1:
        import torch.distributed as dist

        names = ("tokens", "dense_nll", "sparse_nll", "agree", "kl")
        sums = torch.tensor([float(getattr(totals, n)) for n in names], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        for name, value in zip(names, sums.tolist(), strict=True):
            setattr(totals, name, int(round(value)) if name in ("tokens", "agree") else value)
    report = totals.report()
    return {key: report[key] for key in ("dense_ppl", "sparse_ppl", "top1_agreement", "kl", "scored_tokens")}


def _save_checkpoint(out: Path, step: int, inputs: dict, params: list[torch.nn.Parameter], opt: torch.optim.Adam,
                     before: dict, best: _Best, history: list[dict], tokens: str) -> None:
    """Parameters, Adam's state, the best held-out state so far and the step in one file (renamed into place):
    a kill leaves the old checkpoint or the new one, never parts of both."""
    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        state = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq", "step"):
            if name in state:
                tensors[f"adam.{i}.{name}"] = torch.as_tensor(state[name]).detach().cpu().float().reshape(-1).contiguous() \
                    if name == "step" else state[name].detach().cpu().contiguous()
    if best.step != step:  # else the parameters above are the best ones
        tensors.update({f"best.{i}": value.contiguous() for i, value in enumerate(best.params)})
    save_tensors(out / CHECKPOINT, tensors, metadata={
        "format": "dejavu.tune-checkpoint", "step": str(step), "key": _tuned_key(inputs),
        "inputs": json.dumps(inputs, sort_keys=True), "before": json.dumps(before),
        "best": json.dumps({"step": best.step, "quality": best.quality}), "history": json.dumps(history),
        "tokens": tokens})


def _checkpoint_header(out: Path) -> dict | None:
    """A checkpoint's metadata (step, key, inputs, before), or None where there is none or it is unreadable."""
    from safetensors import SafetensorError, safe_open

    if not (out / CHECKPOINT).is_file():
        return None
    try:
        with safe_open(str(out / CHECKPOINT), framework="pt") as fh:
            meta = fh.metadata() or {}
        return {"step": int(meta["step"]), "key": meta["key"], "inputs": json.loads(meta["inputs"]),
                "before": json.loads(meta["before"]),
                # checkpoints of session 18 kept no best state; their key differs (no eval_every), so never resumed
                "best": json.loads(meta.get("best", "null")), "history": json.loads(meta.get("history", "[]")),
                "tokens": meta.get("tokens")}
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


def _check_checkpoint(out: Path, key: str, inputs: dict) -> None:
    header = _checkpoint_header(out)
    if header is None and (out / CHECKPOINT).is_file():
        print(f"note: {out / CHECKPOINT} is unreadable (cut short?); tuning starts from step 0", flush=True)
    if header is not None and header["key"] != key:
        raise DejavuError(f"{out} holds an unfinished tuning (step {header['step']}) with "
                          f"{inputs_difference(header['inputs'], inputs)}: pass --overwrite to start again")


class _Best:
    """The predictors with the lowest held-out KL measured so far (a CPU copy), the step they are from and their
    held-out quality. Step 0 is the trained predictors: a tuning that never beats them gives them back."""

    def __init__(self, step: int, quality: dict, params: list[torch.Tensor]):
        self.step, self.quality = step, quality
        self.params = [p.detach().cpu().clone() for p in params]

    def offer(self, step: int, quality: dict, params: list[torch.nn.Parameter]) -> None:
        if quality["kl"] < self.quality["kl"]:
            self.__init__(step, quality, params)


def _load_checkpoint(out: Path, key: str, params: list[torch.nn.Parameter], opt: torch.optim.Adam,
                     tokens: str, dataset: str) -> tuple[int, dict | None, _Best | None, list[dict]]:
    """A matching checkpoint's step, the held-out quality measured before tuning, the best state and the
    held-out history; (0, None, None, []) where there is none."""
    header = _checkpoint_header(out)
    if header is None or header["key"] != key:
        return 0, None, None, []
    if header["tokens"] and header["tokens"] != tokens:
        # the key names the corpus, not its text: resuming would mix two texts, and compare "before" on one with
        # "after" on the other
        raise DejavuError(f"{out / CHECKPOINT} was tuned on other tokens than {dataset} gives now (the file holds "
                          "other text, or the model another tokenizer); pass --overwrite to start again")
    tensors = load_tensors(out / CHECKPOINT)

    def saved(name: str, like: torch.Tensor) -> torch.Tensor:
        value = tensors.get(name)
        if value is None or value.shape != like.shape or not torch.isfinite(value).all():
            raise DejavuError(f"{out / CHECKPOINT} does not match these predictors; pass --overwrite to start again")
        return value

    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(saved(f"param.{i}", p))
            if f"adam.{i}.exp_avg" in tensors:
                opt.state[p] = {"step": tensors[f"adam.{i}.step"].reshape(()).clone(),
                                "exp_avg": tensors[f"adam.{i}.exp_avg"].to(p.device),
                                "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].to(p.device)}
    mark = header["best"]
    best_params = params if mark["step"] == header["step"] else [saved(f"best.{i}", p) for i, p in enumerate(params)]
    return header["step"], header["before"], _Best(mark["step"], mark["quality"], best_params), header["history"]


def _average_gradients(params: list[torch.nn.Parameter], kl: torch.Tensor, processes: int) -> torch.Tensor:
    """Every process's gradients (and its KL) averaged over the processes, in one all-reduce: each took an equal
    share of the step's sequences, so this is the gradient of the whole step's mean KL. Returns the mean KL,
    the same in every process (so a divergence stops all of them, not one that leaves the others waiting)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [kl.detach().reshape(1).to(grads[0].dtype)])
    dist.all_reduce(flat)
    flat /= processes
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()
    return flat[-1]


def _point(step: int, quality: dict) -> dict:
    return {"step": step, **{k: quality[k] for k in ("sparse_ppl", "kl", "top1_agreement")}}


def _finished(out: Path) -> dict | None:
    """RUN/tuned's manifest when a run finished there (files unchecked: `export` checks them), else None."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        return read_manifest(out, PREDICTORS_KIND, verify=False)
    except DejavuError:
        return None


def _diverged(step: int, what: str) -> None:
    raise DejavuError(f"tuning diverged at step {step + 1} ({what}); run again with a lower --lr and --overwrite")


def _tuned_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def tuned_status(run: Path) -> str | None:
    """"current" when RUN/tuned is finished and was tuned from the predictors RUN/predictors holds now, "stale"
    when from others, None when either is missing or unreadable (nothing can be told)."""
    tuned, pred_dir = run / "tuned", run / "predictors"
    if not (tuned / MANIFEST).is_file() or not (pred_dir / MANIFEST).is_file():
        return None
    try:
        tm = read_manifest(tuned, PREDICTORS_KIND, verify=False)
        pm = read_manifest(pred_dir, PREDICTORS_KIND, verify=False)
    except DejavuError:
        return None
    source = (tm.get("tuned") or {}).get("from") or {}
    if "predictors" in source:
        same = source["predictors"] == predictors_identity(pm)
    else:  # written before the identity was stored: the manifest it started from
        same = source.get("sha256") == manifest_hash(pm)
    return "current" if same else "stale"



def run_tune(run: Path, config_file: str | None = None, overrides: dict | None = None, overwrite: bool = False,
             model_name: str | None = None) -> dict | None:
    """Tune RUN/predictors/ end to end into RUN/tuned/; returns the new manifest (in the first process).

    Under torchrun or `accelerate launch` each process loads the model (one GPU each, or CPU over gloo),
    takes an equal share of every step's sequences and of the held-out ones, and the gradients are averaged:
    the same tuning as one process, its work shared. Only the first process writes; the others return None."""
    locks: list[WriterLock] = []
    try:
        return _tune(run, config_file, overrides, overwrite, model_name, locks)
    finally:  # an error or Ctrl-C too: the next run must not be told that this one still writes
        for lock in locks:
            lock.release()


def _tune(run: Path, config_file: str | None, overrides: dict | None, overwrite: bool, model_name: str | None,
          locks: list) -> dict | None:
    from accelerate import Accelerator, InitProcessGroupKwargs

    from dejavu.models.adapters import adapter_for
    from dejavu.models.identity import check_identity
    from dejavu.models.loading import dtype_name, load_model, resolve_device, resolve_dtype
    from dejavu.runtime.apply import SparseRuntime
    from dejavu.train.train import share_cpu_threads

    run = Path(run)
    pred_dir = run / "predictors"
    if not pred_dir.exists() and (run / MANIFEST).is_file():
        raise DejavuError(f"{run} is a stage directory; pass the run directory that holds predictors/ "
                          f"(--run {run.parent})")
    pm = read_manifest(pred_dir, PREDICTORS_KIND)
    cfg = resolve_tune_config(pm.get("config") or {}, config_file, overrides or {})
    densities = tune_densities(cfg, pm)
    cand = cfg.tune.mlp_candidate_density
    if cand is not None and cand < densities[0]:  # before anything (a finished tuning to replace) is touched
        raise DejavuError(f"--mlp-candidate-density {cand:g} is below the MLP density {densities[0]:g}: the "
                          "candidates must include the final set")
    if cfg.tune.mlp_compensation_rank and densities[0] >= 1.0:
        raise DejavuError("--mlp-compensation-rank corrects a sparse MLP: the MLP density tuned at is 1")
    if min(densities) >= 1.0:
        raise DejavuError(f"nothing to tune at MLP density {densities[0]:g} and head density {densities[1]:g}: "
                          "set --mlp-density or --head-density below 1")
    target = resolve_device(cfg.model.device)
    dtype = dtype_name(resolve_dtype(cfg.model.dtype, target))
    inputs = tuning_inputs(cfg, pm, densities, dtype)
    key = _tuned_key(inputs)
    identity = pm.get("model") or {}
    predictors, present = read_predictors(pred_dir, pm)
    t = cfg.tune

    # Accelerate only under a launcher: it fixes one device setting per Python process, so an Accelerator made
    # here on the CPU would refuse (or bend) a later train-predictors on the GPU in the same process.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # cpu=True joins a torchrun group over gloo
        acc = Accelerator(cpu=target.type == "cpu",
                          kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))])
        index, processes, main = acc.process_index, acc.num_processes, acc.is_main_process
        # not acc.wait_for_everyone: over gloo on a machine with GPUs its barrier picks cuda:<local rank>
        # ("invalid device ordinal" on one GPU); a collective on the tuning's own device works everywhere
        on = torch.device("cpu") if target.type == "cpu" else acc.device

        def barrier() -> None:
            import torch.distributed as dist

            dist.all_reduce(torch.zeros(1, device=on))
    else:
        acc, index, processes, main, barrier, on = None, 0, 1, True, lambda: None, None
    if t.sequences % processes:
        raise DejavuError(f"tune.sequences ({t.sequences}) must be a multiple of the number of processes "
                          f"({processes}): each takes an equal share of every step")
    device_name = str(acc.device) if acc is not None and target.type == "cuda" else cfg.model.device
    if processes > 1 and target.type == "cpu":
        share_cpu_threads(0, int(os.environ.get("LOCAL_WORLD_SIZE", processes)))

    # before the model loads: a finished tuning kept or refused, an unfinished one of other settings refused
    out = run / "tuned"
    check_can_write(out, "RUN/tuned")
    if not overwrite:
        finished = _finished(out)
        if finished is not None:
            done = finished.get("tuned") or {}
            if done.get("key") == key:
                if main:
                    (out / CHECKPOINT).unlink(missing_ok=True)  # left by a kill between the manifest and its removal
                    print(f"{out} is already tuned with these settings from these predictors: kept (--overwrite tunes "
                          "again)", flush=True)
                return finished if main else None
            raise DejavuError(f"{out} holds predictors tuned with {inputs_difference(done.get('inputs'), inputs)}: "
                              "pass --overwrite to replace them")
        _check_checkpoint(out, key, inputs)
    model, tokenizer, source = load_model(model_name or identity.get("name") or cfg.model.name, device=device_name,
                                          dtype=cfg.model.dtype, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    adapter = adapter_for(model)
    check_identity(identity, adapter, what=f"{pred_dir} (trained for {identity.get('name', '?')})")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    train_seqs, held = calibration_sequences(cfg, tokenizer)
    # only now, with the model and corpus known good, is anything of an earlier tuning removed
    barrier()  # every process has read the checkpoint it resumes from
    problem = None
    if main:  # (the other processes of a launch write nothing)
        try:
            locks.append(WriterLock(run / ".tuned.lock", str(out)))
            remove_stale_temps(out)
            if overwrite and out.exists():
                shutil.rmtree(out)
            (out / MANIFEST).unlink(missing_ok=True)  # an unreadable one: unfinished until this run writes it again
            (out / "progress").mkdir(parents=True, exist_ok=True)
        except (DejavuError, OSError) as exc:
            problem = exc
    stop_together(problem, on, str(out))

    predictors.with_densities(*densities)
    params = trainable(predictors, densities)
    compensation, groups = None, [{"params": list(params), "base_lr": t.lr}]
    if t.mlp_compensation_rank:
        compensation = learnable_compensation(predictors, adapter, t.mlp_compensation_rank, device)
        terms = [p for parts in compensation.layers if parts is not None for p in parts]
        params += terms
        groups.append({"params": terms, "base_lr": t.lr if t.mlp_compensation_lr is None else t.mlp_compensation_lr})
    two_stage = t.mlp_candidate_density is not None
    runtime = SparseRuntime(model, adapter, predictors, straight_through=t.sharpness,
                            mlp_score_thresholds="batch" if t.mlp_selection == "threshold" else None,
                            mlp_candidate_density=t.mlp_candidate_density,
                            mlp_down_thresholds="batch" if two_stage else None, mlp_compensation=compensation)
    opt = torch.optim.Adam([{**g, "lr": g["base_lr"]} for g in groups])
    # overwrite: what an earlier tuning left is gone (or being removed by the first process) and not read
    tokens = tokens_sha256(train_seqs, held)
    start, before, best, history = (0, None, None, []) if overwrite else _load_checkpoint(out, key, params, opt, tokens,
                                                                                        cfg.data.dataset)
    barrier()
    if main:
        every = f"every {t.eval_every} steps and " if 0 < t.eval_every < t.steps else ""
        print(f"tuning {t.steps} steps of {t.sequences} x {cfg.data.seq_len} tokens at lr {t.lr:g}, MLP density "
              f"{densities[0]:g}{' (score thresholds)' if t.mlp_selection == 'threshold' else ''}"
              f"{f' among candidates at {t.mlp_candidate_density:g}' if two_stage else ''}, head density "
              f"{densities[1]:g}, {dtype} on {device}"
              f"{f' over {processes} processes' if processes > 1 else ''}; {t.eval_sequences} held-out sequences "
              f"measured before, {every}after", flush=True)
    started = time.perf_counter()
    world = (index, processes)
    try:
        if before is None:
            before = held_out_quality(model, runtime, held, device, "held out, before", world)
            best, history = _Best(0, before, params), [_point(0, before)]
        if start and main:
            print(f"resuming from the checkpoint at step {start} of {t.steps}", flush=True)
        bar = tqdm(total=t.steps, initial=start, desc="tune", unit="step", disable=not main)
        for step in range(start, t.steps):
            for group in opt.param_groups:  # cosine decay to 5 %, a pure function of the step (resumable)
                group["lr"] = group["base_lr"] * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / t.steps)))
            ids = _batch(train_seqs, step, t.sequences)[index::processes].to(device)
            with torch.enable_grad():
                kl, _, _ = _kl_and_logits(model, runtime, ids)
                opt.zero_grad(set_to_none=True)
                kl.backward()
            if processes > 1:
                kl = _average_gradients(params, kl, processes)
            if not torch.isfinite(kl):
                _diverged(step, f"KL {kl.item()}")
            opt.step()
            bar.update()
            bar.set_postfix(kl=f"{kl.item():.3f}", best=f"{best.quality['kl']:.3f}@{best.step}")
            done = step + 1
            measure = done == t.steps or (t.eval_every > 0 and done % t.eval_every == 0)
            if measure:
                quality = held_out_quality(model, runtime, held, device, f"held out, step {done}", world)
                history.append(_point(done, quality))
                best.offer(done, quality, params)
            # the last step too: a failure in the final measurement or the writing loses no tuning
            if measure or done % t.checkpoint_every == 0:
                if not all(torch.isfinite(p).all() for p in params):
                    _diverged(step, "non-finite predictor weights")
                if main:
                    _save_checkpoint(out, done, inputs, params, opt, before, best, history, tokens)
        bar.close()
        if best.step != t.steps:  # longer tuning overfits or drifts (BENCHMARKS.md, session 19): the best kept
            with torch.no_grad():
                for p, value in zip(params, best.params, strict=True):
                    p.copy_(value)
    finally:
        runtime.remove()
    manifest = None
    if main:
        manifest = _write_tuned(out, pred_dir, pm, cfg, predictors, present, densities, compensation, {
            "key": key, "inputs": inputs, "dataset": cfg.data.dataset, "steps": t.steps,
            "tokens": t.steps * t.sequences * cfg.data.seq_len, "lr": t.lr, "sharpness": t.sharpness,
            "mlp_selection": t.mlp_selection, "mlp_candidate_density": t.mlp_candidate_density,
            "held_out_sequences": t.eval_sequences, "seconds_this_process": round(time.perf_counter() - started, 1),
            "processes": processes, "model": source.display, "device": str(device), "dtype": dtype,
            "before": before, "after": best.quality, "best_step": best.step, "final": history[-1], "history": history,
        })
    barrier()  # the others end once the tuning is written
    return manifest


def _write_tuned(out: Path, pred_dir: Path, pm: dict, cfg: RunConfig, predictors: PredictorSet, present: list[int],
                 densities: tuple[float, float], compensation, report: dict) -> dict:
    if report["best_step"] == 0:
        compensation = None  # the trained predictors come back as they were, with no (zero-initialised) term
    files = []
    (out / "layers").mkdir(parents=True, exist_ok=True)
    for l in present:  # noqa: E741
        lp = predictors.layers[l]
        tensors = {f"{kind}.{name}": value.detach().float().cpu().contiguous()
                   for kind, pred in (("mlp", lp.mlp), ("attn", lp.attn)) for name, value in pred.tensors().items()}
        if compensation is not None and compensation.layers[l] is not None:
            tensors.update({f"{COMPENSATION_KIND}.{name}": value.detach().float().cpu().contiguous()
                            for name, value in zip(COMPENSATION_PARTS, compensation.layers[l], strict=True)})
        for name, value in tensors.items():
            check_finite(f"tuned layer {l} {name}", value)
        path = out / layer_file(l)
        files.append(file_entry(path, out, save_tensors(path, tensors, metadata={"format": "dejavu.predictors",
                                                                                  "layer": str(l), "tuned": "1"})))
    tuned = {"from": {**parent_ref(pred_dir, pm), "predictors": predictors_identity(pm)}, "mlp_density": densities[0], "head_density": densities[1], **report}
    atomic_write_json(out / "metrics.json", {"trained": pm.get("metrics", {}), "tuned": tuned})
    files.append(file_entry(out / "metrics.json", out))
    # the trained manifest's fields (export reads them), its collect parent (so export's check that the
    # collect data is unchanged still applies), and what tuning did; densities: the ones tuned at
    fields = {k: v for k, v in pm.items() if k not in ("format", "format_version", "dejavu_version", "created",
                                                       "config", "parent", "files")}
    fields.update(mlp_density=densities[0], head_density=densities[1], tuned=tuned)
    # the layer files' learned MLP compensation (`mlp_compensation.a/b/bias`), which export carries into the bundle
    fields["mlp_compensation"] = {"rank": compensation.rank} if compensation is not None else None
    # the trained predictors' config (export's other defaults stay as they were), with the tune section that
    # ran and the densities tuned at as export's defaults
    config = {**(pm.get("config") or {}), "tune": cfg.to_dict()["tune"]}
    config["export"] = {**(config.get("export") or {}), "mlp_density": densities[0], "head_density": densities[1],
                        "mlp_density_per_layer": {}}
    manifest = write_manifest(out, PREDICTORS_KIND, config, files, parent=pm.get("parent"), **fields)
    (out / CHECKPOINT).unlink(missing_ok=True)
    b, a = report["before"], report["after"]
    tqdm.write(f"held-out calibration text ({b['scored_tokens']} tokens), MLP density {densities[0]:g}, head density "
               f"{densities[1]:g}: sparse perplexity {b['sparse_ppl']:.3f} -> {a['sparse_ppl']:.3f} (dense "
               f"{a['dense_ppl']:.3f}), KL {b['kl']:.4f} -> {a['kl']:.4f}, top-1 agreement {b['top1_agreement']:.3f} -> "
               f"{a['top1_agreement']:.3f}")
    best, steps, final = report["best_step"], report["steps"], report["final"]
    if best == 0:
        tqdm.write(f"warning: no held-out measurement beat the trained predictors (KL {b['kl']:.4f}; at step {steps} "
                   f"{final['kl']:.4f}), so {out} holds them unchanged: tune again with a lower --lr and --overwrite")
    elif best != steps:
        tqdm.write(f"kept the predictors of step {best}, the lowest held-out KL of the run (at step {steps}: "
                   f"{final['kl']:.4f}); fewer --steps or a lower --lr would likely do as well")
    if best and a["kl"] > 0.9 * b["kl"]:
        # measured on SmolLM2 (BENCHMARKS.md, session 19): the tunings that lowered the held-out KL yet made the
        # bench worse lowered it by 0.3, 3.4 and 8.1 %; every one that helped, by 15 % or more
        tqdm.write(f"note: the held-out KL fell by only {100 * (1 - a['kl'] / b['kl']):.1f} %; such tunings have made "
                   f"other text worse: compare this bundle with one of the trained predictors ({pred_dir}) on "
                   "`dejavu bench` before using it")
    tqdm.write(f"tuned predictors: {out} (export them with `dejavu export --run {out} --out BUNDLE`)")
    return manifest
