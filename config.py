"""The run's typed configuration: one object per run, saved into every manifest.

Precedence is flag > file > default. A YAML file has one mapping per section (`model`, `data`,
`collect`, `train`, `export`, `tune`, `runtime`); unknown sections or keys are rejected so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dejavu.errors import DejavuError

DEFAULT_CONFIG = "smollm2-135m"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class ModelConfig:
    # hub id, local directory, .gguf file, or an alias such as `smollm2-135m`
    name: str = "smollm2-135m"
    # float32 | bfloat16 | float16 | auto ("auto": bf16 on CUDA, fp32 on CPU)
    dtype: str = "auto"
    # cpu | cuda | auto
    device: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    # `datasets` hub id (`name` or `name:config`) or local .txt/.jsonl/.parquet file, directory or glob
    dataset: str = "../shared/data/wikitext-2/valid.txt"
    split: str = "train"
    # field holding the text in jsonl/parquet/hub datasets
    text_field: str = "text"
    seq_len: int = 512
    seed: int = 0


@dataclass
class CollectConfig:
    max_tokens: int = 65536
    batch_size: int = 8
    # tokens per shard file; a killed run resumes from the last complete shard
    shard_tokens: int = 4096
    # MLP neurons labelled active per token: "auto" (relu models: act > 0, others: top-k), "topk", "positive"
    mlp_label_rule: str = "auto"
    # top-k fractions stored as labels (bit-packed); train-predictors trains for one of them
    mlp_label_densities: list[float] = field(default_factory=lambda: [0.5])
    # dtype of stored block inputs (float16 | bfloat16 | float32)
    input_dtype: str = "float16"
    # the last tokens of the run also keep |activation| in fp16, so "mass kept" can be measured
    eval_tokens: int = 4096
    # also keep, per token, the MLP's down-projection input (row-scaled fp8: intermediate_size bytes a token
    # and layer) and a copy of each down projection, which train-predictors' "bce+output" loss (the MLP output
    # error a selection leaves) and its held-out output-error metric need; false: the smaller run of before
    record_down_input: bool = True


@dataclass
class TrainConfig:
    rank: int = 128
    # "none" (linear low-rank, Deja Vu) or "relu" between the two layers
    hidden_activation: str = "none"
    # "current": layer l from its own block input; "lookahead": from layer l-1's block input
    mlp_pairing: str = "current"
    head_pairing: str = "lookahead"
    mlp_density: float = 0.5
    head_density: float = 0.5
    # "bce" (class-weighted BCE on the top-k labels), "bce+rank" (adds a top-k margin term), "bce+output"
    # (adds the share of the MLP's output the predicted set leaves out; needs collect.record_down_input) or
    # "auto" (bce+output where the collect run has the down inputs, bce otherwise)
    loss: str = "auto"
    # bce+output: the weight of the output-error term next to BCE
    output_weight: float = 1.0
    epochs: int = 4
    batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    # restrict training to these layers (empty: all)
    layers: list[int] = field(default_factory=list)
    # CPU threads per process for loading and unpacking shards (and CPU training); 0: this machine's
    # cores shared evenly by its processes. Launchers set OMP_NUM_THREADS=1 per process, which starves
    # the shard loading that feeds each GPU. Does not change results, so it is not in the training key.
    cpu_threads: int = 0


@dataclass
class ExportConfig:
    mlp_density: float | None = None  # None: the density the predictors were trained for
    head_density: float | None = None
    # per-layer overrides, {layer_index: density}
    mlp_density_per_layer: dict[int, float] = field(default_factory=dict)
    # two-stage MLP selection (runtime/apply.py): predictor candidates at this density; None: off
    mlp_candidate_density: float | None = None
    # TEAL-style thresholds stored in the bundle (runtime/thresholds.py), calibrated at export on
    # `calibration_tokens` tokens of data.dataset: keep this share of the MLP input and the bundle's
    # mlp_density of down's input; attn_keep_input: attention's inputs too. None: no thresholds
    mlp_keep_input: float | None = None
    attn_keep_input: float | None = None
    # TEAL's whole-model rule with a searched split (runtime/allocation.py): thresholds on q/k/v's, o's,
    # gate/up's and down's inputs that keep this share of every layer's weight bytes, split between them
    # per layer by a greedy search on data.dataset. None: off. Replaces mlp_keep_input/attn_keep_input.
    keep_layer_bytes: float | None = None
    calibration_tokens: int = 8192
    # how the runtime picks each token's MLP neurons from the predictor's scores: "topk" (the same count for
    # every token) or "threshold" (neurons scored above a per-layer threshold, calibrated here on
    # `calibration_tokens` tokens of data.dataset to keep the MLP density on average; runtime/score_thresholds.py)
    mlp_selection: str = "topk"
    # a low-rank linear term per layer for what the sparse MLP leaves out (runtime/compensation.py), fitted here
    # by ridge regression on `calibration_tokens` tokens of data.dataset for the bundle's rule; 0: none
    mlp_compensation_rank: int = 0
    # MLP predictors made from the model's own gate and up weights at this many bits (4 or 8; quantized_predictor.py),
    # with no collect or training (`dejavu export --model M --out B --mlp-predictor-bits 4`), or beside a run's head
    # predictors (`--run RUN`). None: off
    mlp_predictor_bits: int | None = None
    # inputs sharing one fp16 scale in those copies
    mlp_predictor_group: int = 64


@dataclass
class TuneConfig:
    # `dejavu tune-predictors` (train/tune.py): all layers' predictors trained together on KL(dense || sparse)
    # of the next-token distribution. Optimizer steps, each over `sequences` sequences of data.seq_len tokens
    steps: int = 150
    sequences: int = 2
    # 5e-4: on SmolLM2 better than 2e-3 at rank 40 and rank 128 (where 2e-3 made the bench worse) and than 1e-3
    # (BENCHMARKS.md, session 19)
    lr: float = 5e-4
    # straight-through top-k: the gradient of sigmoid(sharpness * (score - the token's k-th largest score))
    sharpness: float = 2.0
    # sequences at the end of the shuffled corpus, never trained on, measured before, every eval_every steps and
    # after; the predictors of the lowest held-out KL are written (0: measured before and after only)
    eval_sequences: int = 8
    eval_every: int = 25
    # steps between checkpoints a killed run resumes from
    checkpoint_every: int = 25
    # densities to tune at; None: what `export` gives the bundle by default (export.*, else the trained ones)
    mlp_density: float | None = None
    head_density: float | None = None
    # the MLP selection tuned for: "topk", or "threshold" (each sequence keeps the neurons scored above the
    # quantile of its own scores that keeps the MLP density: export.mlp_selection threshold then applies it)
    mlp_selection: str = "topk"
    # with mlp_selection "threshold": tune two-stage score thresholds, the scores keeping this candidate density
    # and each sequence's |down input| quantile the MLP density (export.mlp_candidate_density then applies it);
    # None: one stage
    mlp_candidate_density: float | None = None
    # also learn an MLP compensation of this rank (runtime/compensation.py) with the predictors: per layer a
    # low-rank linear term for what the sparse MLP leaves out, starting at zero; export stores it. 0: none
    mlp_compensation_rank: int = 0
    # its learning rate (None: lr), cosine-decayed alike
    mlp_compensation_lr: float | None = None


@dataclass
class RuntimeConfig:
    device: str = "auto"
    dtype: str = "auto"
    mlp_density: float | None = None  # None: the bundle's
    head_density: float | None = None
    mlp_candidate_density: float | None = None  # None: the bundle's (None there too: one-stage)
    # exact-up MLP selection (runtime/apply.py): weight of the predictor logit next to log|up|; None: off
    mlp_up_weight: float | None = None
    # decode loop: k/v only for the KV groups the selected heads read, skipped positions filled when next
    # read (speed only: the output is unchanged)
    skip_kv: bool = False
    # TEAL-style MLP sparsity without a predictor: per-layer magnitude thresholds, calibrated on
    # `calibration_tokens` tokens of data.dataset, keep this share of the MLP's input (gate/up columns
    # read) and `mlp_density` (default 0.5) of down's input; None: off
    mlp_keep_input: float | None = None
    # with mlp_keep_input: the same for attention (TEAL's whole-model rule): thresholds keep this share
    # of q/k/v's input (columns read; every head computed) and of o's input (rows read); None: off
    attn_keep_input: float | None = None
    # as export.keep_layer_bytes: thresholds on every input of every layer, keeping this share of each
    # layer's weight bytes, the split searched per layer (greedy); None: off
    keep_layer_bytes: float | None = None
    calibration_tokens: int = 8192
    # MLP neurons from the predictor's scores: "topk", or "threshold" (as export.mlp_selection, calibrated at
    # start-up on data.dataset; `bench --synthetic` on 256 random tokens); None: the bundle's rule (a threshold
    # bundle's own thresholds at its densities, calibrated anew at others)
    mlp_selection: str | None = None
    # the bundle's MLP compensation (export.mlp_compensation_rank), where the rule run is the one it was fitted
    # for; False: left out (to measure what it adds)
    mlp_compensation: bool = True
    # "predictor" (the bundle), "oracle" (true top-k from dense activations), "dense"
    selection: str = "predictor"
    # dense prefill by default: only decoded tokens are sparse
    sparse_prefill: bool = False
    max_eval_tokens: int = 8192
    # split and text field of a hub (or jsonl/parquet) evaluation corpus; text field None: data.text_field
    eval_split: str = "test"
    eval_text_field: str | None = None
    eval_window: int = 2048
    eval_stride: int = 1024
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    decode_tokens: int = 64
    warmup: int = 5
    # speed: tokens of context prefilled before the timed decode (attention reads a cache this long and
    # growing; weights dominate a 7B step below ~1K tokens, the cache above)
    prompt_len: int = 16


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        cfg = cls()
        merge_into(cfg, _without_retired(data), source)
        return cfg


# keys earlier versions wrote into manifests and that no longer exist: dropped when a manifest's config is
# read, so runs made by those versions stay usable (a YAML file naming them is still refused)
RETIRED_KEYS = {"tune": ("seed",)}


def _without_retired(data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for section, keys in RETIRED_KEYS.items():
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
    return out


def _coerce(value: Any, current: Any, where: str, hint: str = "") -> Any:
    """Accept YAML/CLI values loosely but reject wrong kinds with a message naming the key. `hint` is the
    field's annotation, which says the kind of an optional key whose default is None."""
    if value is None:
        if current is None or "None" in hint:  # an optional key: null is its "not set"
            return value
        raise DejavuError(f"{where}: null is not a value for this key (it is {current!r} by default); give a "
                          "value or leave the key out")
    if current is None:  # optional: coerce as the annotation's kind ("float | None", "str | None")
        kinds = {"float": 0.0, "int": 0, "str": ""}
        current = kinds.get(hint.replace(" ", "").removesuffix("|None"))  # list/dict kinds: left as given
        if current is None:
            return value
    if isinstance(current, str):
        if isinstance(value, (list, dict, bool)):
            raise DejavuError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise DejavuError(f"{where}: expected true/false, got {value!r}")
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise DejavuError(f"{where}: expected an integer, got {value!r}")
    if isinstance(current, float):
        if isinstance(value, bool):
            raise DejavuError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DejavuError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(current, list):
        if not isinstance(value, list):
            raise DejavuError(f"{where}: expected a list, got {value!r}")
        # each entry as the annotation's kind ("list[float]", "list[int]"), so a wrong entry is named here
        kind = {"list[float]": 0.0, "list[int]": 0}.get(hint.replace(" ", "").removesuffix("|None"))
        if kind is None:
            return value
        entries = []
        for i, v in enumerate(value):
            if v is None:  # (_coerce lets None through: it means "unset" for optional keys)
                raise DejavuError(f"{where}[{i}]: expected {'a number' if isinstance(kind, float) else 'an integer'}, "
                                  "got null")
            entries.append(_coerce(v, kind, f"{where}[{i}]"))
        return entries
    if isinstance(current, dict) and not isinstance(value, dict):
        raise DejavuError(f"{where}: expected a mapping, got {value!r}")
    return value


def merge_into(obj: Any, data: dict[str, Any], where: str) -> None:
    if not isinstance(data, dict):
        raise DejavuError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(obj)}
    for key, value in data.items():
        if key not in known:
            raise DejavuError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            merge_into(current, value or {}, f"{where}.{key}")
        else:
            setattr(obj, key, _coerce(value, current, f"{where}.{key}", str(known[key].type)))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of one shipped in configs/ (`smollm2-135m`, `tiny`, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path)
    shipped = CONFIG_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    if path.is_dir():
        raise DejavuError(f"--config {name_or_path} is a directory; give a YAML file or a name from {CONFIG_DIR}")
    raise DejavuError(f"config file not found: {name_or_path} (nor {shipped.name} in {CONFIG_DIR})")


def report_inputs(config_file, cfg: RunConfig, *paths) -> list[Path]:
    """What a command's --json report must never replace: the given paths, the model and the corpus the config
    names, and the config file itself, where they are local files or folders."""
    found = [Path(str(p)) for p in (*paths, cfg.model.name, cfg.data.dataset)
             if p is not None and Path(str(p)).exists()]
    if config_file is not None:
        found.append(resolve_config_path(config_file))
    return found


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, refusing a key given twice in one mapping: YAML keeps the last, so a section repeated lower in
    a file would silently drop every setting of the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _merge_file(cfg: RunConfig, config_file: str | Path) -> None:
    path = resolve_config_path(config_file)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DejavuError(f"config file {path} is not valid YAML{at}: {problem}") from None
    merge_into(cfg, data, str(path))


def load_config(
    config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None, base_source: str = "earlier stage's manifest",
    fixed: tuple[str, ...] = (),
) -> RunConfig:
    """Defaults, then `base` (the config an earlier stage ran with) or else the shipped default
    file, then the YAML file given, then flag overrides: flag > file > earlier stage > default.
    A file given without a base lands on the shipped default file, not on the bare defaults, so
    setting one key leaves every other where `--help` and the README say it is.

    `fixed`: sections that stay as `base` has them whatever the file says (the settings an earlier
    stage ran with: its data must be described as it was made); a file that differs there is noted.
    `overrides` maps dotted keys (`collect.max_tokens`) to values; None values are skipped so
    unset CLI flags leave the file's value alone.
    """
    if base is not None:
        cfg = RunConfig.from_dict(base, source=base_source)
        if config_file is not None:
            _merge_file(cfg, config_file)
            _restore_sections(cfg, RunConfig.from_dict(base, source=base_source), fixed, config_file, base_source)
    else:
        cfg = RunConfig()
        _merge_file(cfg, DEFAULT_CONFIG)
        if config_file is not None:
            _merge_file(cfg, config_file)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        merge_into(cfg, {section: {key: value}}, "flag")
    cfg.data.dataset = _beside_repository(cfg.data.dataset)
    validate(cfg)
    return cfg


def _restore_sections(cfg: RunConfig, ran: RunConfig, sections: tuple[str, ...], config_file, source: str) -> None:
    changed = []
    for section in sections:
        was, now = getattr(ran, section), getattr(cfg, section)
        changed += [f"{section}.{f.name}" for f in fields(was)
                    if not _same_setting(f"{section}.{f.name}", getattr(was, f.name), getattr(now, f.name))]
        setattr(cfg, section, was)
    if changed:
        print(f"note: {config_file} sets {', '.join(changed)}, which an earlier stage already ran with other values; "
              f"kept as the {source} has them", file=sys.stderr)


def _same_setting(key: str, a: Any, b: Any) -> bool:
    """Equal, or (the corpus) the same file named two ways: the shipped relative path, resolved."""
    if a == b:
        return True
    if key == "data.dataset" and isinstance(a, str) and isinstance(b, str):
        paths = [Path(_beside_repository(v)) for v in (a, b)]
        return all(p.exists() for p in paths) and paths[0].resolve() == paths[1].resolve()
    return False


def beside_repository(relative: str) -> Path:
    """A path given relative to the repository root (the shipped `../shared/data/...` corpora)."""
    return (CONFIG_DIR.parent / relative).resolve()


def _beside_repository(dataset: str) -> str:
    """The shipped default corpus is relative to the repository; from another working directory, find
    it there rather than fail. Any other value is left as given."""
    if dataset != DataConfig.dataset or Path(dataset).exists():
        return dataset
    candidate = beside_repository(dataset)
    return str(candidate) if candidate.exists() else dataset


def _check_density(value: float | None, name: str) -> None:
    if value is not None and not (0.0 < value <= 1.0):
        raise DejavuError(f"{name} must be in (0, 1], got {value}")


def validate(cfg: RunConfig) -> None:
    if not cfg.collect.mlp_label_densities:  # (training needs the labels of its MLP density)
        raise DejavuError("collect.mlp_label_densities is empty: list at least one density, e.g. [0.5]")
    for d in cfg.collect.mlp_label_densities:
        _check_density(d, "collect.mlp_label_densities")
    # once each, as the flag gives them: a repeated density is the same setting, not another one
    cfg.collect.mlp_label_densities = list(dict.fromkeys(cfg.collect.mlp_label_densities))
    for name, value in (("data.dataset (--dataset)", cfg.data.dataset), ("model.name (--model)", cfg.model.name)):
        if not value.strip():  # ('' is the working directory to a path: its files would be read as the corpus)
            raise DejavuError(f"{name} is empty: name a corpus / model")
    for name, value in (("data.seed", cfg.data.seed), ("train.seed", cfg.train.seed)):
        if not -2 ** 63 <= value < 2 ** 64:  # what torch.Generator.manual_seed takes
            raise DejavuError(f"{name} must be between -2**63 and 2**64 - 1, got {value}")
    _check_density(cfg.train.mlp_density, "train.mlp_density")
    _check_density(cfg.train.head_density, "train.head_density")
    _check_density(cfg.export.mlp_density, "export.mlp_density")
    _check_density(cfg.export.head_density, "export.head_density")
    _check_density(cfg.tune.mlp_density, "tune.mlp_density")
    _check_density(cfg.tune.head_density, "tune.head_density")
    _check_density(cfg.runtime.mlp_density, "runtime.mlp_density")
    _check_density(cfg.runtime.head_density, "runtime.head_density")
    _check_density(cfg.export.mlp_candidate_density, "export.mlp_candidate_density")
    _check_density(cfg.runtime.mlp_candidate_density, "runtime.mlp_candidate_density")
    _check_density(cfg.tune.mlp_candidate_density, "tune.mlp_candidate_density")
    for section in ("export", "runtime"):
        tokens = getattr(cfg, section).calibration_tokens
        if tokens is not None and tokens < 1:
            raise DejavuError(f"{section}.calibration_tokens (--calibration-tokens) must be at least 1, got {tokens}")
    t = cfg.tune
    if t.mlp_candidate_density is not None and t.mlp_selection != "threshold":
        raise DejavuError("tune.mlp_candidate_density (--mlp-candidate-density) tunes two-stage score thresholds: "
                          "it needs --mlp-selection threshold")
    if t.mlp_candidate_density is not None and t.mlp_density is not None and t.mlp_candidate_density < t.mlp_density:
        raise DejavuError(f"tune.mlp_candidate_density {t.mlp_candidate_density:g} is below the MLP density "
                          f"{t.mlp_density:g}: the candidates must include the final set")
    for section in ("export", "runtime"):  # TEAL-style thresholds (runtime/thresholds.py)
        keep_input, keep_attn = getattr(cfg, section).mlp_keep_input, getattr(cfg, section).attn_keep_input
        _check_density(keep_input, f"{section}.mlp_keep_input")
        _check_density(keep_attn, f"{section}.attn_keep_input")
        if keep_attn is not None and keep_input is None:
            raise DejavuError(f"{section}.attn_keep_input (--attn-keep-input) comes with --mlp-keep-input (use "
                              "--mlp-keep-input 1 --mlp-density 1 for attention thresholds alone)")
        layer_bytes = getattr(cfg, section).keep_layer_bytes
        _check_density(layer_bytes, f"{section}.keep_layer_bytes")
        if layer_bytes is not None and (keep_input is not None or keep_attn is not None):
            raise DejavuError(f"{section}.keep_layer_bytes (--keep-layer-bytes) sets every threshold itself: drop "
                              "--mlp-keep-input / --attn-keep-input")
    up_weight = cfg.runtime.mlp_up_weight
    if up_weight is not None and not (math.isfinite(up_weight) and up_weight >= 0):
        raise DejavuError(f"runtime.mlp_up_weight (--mlp-up-weight) must be a finite number >= 0, got {up_weight}")
    if cfg.runtime.mlp_up_weight is not None and cfg.runtime.mlp_candidate_density is not None:
        raise DejavuError("choose one MLP rule: --mlp-up-weight (exact up) or --mlp-candidate-density (two-stage)")
    for section in ("export", "runtime"):
        sec = getattr(cfg, section)
        # with --mlp-candidate-density the score thresholds keep the candidates, down thresholds the rest
        others = [flag for flag, value in (("--mlp-up-weight", getattr(sec, "mlp_up_weight", None)),
                                           ("--mlp-keep-input", sec.mlp_keep_input),
                                           ("--keep-layer-bytes", sec.keep_layer_bytes)) if value is not None]
        if sec.mlp_selection == "threshold" and others:
            raise DejavuError(f"{section}.mlp_selection threshold (--mlp-selection threshold) is its own MLP rule: "
                              f"drop {', '.join(others)}")
    rt = cfg.runtime
    if rt.mlp_candidate_density is not None and rt.mlp_density is not None and rt.mlp_candidate_density < rt.mlp_density:
        raise DejavuError(f"runtime.mlp_candidate_density (--mlp-candidate-density) {rt.mlp_candidate_density:g} is below "
                          f"the MLP density {rt.mlp_density:g}: the candidates must include the final set")
    if (cfg.runtime.attn_keep_input is not None or cfg.runtime.keep_layer_bytes is not None) \
            and (cfg.runtime.head_density or 1.0) < 1.0:
        raise DejavuError("attention thresholds (--attn-keep-input, --keep-layer-bytes) replace head selection: "
                          "drop --head-density")
    for layer, d in cfg.export.mlp_density_per_layer.items():
        if isinstance(layer, bool) or not str(layer).lstrip("-").isdigit():
            raise DejavuError(f"export.mlp_density_per_layer: {layer!r} is not a layer index (an integer)")
        if isinstance(d, bool) or not isinstance(d, int | float):
            raise DejavuError(f"export.mlp_density_per_layer[{layer}] must be a density in (0, 1], got {d!r}")
        _check_density(d, f"export.mlp_density_per_layer[{layer}]")
    lr = cfg.tune.mlp_compensation_lr
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < float("inf")):
        raise DejavuError(f"tune.mlp_compensation_lr (--mlp-compensation-lr) must be a positive number, got {lr!r}")
    if lr is not None and not cfg.tune.mlp_compensation_rank:
        raise DejavuError("tune.mlp_compensation_lr (--mlp-compensation-lr) is the MLP compensation's learning rate: "
                          "it needs --mlp-compensation-rank")
    for section in ("export", "tune"):
        rank = getattr(cfg, section).mlp_compensation_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise DejavuError(f"{section}.mlp_compensation_rank (--mlp-compensation-rank) must be an integer >= 0, "
                              f"got {rank!r}")
    if cfg.collect.max_tokens <= 0:
        raise DejavuError(f"collect.max_tokens must be positive, got {cfg.collect.max_tokens}")
    if not cfg.runtime.batch_sizes or any(b < 1 for b in cfg.runtime.batch_sizes):
        raise DejavuError(f"runtime.batch_sizes (--batch-sizes) must be sizes of at least 1, got {cfg.runtime.batch_sizes}")
    if cfg.train.cpu_threads < 0:
        raise DejavuError(f"train.cpu_threads (--cpu-threads) must be 0 (this machine's cores) or more, "
                          f"got {cfg.train.cpu_threads}")
    if cfg.runtime.prompt_len < 1:
        raise DejavuError(f"runtime.prompt_len (--prompt-len) must be at least 1, got {cfg.runtime.prompt_len}")
    if cfg.runtime.decode_tokens < 1 or cfg.runtime.warmup < 0:
        raise DejavuError(f"runtime.decode_tokens (--decode-tokens) must be at least 1 and runtime.warmup (--warmup) "
                          f"at least 0, got {cfg.runtime.decode_tokens} and {cfg.runtime.warmup}")
    for name, device in (("model.device", cfg.model.device), ("runtime.device", cfg.runtime.device)):
        if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", device):
            raise DejavuError(f"{name} (--device) must be auto, cpu, cuda or cuda:N; got {device!r}")
    if not math.isfinite(cfg.train.lr) or cfg.train.lr <= 0:
        raise DejavuError(f"train.lr (--lr) must be a positive number, got {cfg.train.lr}")
    if not math.isfinite(cfg.train.weight_decay) or cfg.train.weight_decay < 0:
        raise DejavuError(f"train.weight_decay must be a number >= 0, got {cfg.train.weight_decay}")
    if cfg.data.seq_len < 2:
        raise DejavuError(f"data.seq_len must be at least 2, got {cfg.data.seq_len}")
    if cfg.export.mlp_predictor_bits is not None and cfg.export.mlp_predictor_bits not in (4, 8):
        raise DejavuError(f"export.mlp_predictor_bits (--mlp-predictor-bits) must be 4 or 8, got "
                          f"{cfg.export.mlp_predictor_bits}")
    group = cfg.export.mlp_predictor_group
    if group < 8 or group & (group - 1):
        raise DejavuError(f"export.mlp_predictor_group (--mlp-predictor-group) must be a power of two of at least 8, "
                          f"got {group}")
    for name, value, allowed in (
        ("train.mlp_pairing", cfg.train.mlp_pairing, ("current", "lookahead")),
        ("train.head_pairing", cfg.train.head_pairing, ("current", "lookahead")),
        ("collect.mlp_label_rule", cfg.collect.mlp_label_rule, ("auto", "topk", "positive")),
        ("runtime.selection", cfg.runtime.selection, ("predictor", "oracle", "dense")),
        ("export.mlp_selection", cfg.export.mlp_selection, ("topk", "threshold")),
        ("tune.mlp_selection", cfg.tune.mlp_selection, ("topk", "threshold")),
        ("runtime.mlp_selection", cfg.runtime.mlp_selection, (None, "topk", "threshold")),
    ):
        if value not in allowed:
            raise DejavuError(f"{name} must be one of {', '.join(str(a) for a in allowed if a is not None)}; "
                              f"got {value!r}")
