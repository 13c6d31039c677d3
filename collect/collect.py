"""`dejavu collect`: corpus -> fixed-length sequences -> dense forward with hooks -> shards + manifest.

Layout and keys follow docs/FORMATS.md (`RUN/collect/`, format `dejavu.collect` version 1).

Robustness comes from a fixed plan: the sequences, their split, rank and shard are all decided
before the first forward pass, and a shard's content depends only on its own sequences. So a run
killed at any point and started again skips the shards already on disk (written atomically) and
ends with byte-identical files, and N processes each write their own shards of one plan.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dejavu.artifacts import (
    MANIFEST,
    WriterLock,
    atomic_write_json,
    check_can_write,
    existing_ancestor,
    remove_stale_temps,
    save_tensors,
    sha256_file,
    stage_around,
    stop_together,
    tokens_sha256,
    write_manifest,
)
from dejavu.collect import labels as L
from dejavu.collect.hooks import BLOCK_INPUT, HEAD_OUT, MLP_ACT, ActivationRecorder
from dejavu.config import RunConfig
from dejavu.corpus import absolute_spec
from dejavu.errors import DejavuError
from dejavu.fp8 import quantize_rows
from dejavu.models.identity import identity_difference

FORMAT = "dejavu.collect"
STAGE_DIR = "collect"
SHARD_DIR = "shards"
RUN_STATE = "run.json"  # the config a started collection runs with; resume refuses any other
SHARD_HASHES = "shard-hashes-r{rank:02d}.json"  # sha256 of each shard as written, checked on resume
DOWN_WEIGHTS = "down_proj.safetensors"  # with collect.record_down_input: every layer's down projection
DOWN_WEIGHTS_FORMAT = "dejavu.collect.down_proj"
# Concentration statistics use every STATS_EVERY-th position of each sequence: a sort per token is
# as costly as the MLP itself, and a mean over thousands of sampled tokens is just as informative.
STATS_EVERY = 16
# Config sections whose values change what is collected; other sections may differ on resume.
STATE_SECTIONS = ("model", "data", "collect")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --- the plan -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSpec:
    split: str
    rank: int
    index: int
    sequences: torch.Tensor  # [m, seq_len] token ids

    @property
    def name(self) -> str:
        return f"{self.split}-r{self.rank:02d}-{self.index:05d}.safetensors"

    @property
    def path(self) -> str:
        return f"{SHARD_DIR}/{self.name}"

    @property
    def tokens(self) -> int:
        return self.sequences.numel()


@dataclass
class Plan:
    seq_len: int
    train: torch.Tensor  # [n_train, seq_len]
    eval: torch.Tensor  # [n_eval, seq_len]
    world_size: int
    seqs_per_shard: int
    shards: list[ShardSpec] = field(default_factory=list)  # every rank's, manifest order

    def for_rank(self, rank: int) -> list[ShardSpec]:
        return [s for s in self.shards if s.rank == rank]


def split_eval(sequences: torch.Tensor, eval_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The last whole sequences holding `eval_tokens` form the eval split; at most half the run."""
    n, seq_len = sequences.shape
    wanted = -(-eval_tokens // seq_len) if eval_tokens > 0 else 0
    n_eval = min(wanted, n // 2)
    return sequences[: n - n_eval], sequences[n - n_eval:], wanted


def check_budget(max_tokens: int, seq_len: int, eval_tokens: int) -> int:
    """The tokens a run collects (the budget in whole sequences, rounded up); refuses one without both splits."""
    # train-predictors needs train shards to fit on and eval shards to measure on; without this check
    # the gap shows only after the whole collection has run.
    if eval_tokens <= 0:
        raise DejavuError(f"collect.eval_tokens must be positive, got {eval_tokens}: train-predictors measures "
                          "its predictors on the eval split")
    n = -(-max_tokens // seq_len)
    if n < 2:
        raise DejavuError(f"--max-tokens {max_tokens} is {n} sequence of --seq-len {seq_len}; collect needs at least 2 "
                          f"(one to train on, one for collect.eval_tokens): use --max-tokens {2 * seq_len} or more, "
                          "or a shorter --seq-len")
    return n * seq_len


def make_plan(sequences: torch.Tensor, eval_tokens: int, shard_tokens: int, world_size: int) -> Plan:
    seq_len = sequences.shape[1]
    train, evals, _ = split_eval(sequences, eval_tokens)
    per_shard = max(1, shard_tokens // seq_len)
    plan = Plan(seq_len, train, evals, world_size, per_shard)
    for split, seqs in (("train", train), ("eval", evals)):
        for rank in range(world_size):
            mine = seqs[rank::world_size]  # round-robin, so every rank gets a fair share of each split
            for index, start in enumerate(range(0, mine.shape[0], per_shard)):
                plan.shards.append(ShardSpec(split, rank, index, mine[start:start + per_shard]))
    return plan


# --- per-batch recording --------------------------------------------------------------------------
class BatchRecord:
    """Hook sink for one forward pass: keeps only compact per-layer results, on the CPU."""

    def __init__(self, num_layers: int, num_heads: int, rule: str, densities: list[float],
                 input_dtype: torch.dtype, keep_act: bool, stats_rows: torch.Tensor, keep_down: bool = False):
        self.num_heads = num_heads
        self.rule = rule
        self.densities = densities
        self.input_dtype = input_dtype
        self.keep_act = keep_act
        self.keep_down = keep_down
        self.stats_rows = stats_rows
        self.inputs: list[torch.Tensor | None] = [None] * num_layers
        self.labels: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
        self.norms: list[torch.Tensor | None] = [None] * num_layers
        self.acts: list[torch.Tensor | None] = [None] * num_layers
        self.downs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        # per layer: sum over sampled tokens of the fraction needed for each mass level
        self.mlp_mass = torch.zeros(num_layers, len(L.MASS_LEVELS), dtype=torch.float64)
        self.attn_mass = torch.zeros(num_layers, len(L.MASS_LEVELS), dtype=torch.float64)

    def __call__(self, layer: int, point: str, x: torch.Tensor) -> None:
        if point == BLOCK_INPUT:
            self.inputs[layer] = x.to(device="cpu", dtype=self.input_dtype, copy=True)
        elif point == MLP_ACT:
            self.labels[layer] = {k: v.cpu() for k, v in L.mlp_labels(x, self.rule, self.densities).items()}
            magnitude = x.abs()
            if self.keep_act:
                self.acts[layer] = magnitude.to(device="cpu", dtype=torch.float16)
            if self.keep_down:
                q, scale = quantize_rows(x)
                self.downs[layer] = (q.cpu(), scale.cpu())
            rows = self.stats_rows.to(x.device)
            self.mlp_mass[layer] += L.frac_for_mass(magnitude[rows]).sum(0).double().cpu()
        elif point == HEAD_OUT:
            norms = L.head_norms(x, self.num_heads)
            self.norms[layer] = norms.to(device="cpu", dtype=torch.float16)
            rows = self.stats_rows.to(x.device)
            self.attn_mass[layer] += L.frac_for_mass(norms[rows]).sum(0).double().cpu()


def stats_rows(batch: int, seq_len: int) -> torch.Tensor:
    """Flattened row indices of the positions sampled for statistics (same for every batch layout)."""
    positions = torch.arange(0, seq_len, STATS_EVERY)
    return (torch.arange(batch)[:, None] * seq_len + positions[None, :]).reshape(-1)


@torch.inference_mode()
def record_shard(model, adapter, spec: ShardSpec, batch_size: int, rule: str, densities: list[float],
                 input_dtype: torch.dtype, on_batch=None, keep_down: bool = False
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Forward a shard's sequences batch by batch; returns its tensors and its statistics."""
    num_layers = adapter.num_layers
    num_heads = adapter.shape().num_heads
    keep_act = spec.split == "eval"
    device = next(model.parameters()).device
    # The decoder stack only: logits are never needed, and the LM head is a fifth of the FLOPs.
    body = model.base_model
    records: list[BatchRecord] = []
    for start in range(0, spec.sequences.shape[0], batch_size):
        batch = spec.sequences[start:start + batch_size]
        record = BatchRecord(num_layers, num_heads, rule, densities, input_dtype, keep_act,
                             stats_rows(batch.shape[0], batch.shape[1]), keep_down)
        with ActivationRecorder(adapter, record):
            body(input_ids=batch.to(device), use_cache=False)
        records.append(record)
        if on_batch is not None:
            on_batch(batch.numel())
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(num_layers):
        tensors[f"input.{layer}"] = torch.cat([r.inputs[layer] for r in records])
        for tag in records[0].labels[layer]:
            tensors[f"mlp_labels.{layer}@{tag}"] = torch.cat([r.labels[layer][tag] for r in records])
        tensors[f"head_norms.{layer}"] = torch.cat([r.norms[layer] for r in records])
        if keep_act:
            tensors[f"mlp_act.{layer}"] = torch.cat([r.acts[layer] for r in records])
        if keep_down:
            tensors[f"mlp_down_input.{layer}"] = torch.cat([r.downs[layer][0] for r in records])
            tensors[f"mlp_down_scale.{layer}"] = torch.cat([r.downs[layer][1] for r in records])
    count = sum(int(r.stats_rows.numel()) for r in records)
    stats = {
        "count": count,
        "mlp": sum(r.mlp_mass for r in records).tolist(),
        "attn": sum(r.attn_mass for r in records).tolist(),
    }
    return tensors, stats


# --- shards on disk ---------------------------------------------------------------------------
def shard_info(spec: ShardSpec, stats: dict[str, Any]) -> dict[str, str]:
    # One metadata key holding sorted JSON: the header bytes then never depend on map ordering.
    info = {"format": FORMAT, "split": spec.split, "rank": spec.rank, "index": spec.index,
            "tokens": spec.tokens, "stats": stats}
    return {"dejavu": json.dumps(info, sort_keys=True)}


def read_shard_info(path: Path) -> dict[str, Any] | None:
    """The metadata of a finished shard, or None when the file is missing or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            return json.loads((fh.metadata() or {})["dejavu"])
    except Exception:  # a damaged file is simply redone
        return None


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    return save_tensors(path, tensors, metadata=metadata)


def _read_hashes(path: Path) -> dict[str, str]:
    """The sha256 of each shard this rank wrote ({} before the first, or if the record is unreadable: the
    shards are then kept on their headers alone, as before the record existed)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}


# --- sizes and the disk check ---------------------------------------------------------------------
def bytes_per_token(shape, num_layers: int, n_tags: int, input_dtype: torch.dtype, eval_split: bool,
                    keep_down: bool = False) -> int:
    per_layer = (shape.hidden_size * input_dtype.itemsize + n_tags * math.ceil(shape.intermediate_size / 8)
                 + shape.num_heads * 2 + (shape.intermediate_size * 2 if eval_split else 0)
                 + (shape.intermediate_size + 4 if keep_down else 0))
    return per_layer * num_layers


def estimate_bytes(plan: Plan, shape, num_layers: int, n_tags: int, input_dtype: torch.dtype,
                   keep_down: bool = False) -> int:
    header = 4096 + 160 * num_layers * (5 + n_tags)  # safetensors JSON header per shard, generous
    total = 0
    for spec in plan.shards:
        total += spec.tokens * bytes_per_token(shape, num_layers, n_tags, input_dtype, spec.split == "eval",
                                               keep_down) + header
    if keep_down:  # the copy of every down projection
        total += num_layers * shape.hidden_size * shape.intermediate_size * input_dtype.itemsize
    return total


def write_down_weights(path: Path, adapter, dtype: torch.dtype) -> str:
    """Each layer's down projection [hidden, intermediate] (`down.{layer}`), in the stored inputs' dtype:
    what the output-error loss maps a dropped neuron's activation through. Returns the file's sha256."""
    tensors = {f"down.{i}": adapter.mlp_weights(layer).down.detach().to(device="cpu", dtype=dtype)
               for i, layer in enumerate(adapter.decoder_layers())}
    return save_tensors(path, tensors, metadata={"format": DOWN_WEIGHTS_FORMAT})


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DejavuError(f"--out {out} exists and is not a directory")
    stage = out / STAGE_DIR
    around = stage_around(stage)  # out itself or a folder above it
    if around is not None:
        raise DejavuError(f"--out {out} is inside a dejavu artifact ({around[0]}, a {around[1]} directory): give "
                          "a run directory of its own (collect writes RUN/collect/)")
    check_can_write(stage if stage.is_dir() else out, "--out")


def check_disk(stage: Path, needed: int) -> int:
    free = shutil.disk_usage(existing_ancestor(stage)).free
    if needed > free:
        raise DejavuError(
            f"not enough disk for the collection: about {human_bytes(needed)} needed, {human_bytes(free)} free "
            f"under {existing_ancestor(stage)}; lower --max-tokens or choose another --out"
        )
    return free


# --- resume state -------------------------------------------------------------------------------
def run_state(cfg: RunConfig, world_size: int, identity: dict[str, Any], tokens: str | None = None) -> dict[str, Any]:
    # The model's identity and the tokens' hash, not only their names: a directory or hub id can hold other
    # weights, and a corpus file other text or the model another tokenizer, by the time a collection is
    # resumed, and its shards would then mix two of them.
    full = cfg.to_dict()
    state = {"format": FORMAT, "config": {k: full[k] for k in STATE_SECTIONS}, "world_size": world_size,
             "model": identity}
    if tokens is not None:
        state["tokens_sha256"] = tokens
    return state


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def state_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _same_local_path(a: Any, b: Any) -> bool:
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _manifest_of_another_kind(path: Path) -> bool:
    """Whether `path` reads as some manifest (a JSON object naming a format), not a damaged one of ours."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and "format" in value


def inspect_stage(stage: Path, state: dict[str, Any], overwrite: bool) -> str:
    """'fresh', 'resume' or 'complete'; raises when a different collection is in the way."""
    if overwrite or not stage.exists():
        return "fresh"
    state_path = stage / RUN_STATE
    if not state_path.is_file():
        if any(stage.iterdir()):
            raise DejavuError(f"{stage} exists but holds no dejavu collection; remove it or add --overwrite")
        return "fresh"
    try:
        old = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DejavuError(f"{state_path} is unreadable; add --overwrite to start the collection again") from None
    if not isinstance(old, dict) or not isinstance(old.get("config") or {}, dict) \
            or not isinstance(old.get("model") or {}, dict):
        raise DejavuError(f"{state_path} is not a dejavu collection's state (edited?); add --overwrite to start the "
                          "collection again")
    old_config = json.loads(json.dumps(old.get("config") or {}))
    if isinstance(old_config.get("collect"), dict):
        # started before collect could keep the MLP's down inputs: it kept none
        old_config["collect"].setdefault("record_down_input", False)
    diffs = state_differences({"config": old_config, "world_size": old.get("world_size")},
                              {k: state[k] for k in ("config", "world_size")})
    # the same local corpus or model named from another directory (../x.txt vs /abs/x.txt) is the same one
    diffs = [d for d in diffs if not any(
        d.startswith(f"config.{section}.{key}:")
        and _same_local_path(((old.get("config") or {}).get(section) or {}).get(key), state["config"][section][key])
        for section, key in (("data", "dataset"), ("model", "name")))]
    other_model = identity_difference(old["model"], state["model"]) if old.get("model") else None
    if other_model:
        raise DejavuError(f"{stage} holds a collection made for {other_model}; "
                          "add --overwrite to discard it, or use another --out")
    if diffs:
        shown = "; ".join(d.replace("config.", "", 1) for d in diffs[:6])
        more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
        finished = (stage / MANIFEST).is_file()
        hint = ""
        if diffs == ["config.collect.record_down_input: False -> True"]:
            hint = ("; it kept no MLP down inputs: --no-down-inputs " + ("uses it as it is" if finished else "resumes it")
                    + " (train-predictors then trains with BCE alone)")
        raise DejavuError(
            f"{stage} holds a {'finished' if finished else 'partial'} collection made with other settings "
            f"({shown}{more}); " + ("add --overwrite to discard it, or use another --out" if finished else
                                    "rerun with the same settings to resume it, or add --overwrite to discard it")
            + hint
        )
    finished = (stage / MANIFEST).is_file()
    if old.get("tokens_sha256") and state.get("tokens_sha256") and old["tokens_sha256"] != state["tokens_sha256"]:
        other = (f"the corpus {state['config']['data']['dataset']} holds other text, or the model another tokenizer, "
                 "than when it was collected")
        if finished:  # nothing would mix: kept, as a finished run is, with a word
            print(f"note: {stage} was collected from other tokens than these settings give now ({other}); kept as it "
                  "is (add --overwrite to collect again)", flush=True)
        else:
            raise DejavuError(f"{stage} holds a partial collection of other tokens than these settings give now: "
                              f"{other}; add --overwrite to discard it, or use another --out")
    return "complete" if finished else "resume"


# --- manifest and report ----------------------------------------------------------------------
def merge_stats(infos: list[dict[str, Any]], num_layers: int) -> tuple[dict[str, Any], int]:
    count = sum(i["stats"]["count"] for i in infos)
    mlp = torch.zeros(num_layers, len(L.MASS_LEVELS), dtype=torch.float64)
    attn = torch.zeros_like(mlp)
    for info in infos:
        mlp += torch.tensor(info["stats"]["mlp"], dtype=torch.float64)
        attn += torch.tensor(info["stats"]["attn"], dtype=torch.float64)
    mlp /= max(count, 1)
    attn /= max(count, 1)
    levels = [format(q, "g") for q in L.MASS_LEVELS]
    stats = {
        str(layer): {
            "mlp": {"frac_for_mass": {q: round(float(mlp[layer, j]), 6) for j, q in enumerate(levels)}},
            "attn": {"frac_for_mass": {q: round(float(attn[layer, j]), 6) for j, q in enumerate(levels)}},
        }
        for layer in range(num_layers)
    }
    return stats, count


def concentration_table(stats: dict[str, Any]) -> str:
    """A short text table: per layer, the fraction of neurons / heads holding 90/95/99 % of |act| mass."""
    levels = [format(q, "g") for q in L.MASS_LEVELS]
    head = "layer | MLP neurons for " + "/".join(f"{float(q):.0%}" for q in levels) + " of mass | heads for same"
    lines = [head, "-" * len(head)]
    rows = [(k, stats[k]) for k in sorted(stats, key=int)]
    for layer, row in rows + [("mean", None)]:
        if row is None:
            row = {kind: {"frac_for_mass": {q: sum(r[kind]["frac_for_mass"][q] for _, r in rows) / len(rows)
                                            for q in levels}} for kind in ("mlp", "attn")}
        mlp = " ".join(f"{row['mlp']['frac_for_mass'][q]:.2f}" for q in levels)
        attn = " ".join(f"{row['attn']['frac_for_mass'][q]:.2f}" for q in levels)
        lines.append(f"{layer:>5} | {mlp:<36} | {attn}")
    return "\n".join(lines)


def build_manifest(stage: Path, plan: Plan, cfg: RunConfig, identity: dict, rule: str, tags: list[str],
                   world: int, down_weights: str | None = None) -> dict:
    """down_weights: the sha256 of DOWN_WEIGHTS, written when down inputs were kept."""
    shards, files, infos = [], [], []
    # each shard's hash as its rank wrote it (kept shards were checked against it on resume), so the
    # shards are not read a second time; hashed here only where no record exists
    recorded: dict[str, str] = {}
    for r in range(world):
        recorded.update(_read_hashes(stage / SHARD_HASHES.format(rank=r)))
    for spec in plan.shards:
        path = stage / spec.path
        info = read_shard_info(path)
        if info is None or info["tokens"] != spec.tokens:
            raise DejavuError(f"shard {path} is missing or damaged; run the same command again to redo it")
        digest = recorded.get(spec.path) or sha256_file(path)
        size = path.stat().st_size
        files.append({"path": spec.path, "bytes": size, "sha256": digest})
        shards.append({"path": spec.path, "split": spec.split, "rank": spec.rank, "index": spec.index,
                       "tokens": spec.tokens, "bytes": size, "sha256": digest})
        infos.append(info)
    if down_weights is not None:
        path = stage / DOWN_WEIGHTS
        files.append({"path": DOWN_WEIGHTS, "bytes": path.stat().st_size, "sha256": down_weights})
    stats, count = merge_stats(infos, identity["num_layers"])
    train_tokens = plan.train.numel()
    eval_tokens = plan.eval.numel()
    return write_manifest(
        stage, FORMAT, cfg.to_dict(), files, parent=None,
        model=identity,
        tokens=train_tokens + eval_tokens, train_tokens=train_tokens, eval_tokens=eval_tokens,
        seq_len=plan.seq_len, world_size=plan.world_size,
        mlp_label_rule=rule, mlp_label_tags=tags, input_dtype=cfg.collect.input_dtype,
        down_inputs=down_weights is not None, down_weights=DOWN_WEIGHTS if down_weights is not None else None,
        shards=shards, stats=stats, stats_tokens=count, stats_every=STATS_EVERY,
    )


# --- the stage ---------------------------------------------------------------------------------
def _distributed_state(cpu: bool):
    """(rank, world_size, barrier, state) under torchrun/accelerate launch; (0, 1, no-op, None) otherwise."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, (lambda: None), None
    from accelerate import PartialState

    # cpu=True makes accelerate use gloo; without it, it only goes multi-process on accelerators.
    state = PartialState(cpu=cpu)
    return state.process_index, state.num_processes, state.wait_for_everyone, state


def run_collect(cfg: RunConfig, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Collect block inputs, MLP labels and head norms into `out/collect/`; returns the manifest."""
    locks: list[WriterLock] = []
    try:
        return _collect(cfg, out, overwrite, locks)
    finally:  # an error or Ctrl-C too: the next run into `out` must not be told that this one still writes
        for lock in locks:
            lock.release()


def _collect(cfg: RunConfig, out: Path, overwrite: bool, locks: list) -> dict[str, Any]:
    from dejavu.corpus import fixed_length_sequences, load_texts, tokenize_stream
    from dejavu.models.adapters import adapter_for
    from dejavu.models.identity import model_identity
    from dejavu.models.loading import load_model, resolve_device, resolve_model
    from dejavu.runtime.quality import model_context

    out = Path(out)
    stage = out / STAGE_DIR
    # a local corpus or model by its absolute path: later stages read them from the config stored here, from
    # whatever directory they run in
    cfg = copy.deepcopy(cfg)
    if isinstance(cfg.data.dataset, str):
        cfg.data.dataset = absolute_spec(cfg.data.dataset)
    if isinstance(cfg.model.name, str) and Path(cfg.model.name).expanduser().exists():
        cfg.model.name = str(Path(cfg.model.name).expanduser().resolve())
    cc = cfg.collect
    if cc.input_dtype not in DTYPES:
        raise DejavuError(f"collect.input_dtype must be one of {', '.join(DTYPES)}; got {cc.input_dtype!r}")
    if cc.shard_tokens <= 0 or cc.batch_size <= 0:
        raise DejavuError(f"collect.shard_tokens and collect.batch_size (--batch-size) must be positive, got "
                          f"{cc.shard_tokens} and {cc.batch_size}")
    budget = check_budget(cc.max_tokens, cfg.data.seq_len, cc.eval_tokens)
    rank, world, barrier, dist = _distributed_state(resolve_device(cfg.model.device).type == "cpu")
    main = rank == 0
    say = print if main else (lambda *a, **k: None)

    # Everything that can fail on bad input is checked before anything under `out` changes.
    check_writable(out)
    resolve_model(cfg.model.name)
    texts = load_texts(cfg.data.dataset, cfg.data.split, cfg.data.text_field)
    if not texts:
        raise DejavuError(f"the corpus {cfg.data.dataset} is empty")
    device = cfg.model.device
    if dist is not None and dist.device.type == "cuda" and device in ("auto", "cuda"):
        device = str(dist.device)  # one GPU per process
    model, tokenizer, source = load_model(cfg.model.name, device, cfg.model.dtype, cfg.model.revision,
                                          cfg.model.trust_remote_code)
    adapter = adapter_for(model)
    if cfg.data.seq_len > model_context(model):
        # learned position tables (OPT, GPT-2) have no row past it, and rotary positions past the trained
        # range give activations no real input would: refused before anything is written
        raise DejavuError(f"--seq-len {cfg.data.seq_len} is longer than {source.display}'s context of "
                          f"{model_context(model)} positions: use --seq-len {model_context(model)} or less")
    stream = tokenize_stream(texts, tokenizer, f"calibration corpus {cfg.data.dataset}")
    sequences = fixed_length_sequences(stream, cfg.data.seq_len, cc.max_tokens, cfg.data.seed)
    plan = make_plan(sequences, cc.eval_tokens, cc.shard_tokens, world)
    rule = L.resolve_label_rule(cc.mlp_label_rule, adapter.gated, adapter.activation_name())
    tags = L.label_tags(rule, cc.mlp_label_densities)
    input_dtype = DTYPES[cc.input_dtype]
    shape = adapter.shape()
    identity = model_identity(adapter, source.display)
    state = run_state(cfg, world, identity, tokens_sha256(sequences))
    mode = inspect_stage(stage, state, overwrite)
    repair, manifest_hashes = False, {}
    if mode == "complete":
        from dejavu.artifacts import read_manifest, verify_files

        damage = None
        try:
            manifest = read_manifest(stage, FORMAT, verify=False)
        except DejavuError as exc:
            if _manifest_of_another_kind(stage / MANIFEST):  # another kind's or version's: not this run's to redo
                raise
            damage = exc
        else:
            try:
                verify_files(stage, manifest)
            except DejavuError as exc:
                damage = exc
                # its hashes judge the shards below too: a run whose hash records are gone (or that predates
                # them) would otherwise keep a shard whose data, not its header, is damaged
                for entry in manifest.get("shards") or []:
                    if isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry.get("sha256"):
                        manifest_hashes[entry["path"]] = entry["sha256"]
        if damage is not None:
            # a damaged or missing shard, or a damaged manifest: collected again below like a resumed run (each
            # shard checked against its hash record), the intact ones kept
            say(f"note: {damage}; collecting what is damaged again", flush=True)
            mode, repair = "resume", True
        else:
            say(f"{stage} is already complete ({manifest['tokens']:,} tokens); add --overwrite to collect again")
            say(concentration_table(manifest["stats"]))
            return manifest

    if budget != cc.max_tokens:
        say(f"note: --max-tokens {cc.max_tokens} rounded up to {budget:,} tokens, {budget // cfg.data.seq_len} "
            f"whole sequences of --seq-len {cfg.data.seq_len}")
    _, _, wanted_eval = split_eval(sequences, cc.eval_tokens)
    if plan.eval.shape[0] < wanted_eval:
        say(f"note: eval split cut to {plan.eval.numel():,} tokens (half the run) from collect.eval_tokens={cc.eval_tokens}")
    keep_down = cc.record_down_input
    estimate = estimate_bytes(plan, shape, adapter.num_layers, len(tags), input_dtype, keep_down)
    done_bytes = 0
    if mode == "resume":
        done_bytes = sum((stage / s.path).stat().st_size for s in plan.shards if (stage / s.path).is_file())
    free = check_disk(stage, max(0, estimate - done_bytes))
    say(f"collect: {source.display} ({adapter.family}, {adapter.num_layers} layers) on {sequences.numel():,} tokens "
        f"({plan.train.numel():,} train, {plan.eval.numel():,} eval) in {len(plan.shards)} shards; "
        f"labels {rule} {tags}; {world} process(es)")
    say(f"disk: about {human_bytes(estimate)} for {stage} ({human_bytes(free)} free)")

    problem, on = None, dist.device if dist is not None else None
    if main:  # (the run's other processes write their shards under rank 0's lock)
        try:
            out.mkdir(parents=True, exist_ok=True)
            locks.append(WriterLock(out / f".{STAGE_DIR}.lock", str(stage)))
            remove_stale_temps(stage)
        except (DejavuError, OSError) as exc:
            problem = exc
    stop_together(problem, on, str(stage))  # (and every rank has inspected the stage before rank 0 changes it)
    if main:
        try:
            if overwrite and stage.exists():
                shutil.rmtree(stage)
            (stage / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            if repair:  # unfinished until this run writes it again
                (stage / MANIFEST).unlink(missing_ok=True)
            if mode == "fresh" or not (stage / RUN_STATE).is_file():
                atomic_write_json(stage / RUN_STATE, state)
        except OSError as exc:
            problem = exc
    stop_together(problem, on, str(stage))

    mine = plan.for_rank(rank)  # (a killed write's temp files went with remove_stale_temps, under the lock)
    hashes_path = stage / SHARD_HASHES.format(rank=rank)
    hashes = _read_hashes(hashes_path)
    for spec in mine:  # (a repair: the damaged manifest's hashes where no record is)
        if spec.path in manifest_hashes:
            hashes.setdefault(spec.path, manifest_hashes[spec.path])
    missing = {s.path for s in mine if (read_shard_info(stage / s.path) or {}).get("tokens") != s.tokens}
    changed = [s.path for s in mine if s.path not in missing and s.path in hashes
               and sha256_file(stage / s.path) != hashes[s.path]]
    for path in changed:  # a kept shard whose bytes differ from those written would enter the manifest trusted
        say(f"note: {stage / path} changed on disk since it was written; collecting it again", flush=True)
    todo = [s for s in mine if s.path in missing or s.path in changed]
    for spec in todo:  # a kill after a redone shard lands but before its record must not look like a change
        hashes.pop(spec.path, None)
    if todo:
        atomic_write_json(hashes_path, hashes)
    from tqdm.auto import tqdm

    if mode == "resume" and len(todo) < len(mine):  # before the bar, so it gets its own line
        say(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards already on disk", flush=True)
    total = sum(s.tokens for s in mine)
    bar = tqdm(total=total, initial=total - sum(s.tokens for s in todo), unit="tok", unit_scale=True,
               desc="collect" if world == 1 else f"collect (rank 0 of {world})", disable=not main, dynamic_ncols=True)
    try:
        for spec in todo:
            tensors, stats = record_shard(model, adapter, spec, cc.batch_size, rule, cc.mlp_label_densities,
                                          input_dtype, on_batch=bar.update, keep_down=keep_down)
            hashes[spec.path] = write_shard(stage / spec.path, tensors, shard_info(spec, stats))
            atomic_write_json(hashes_path, hashes)
    finally:
        bar.close()

    barrier()
    manifest = None
    if main:
        for tmp in stage.glob(f".{DOWN_WEIGHTS}.*.tmp"):
            tmp.unlink(missing_ok=True)  # left by a killed write
        down = write_down_weights(stage / DOWN_WEIGHTS, adapter, input_dtype) if keep_down else None
        manifest = build_manifest(stage, plan, cfg, identity, rule, tags, world, down)
        size = sum(f["bytes"] for f in manifest["files"])
        say(f"wrote {stage}: {manifest['tokens']:,} tokens, {len(manifest['shards'])} shards, {human_bytes(size)}")
        say(concentration_table(manifest["stats"]))
    barrier()
    return manifest
