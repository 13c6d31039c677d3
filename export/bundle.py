"""The bundle: one self-describing directory holding everything the runtime needs from training.

Layout (docs/FORMATS.md, `dejavu.bundle` version 1):
- `predictors.safetensors`: `layers.{l}.mlp.{name}` / `layers.{l}.attn.{name}` for the predictor
  tensors; safetensors holds raw tensors only, so loading a bundle never executes code (no pickle).
- `manifest.json`: the model identity (dimensions + weight fingerprint), densities (global and per
  layer), pairings, training metrics, predictor size, and the sha256 of the safetensors file.
- Optional TEAL-style thresholds (`export.mlp_keep_input`): `thresholds.*` tensors, one fp32 value per
  layer (runtime/thresholds.py), described by the manifest's `thresholds`; the runtime then runs the MLP
  (and with `attn_keep_input` attention) by them instead of predictors. A bundle may hold thresholds
  alone (`dejavu export --model M --mlp-keep-input X`, no training run).
- Optional MLP score thresholds (`export.mlp_selection: threshold`): `score_thresholds.mlp`, one fp32 value
  per layer (NaN where the MLP runs dense; runtime/score_thresholds.py), described by the manifest's
  `mlp_score_thresholds`; the runtime then keeps each token's neurons scored above them instead of a top-k.
  With `export.mlp_candidate_density` too (two-stage), they keep that candidate density and
  `score_thresholds.mlp_down` (the same layout) cuts the candidates' down rows to the MLP density.
- Optional quantized-weight MLP predictors (`export.mlp_predictor_bits`: `dejavu export --model M
  --mlp-predictor-bits 4` with no training run, or `--run RUN`, whose head predictors stay and whose MLP ones give
  way): `layers.{l}.mlp.{up,gate}_{codes,scales}` (quantized_predictor.py), described by the manifest's
  `mlp_predictor`; they read the MLP's own input (`mlp_pairing: mlp_input`).

A layer the predictors stage did not train (train.layers restricted) has no tensors and density 1.0:
the runtime runs it dense.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import torch

from dejavu.artifacts import (
    check_listed,
    file_entry,
    load_tensors,
    manifest_hash,
    parent_ref,
    read_manifest,
    save_tensors,
    stage_around,
    verify_files,
    write_manifest,
)
from dejavu.errors import DejavuError
from dejavu.predictor import PREDICTOR_TENSORS, LayerPredictors, LowRankPredictor, PredictorSet
from dejavu.quantized_predictor import MLP_INPUT
from dejavu.runtime.compensation import PARTS as COMPENSATION_PARTS
from dejavu.runtime.compensation import TENSOR_PREFIX as COMPENSATION_PREFIX

BUNDLE_KIND = "dejavu.bundle"
PREDICTORS_KIND = "dejavu.predictors"
BUNDLE_FILE = "predictors.safetensors"
KINDS = ("mlp", "attn")
COLLECT_KIND = "dejavu.collect"
# Read without a default by load_bundle and the runtime; export has written them all since version 1
# (PREDICTOR_FIELDS only in bundles with predictors: thresholds alone have no pairing).
REQUIRED_FIELDS = ("model", "mlp_density", "head_density", "mlp_density_per_layer", "head_density_per_layer")
PREDICTOR_FIELDS = ("mlp_pairing", "head_pairing", "hidden_activation")


def layer_file(l: int) -> str:  # noqa: E741 - l is the layer index everywhere in the formats doc
    return f"layers/layer-{l:03d}.safetensors"


def _export_config(run_manifest: dict, config_file, overrides: dict[str, Any]):
    """Start from the config the predictors were trained with (flag > --config file > that config). The
    model, collect and train sections stay as they ran; `data` may change: it is the corpus thresholds
    are calibrated on."""
    from dejavu.config import load_config

    return load_config(config_file, overrides, base=run_manifest.get("config") or {},
                       base_source="predictors manifest", fixed=("model", "collect", "train"))


def _check_predictor_fields(manifest: dict, where: Path) -> None:
    """An edited pairing or activation would otherwise run as some default, with no error."""
    mlp_pairings = (MLP_INPUT,) if _quantized_mlp(manifest, where) else ("current", "lookahead")
    for key, allowed in (("mlp_pairing", mlp_pairings), ("head_pairing", ("current", "lookahead")),
                         ("hidden_activation", ("none", "relu"))):
        if manifest[key] not in allowed:
            raise DejavuError(f"{where}: {key} must be {' or '.join(allowed)}, not {manifest[key]!r} "
                              "(an edited manifest?)")


def _per_layer(default: float, overrides: dict, num_layers: int, present: list[bool], what: str) -> list[float]:
    values = []
    for l in range(num_layers):  # noqa: E741
        value = float(overrides.get(l, overrides.get(str(l), default)))
        values.append(value if present[l] else 1.0)
    bad = [int(k) for k in overrides if not 0 <= int(k) < num_layers]
    if bad:
        raise DejavuError(f"{what}: layer indices {bad} are outside 0..{num_layers - 1}")
    untrained = sorted(int(k) for k in overrides if not present[int(k)])
    if untrained:  # they run dense whatever is asked: a value there would be recorded and never applied
        raise DejavuError(f"{what}: layers {untrained} have no trained predictors (they run dense); drop them")
    return values


def _mean_density(values: list[float], present: list[bool]) -> float | None:
    """The top-level density: the mean over the layers with predictors (the others run dense), exactly the
    shared value when they agree, so that a uniform bundle states its density as given."""
    kept = [float(v) for v, p in zip(values, present, strict=True) if p]
    if not kept:
        return None
    return kept[0] if len(set(kept)) == 1 else math.fsum(kept) / len(kept)


def _check_collect_unchanged(pm: dict, pred_dir: Path, collect_dir: Path) -> None:
    """Refuse predictors trained on collect data the run no longer holds (collect ran again since), as a
    training resume does. A run whose collect/ was deleted to free disk has nothing to compare: allowed."""
    parent = pm.get("parent")
    if not isinstance(parent, dict) or parent.get("format") != COLLECT_KIND or not collect_dir.is_dir():
        return
    try:
        current = manifest_hash(read_manifest(collect_dir, COLLECT_KIND, verify=False))
    except DejavuError:
        current = None  # collecting again now, or interrupted
    if current != parent.get("sha256"):
        tuned = " (then `dejavu tune-predictors --overwrite` to tune them)" if pred_dir.name == "tuned" else ""
        raise DejavuError(f"{pred_dir} was trained with other collect data than {collect_dir} holds now (collect ran "
                          f"again since?); re-run `dejavu train-predictors --run {collect_dir.parent} --overwrite`"
                          f"{tuned}, then export")


def _calibration_model(model_name: str, identity: dict | None, cfg):
    """The model to calibrate on (CPU, fp32), checked to be the one the predictors were trained on; at the config's
    model revision, with its trust_remote_code."""
    from dejavu.models.adapters import adapter_for
    from dejavu.models.identity import check_identity
    from dejavu.models.loading import load_model

    model, tokenizer, source = load_model(model_name, device="cpu", dtype="float32", revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    adapter = adapter_for(model)
    if identity:
        check_identity(identity, adapter, what=f"predictors (for {identity.get('name', '?')})")
    return model, tokenizer, source, adapter


def _calibrated_thresholds(cfg, model_name: str, identity: dict | None, keep_down: float):
    """Load the model, check it is the one the predictors were trained on, calibrate (runtime/thresholds.py)."""
    from dejavu.models.identity import model_identity
    from dejavu.runtime.thresholds import calibrate_on_corpus

    e = cfg.export
    model, tokenizer, source, adapter = _calibration_model(model_name, identity, cfg)
    with torch.no_grad():
        thresholds = calibrate_on_corpus(model, adapter, tokenizer, cfg.data, e.calibration_tokens, e.mlp_keep_input,
                                         keep_down, e.attn_keep_input,
                                         max_window=cfg.runtime.eval_window, layer_bytes=e.keep_layer_bytes)
    description = {**thresholds.describe(), "calibration": cfg.data.dataset,
                   "calibration_tokens": e.calibration_tokens}
    return thresholds, description, identity or model_identity(adapter, source.display)


def _compensation_in(tensors: dict[str, torch.Tensor], layers: list[LayerPredictors], rank: int | None):
    """The MLP compensation among `tensors` (learned by tune-predictors or fitted here), or None."""
    if not rank:
        return None
    from dejavu.runtime.compensation import Compensation

    sparse = [lp.mlp is not None and lp.mlp_density < 1.0 for lp in layers]
    hidden = next(lp.mlp.d_in for lp in layers if lp.mlp is not None)
    return Compensation.from_tensors(tensors, hidden, rank, sparse, "the MLP compensation")


def _calibrated_score_thresholds(cfg, load_model, tensors: dict[str, torch.Tensor], mlp_per_layer: list[float],
                                 head_per_layer: list[float], pairings: dict, activation: str,
                                 compensation_rank: int | None = None
                                 ) -> tuple[list[float | None], list[float | None] | None, dict]:
    """Set each layer's MLP score threshold (and with a candidate density, its down threshold) with these
    predictors at the bundle's densities (runtime/score_thresholds.py), on the model `load_model()` gives
    (_calibration_model's tuple)."""
    from dejavu.runtime.score_thresholds import calibrate_on_corpus

    layers = _predictor_layers(tensors, mlp_per_layer, head_per_layer, activation, "the predictors")
    if not any(lp.mlp is not None and lp.mlp_density < 1.0 for lp in layers):
        raise DejavuError("--mlp-selection threshold needs MLP predictors at a density below 1: this bundle's MLPs "
                          "all run dense")
    predictors = PredictorSet(layers, **pairings)
    model, tokenizer, _, adapter = load_model()
    e = cfg.export
    values, down = calibrate_on_corpus(model, adapter, tokenizer, predictors, cfg.data, e.calibration_tokens,
                                       max_window=cfg.runtime.eval_window, candidate_density=e.mlp_candidate_density,
                                       compensation=_compensation_in(tensors, layers, compensation_rank))
    return values, down, {"calibration": cfg.data.dataset, "calibration_tokens": e.calibration_tokens,
                          "with_mlp_compensation": bool(compensation_rank)}


def _tuned_compensation(pm: dict, cfg, present: list[bool], mlp_per_layer: list[float],
                        head_per_layer: list[float]) -> tuple[dict, bool]:
    """(The manifest's description of the MLP compensation tuned with these predictors, whether it runs with the
    bundle's rule). It is described with the rule it was tuned for: a bundle of another rule carries it, and
    runtimes leave it out."""
    from dejavu.runtime.compensation import compensation_rule, rule_differences

    t = pm.get("tuned") or {}
    made_for = compensation_rule(t.get("mlp_selection", "topk"), t.get("mlp_candidate_density"),
                                 [t.get("mlp_density", 1.0) if p else 1.0 for p in present],
                                 [t.get("head_density", 1.0) if p else 1.0 for p in present])
    exported = compensation_rule(cfg.export.mlp_selection, cfg.export.mlp_candidate_density, mlp_per_layer,
                                 head_per_layer)
    differences = rule_differences(made_for, exported)
    if differences:
        print(f"note: the MLP compensation was tuned with these predictors for another rule, so runtimes will leave it "
              f"out of this bundle: {'; '.join(differences)}", flush=True)
    return {"rank": pm["mlp_compensation"]["rank"], "tuned": True, "rule": made_for}, not differences


def _calibrated_compensation(cfg, load_model, tensors: dict[str, torch.Tensor], mlp_per_layer: list[float],
                             head_per_layer: list[float], pairings: dict, activation: str) -> dict:
    """Fit the MLP compensation (runtime/compensation.py) for the bundle's rule, with the score and down
    thresholds already in `tensors`; adds its tensors there and returns the manifest's description."""
    from dejavu.runtime.compensation import calibrate_compensation, compensation_rule
    from dejavu.runtime.quality import model_context
    from dejavu.runtime.score_thresholds import DOWN_TENSOR_NAME, TENSOR_NAME
    from dejavu.runtime.thresholds import calibration_ids

    e = cfg.export
    layers = _predictor_layers(tensors, mlp_per_layer, head_per_layer, activation, "the predictors")
    sparse = [lp.mlp is not None and lp.mlp_density < 1.0 for lp in layers]
    if not any(sparse):
        raise DejavuError("--mlp-compensation-rank needs MLP predictors at a density below 1: this bundle's MLPs "
                          "all run dense")
    predictors = PredictorSet(layers, **pairings)
    rule = {"mlp_candidate_density": e.mlp_candidate_density}
    if TENSOR_NAME in tensors:
        from dejavu.runtime.score_thresholds import from_tensor

        rule["mlp_score_thresholds"] = from_tensor(tensors, len(layers), sparse, "the score thresholds")
        if DOWN_TENSOR_NAME in tensors:
            rule["mlp_down_thresholds"] = from_tensor(tensors, len(layers), sparse, "the down thresholds",
                                                      DOWN_TENSOR_NAME)
    model, tokenizer, _, adapter = load_model()
    ids = calibration_ids(tokenizer, cfg.data, e.calibration_tokens)
    print(f"  fitting the MLP compensation (rank {e.mlp_compensation_rank}) on {ids.numel()} tokens of "
          f"{cfg.data.dataset}", flush=True)
    compensation = calibrate_compensation(model, adapter, predictors, ids,
                                          min(model_context(model), cfg.runtime.eval_window),
                                          e.mlp_compensation_rank, **rule)
    fitted = compensation.to_tensors()
    tensors.update(fitted)
    return {"bytes": sum(t.numel() * 4 for t in fitted.values()), "rank": e.mlp_compensation_rank,
            "calibration": cfg.data.dataset, "calibration_tokens": e.calibration_tokens,
            "rule": compensation_rule(e.mlp_selection, e.mlp_candidate_density, mlp_per_layer, head_per_layer)}


def check_bundle_out(out: Path, stages: tuple[Path, ...] = ()) -> bool:
    """Refuse an --out that holds anything but a bundle, or lies in the run's `stages` or in any directory
    holding a dejavu manifest (rewriting that stage would delete it), before any work; True when a bundle
    is there (it is then replaced, and the caller says so)."""
    if out.exists() and not out.is_dir():
        raise DejavuError(f"--out {out} is a file; the bundle is a directory")
    from dejavu.artifacts import check_can_write

    check_can_write(out, "--out")
    manifest = out / "manifest.json"
    if manifest.is_file():
        import json

        try:
            kind = json.loads(manifest.read_text()).get("format")
        except (ValueError, AttributeError, OSError):
            kind = None
        if kind != BUNDLE_KIND:
            raise DejavuError(f"--out {out} holds a {kind or 'unreadable'} manifest, not a bundle; writing there would "
                              "replace it. Choose a new directory")
    target = out.resolve()
    for stage in stages:  # checked by name too: an unfinished stage has no manifest yet
        stage = stage.resolve()
        if target == stage or stage in target.parents:
            raise DejavuError(f"--out {out} is inside the run's stage {stage}, which export never writes into "
                              "(rerunning the stage would delete it); choose a directory outside collect/, predictors/ and tuned/")
    around = stage_around(target)
    if around is not None:
        raise DejavuError(f"--out {out} is inside {around[0]} (a {around[1]} directory); choose a directory outside "
                          "run stages and bundles")
    if not out.is_dir():
        return False
    others = sorted(p.name for p in out.iterdir()
                    if p.name not in ("manifest.json", BUNDLE_FILE) and not p.name.startswith("."))
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise DejavuError(f"--out {out} already holds other files ({shown}); choose a new or empty directory")
    return manifest.is_file()


# the header key of the bundle's tensors file that keeps a copy of the manifest's fields
RECORDED_FIELDS_KEY = "manifest_fields"
# manifest fields outside that copy: the files list holds the tensors file's own sha256; the others are checked apart
UNRECORDED_FIELDS = ("format", "format_version", "dejavu_version", "created", "files")


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def _write_bundle(out: Path, cfg, tensors: dict[str, torch.Tensor], parent: dict | None, **fields) -> dict:
    """The tensors, then the manifest (its presence marks the bundle complete). The manifest's sha256 covers the
    tensors file and not the manifest itself, so that file's header keeps a copy of the manifest's fields: a field
    edited afterwards (a pairing, an activation, a rule) is refused on load instead of running as edited."""
    import os

    from dejavu.artifacts import WriterLock, remove_stale_temps

    config = cfg.to_dict()
    recorded = json.loads(json.dumps({"config": config, "parent": parent, **fields}))  # as the manifest will read
    # one export writes a bundle at a time: two at once could leave one's manifest over the other's tensors
    with WriterLock(out / ".export.lock", f"the bundle {out}"):
        remove_stale_temps(out)  # (a killed export's)
        # written whole first: a full disk or an interruption here leaves an earlier bundle as it was
        staged = out / f".{BUNDLE_FILE}.staged"
        sha = save_tensors(staged, tensors, metadata={"format": BUNDLE_KIND, "format_version": "1",
                                                      RECORDED_FIELDS_KEY: _canonical(recorded)})
        # the old manifest (the commit marker) goes before the old tensors: it never describes the new file
        (out / "manifest.json").unlink(missing_ok=True)
        os.replace(staged, out / BUNDLE_FILE)
        return write_manifest(out, BUNDLE_KIND, config, [file_entry(out / BUNDLE_FILE, out, sha)], parent=parent,
                              **fields)


def _check_recorded_fields(manifest: dict, path: Path, where: Path) -> None:
    """Refuse a manifest whose fields differ from the copy export kept in the tensors file's header (bundles
    written before that copy existed have none and are not checked)."""
    from safetensors import safe_open

    with safe_open(str(path / BUNDLE_FILE), framework="pt") as fh:
        text = (fh.metadata() or {}).get(RECORDED_FIELDS_KEY)
    if text is None:
        return
    try:
        recorded = json.loads(text)
    except json.JSONDecodeError:
        raise DejavuError(f"{path / BUNDLE_FILE}: its header's copy of the manifest is not JSON") from None
    keys = sorted((set(manifest) | set(recorded)) - set(UNRECORDED_FIELDS))
    edited = [key for key in keys if _canonical(manifest.get(key)) != _canonical(recorded.get(key))]
    if edited:
        raise DejavuError(f"{where}: {', '.join(edited[:5])} differ{'s' if len(edited) == 1 else ''} from what export "
                          f"wrote (kept in {BUNDLE_FILE}'s header): the manifest was edited; export the bundle again "
                          "for other settings, or pass them to bench / generate as flags")


def _check_layers_with_predictors(manifest: dict, layers: list[LayerPredictors], where: Path) -> None:
    """A layer without predictors runs dense: a density below 1 listed for it would be reported and not run."""
    for key, kind in (("mlp_density_per_layer", "mlp"), ("head_density_per_layer", "attn")):
        missing = [l for l, layer in enumerate(layers) if getattr(layer, kind) is None and manifest[key][l] < 1.0]  # noqa: E741
        if missing:
            raise DejavuError(f"{where}: {key} lists densities below 1 for layers {missing[:8]}, which have no "
                              f"{kind} predictor in {BUNDLE_FILE} (edited bundle?)")


def _writing_to(out: Path, replacing: bool) -> None:
    if replacing:
        print(f"replacing the bundle at {out}")
    out.mkdir(parents=True, exist_ok=True)


def _export_thresholds_only(out: Path, cfg, model_name: str) -> dict:
    """A bundle with thresholds and no predictors: TEAL-style sparsity needs no collect or training."""
    from dejavu.runtime.thresholds import thresholds_to_tensors

    keep_down = cfg.export.mlp_density or 0.5
    replacing = check_bundle_out(out)  # before the calibration's minutes
    thresholds, description, identity = _calibrated_thresholds(cfg, model_name, None, keep_down)
    num_layers = len(thresholds.x)
    _writing_to(out, replacing)
    manifest = _write_bundle(
        out, cfg, thresholds_to_tensors(thresholds), parent=None, model=identity,
        mlp_density=float(thresholds.keep_h), head_density=1.0, mlp_density_per_layer=[1.0] * num_layers,
        head_density_per_layer=[1.0] * num_layers, metrics={}, predictor_bytes=0, mlp_candidate_density=None,
        thresholds=description)
    if thresholds.layer_shares is not None:
        kept = f"keep {thresholds.layer_bytes:g} of each layer's weight bytes, split per layer by greedy search"
    else:
        kept = (f"keep {thresholds.keep_x:g} of the MLP input, {thresholds.keep_h:g} of down's input"
                + (f", {thresholds.keep_attn:g} of attention's inputs" if thresholds.attention else ""))
    print(f"bundle written to {out}: thresholds only ({num_layers} layers; {kept})")
    return manifest


def _quantized_mlp(manifest: dict, where) -> dict | None:
    """The manifest's quantized-weight MLP predictor description (bits, group, activation), checked, or None."""
    from dejavu.quantized_predictor import BITS, KIND

    described = manifest.get("mlp_predictor")
    if described is None:
        return None
    if (not isinstance(described, dict) or described.get("kind") != KIND or described.get("bits") not in BITS
            or not isinstance(described.get("group"), int) or not isinstance(described.get("activation"), str)):
        raise DejavuError(f"{where}: mlp_predictor must describe {KIND} predictors (bits {' or '.join(map(str, BITS))}, "
                          f"an integer group, the activation), got {described!r} (edited manifest?)")
    return described


def _quantized_mlp_tensors(adapter, bits: int, group: int, mlp_per_layer: list[float],
                           present: list[bool]) -> tuple[dict[str, torch.Tensor], dict]:
    """The quantized copies of gate and up (quantized_predictor.py) of the layers `present`, and the manifest's
    `mlp_predictor` description."""
    from tqdm.auto import tqdm

    from dejavu.quantized_predictor import KIND, check_format, quantize_mlp

    check_format(bits, group, adapter.shape().hidden_size, "the hidden size")
    tensors: dict[str, torch.Tensor] = {}
    mlp_bytes = 0
    for l, layer in enumerate(tqdm(adapter.decoder_layers(), desc=f"quantizing gate/up to {bits} bits",  # noqa: E741
                                   unit="layer")):
        weights = adapter.mlp_weights(layer)
        mlp_bytes += sum(w.numel() * 2 for w in (weights.up, weights.down, weights.gate) if w is not None)
        if present[l]:
            for name, value in quantize_mlp(weights, bits, group).items():
                tensors[f"layers.{l}.mlp.{name}"] = value
    # read every token only where the layer's MLP runs sparse
    read_bytes = sum(t.numel() * t.element_size() for key, t in tensors.items()
                     if mlp_per_layer[int(key.split(".")[1])] < 1.0)
    return tensors, {"kind": KIND, "bits": bits, "group": group, "activation": adapter.activation_name(),
                     # what the predictors read every token against the MLP's weights at 16 bits
                     "share_of_mlp_bytes": read_bytes / mlp_bytes}


def _export_quantized_predictors(out: Path, cfg, model_name: str) -> dict:
    """A bundle whose MLP predictors are quantized copies of the model's gate and up (quantized_predictor.py):
    no collect or training; heads run dense."""
    from dejavu.models.identity import model_identity

    e = cfg.export
    density = e.mlp_density if e.mlp_density is not None else 0.5
    if e.head_density is not None and e.head_density < 1.0:
        raise DejavuError("quantized-weight MLP predictors made without a training run come without head "
                          "predictors: drop --head-density (heads run dense), or add --run RUN for its head predictors")
    replacing = check_bundle_out(out)
    model, _, source, adapter = _calibration_model(model_name, None, cfg)
    num_layers = adapter.num_layers
    everywhere = [True] * num_layers
    mlp_per_layer = _per_layer(density, e.mlp_density_per_layer, num_layers, everywhere, "mlp")
    tensors, described = _quantized_mlp_tensors(adapter, e.mlp_predictor_bits, e.mlp_predictor_group, mlp_per_layer,
                                                everywhere)
    predictor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    identity = model_identity(adapter, source.display)
    _writing_to(out, replacing)
    manifest = _write_bundle(
        out, cfg, tensors, parent=None, model=identity,
        mlp_density=float(_mean_density(mlp_per_layer, everywhere)), head_density=1.0,
        mlp_density_per_layer=mlp_per_layer, head_density_per_layer=[1.0] * num_layers,
        mlp_pairing=MLP_INPUT, head_pairing="lookahead", hidden_activation="none", metrics={},
        predictor_bytes=predictor_bytes, mlp_candidate_density=None, mlp_selection="topk", mlp_predictor=described)
    print(f"bundle written to {out}: {described['bits']}-bit gate/up copies as MLP predictors ({num_layers} layers, "
          f"MLP density {manifest['mlp_density']:g}, heads dense; {predictor_bytes / 2**20:.1f} MiB, "
          f"{described['share_of_mlp_bytes']:.3f} of the MLP's 16-bit bytes read every token)")
    return manifest


def _check_threshold_flags(cfg, head_density_asked: float | None) -> None:
    """With thresholds the MLP runs by them in every layer, so per-layer top-k densities or a compensation of the
    predictors' selection would change nothing: refused rather than dropped, before any work. Attention thresholds
    replace head selection the same way."""
    e = cfg.export
    if (e.mlp_keep_input is not None or e.keep_layer_bytes is not None) and e.mlp_compensation_rank:
        raise DejavuError("--mlp-compensation-rank corrects the predictors' MLP selection: not with magnitude "
                          "thresholds (--mlp-keep-input, --keep-layer-bytes)")
    if ((e.attn_keep_input is not None or e.keep_layer_bytes is not None) and head_density_asked is not None
            and head_density_asked < 1.0):
        raise DejavuError("attention thresholds (--attn-keep-input, or --keep-layer-bytes, which splits each layer's "
                          "bytes over attention's inputs too) replace head selection: drop --head-density")
    if (e.mlp_keep_input is not None or e.keep_layer_bytes is not None) and e.mlp_density_per_layer:
        raise DejavuError("export.mlp_density_per_layer sets the predictors' top-k per layer, but with "
                          "--mlp-keep-input / --keep-layer-bytes the MLP runs by thresholds that keep one share of "
                          "down's input in every layer: drop one of them")


def _predictors_dir(run: Path) -> Path:
    """RUN/predictors, or a predictors directory given itself (RUN/predictors or RUN/tuned). A note says when
    RUN/tuned holds these predictors tuned (export that directory to use them), or when a tuned directory
    given was tuned from other predictors than its run holds now."""
    from dejavu.train.tune import tuned_status

    if not (run / "predictors").exists() and (run / "manifest.json").is_file():
        if run.name == "tuned" and tuned_status(run.parent) == "stale":
            print(f"note: {run} was tuned from other predictors than {run.parent / 'predictors'} holds now; exporting "
                  "it as it is", flush=True)
        return run
    if tuned_status(run) == "current":
        print(f"note: {run / 'tuned'} holds these predictors tuned end to end; `--run {run / 'tuned'}` exports "
              "those", flush=True)
    return run / "predictors"


def _check_quantized_flags(cfg, overrides: dict[str, Any] | None, tuned_compensation: bool = False) -> None:
    """Quantized-weight MLP predictors (--mlp-predictor-bits) choose by a top-k and replace every other MLP rule;
    --mlp-predictor-group alone would change nothing. Checked once the bits are known from every source (the flag,
    the config file, the run's recorded config)."""
    e = cfg.export
    if e.mlp_predictor_bits is None:
        if (overrides or {}).get("export.mlp_predictor_group") is not None:
            raise DejavuError("--mlp-predictor-group sets the quantized predictors' group: it comes with "
                              "--mlp-predictor-bits 4|8")
        return
    if (e.mlp_keep_input is not None or e.keep_layer_bytes is not None or e.mlp_selection != "topk"
            or e.mlp_compensation_rank or e.mlp_candidate_density is not None or tuned_compensation):
        raise DejavuError("--mlp-predictor-bits makes the MLP predictors quantized copies of gate and up, chosen by a "
                          "top-k: not with thresholds, --mlp-selection threshold, --mlp-candidate-density or an MLP "
                          "compensation")


def run_export(run: Path | None, out: Path, config_file=None, overrides: dict[str, Any] | None = None,
               model_name: str | None = None) -> dict:
    """Read RUN/predictors/ (or a predictors directory given itself: RUN/tuned/), write the bundle at `out`;
    returns the bundle manifest. With
    export.mlp_keep_input the bundle also holds calibrated thresholds; with no run, only them."""
    from dejavu.artifacts import existing_ancestor

    # by its real path: `link/..`, a symlinked --out and `.` then name one directory to every check, lock and cleanup
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise DejavuError(f"--out {out} is a file; the bundle is a directory")
    anchor = existing_ancestor(out)
    if not anchor.is_dir():
        raise DejavuError(f"--out {out} lies under a file, not a directory")
    try:
        return _run_export(run, out, config_file, overrides, model_name)
    finally:  # directories made for this export and left empty by a failure go again
        made = out
        while made != anchor and made.is_dir():
            try:
                made.rmdir()  # (only an empty one; another export may have just written beside it)
            except OSError:
                break
            made = made.parent


def _run_export(run: Path | None, out: Path, config_file=None, overrides: dict[str, Any] | None = None,
                model_name: str | None = None) -> dict:
    if run is None:
        from dejavu.config import load_config

        cfg = load_config(config_file, overrides or {})
        _check_quantized_flags(cfg, overrides)
        thresholds = cfg.export.mlp_keep_input is not None or cfg.export.keep_layer_bytes is not None
        if cfg.export.mlp_predictor_bits is not None:
            return _export_quantized_predictors(Path(out), cfg, model_name or cfg.model.name)
        if not thresholds:
            raise DejavuError("export needs --run (a training run), --mlp-keep-input / --keep-layer-bytes for a "
                              "bundle of thresholds alone, or --mlp-predictor-bits for quantized-weight MLP predictors")
        _check_threshold_flags(cfg, cfg.export.head_density)
        return _export_thresholds_only(Path(out), cfg, model_name or cfg.model.name)
    run, out = Path(run), Path(out)
    pred_dir = _predictors_dir(run)
    pm = read_manifest(pred_dir, PREDICTORS_KIND)
    collect_dir = pred_dir.parent / "collect"
    _check_collect_unchanged(pm, pred_dir, collect_dir)
    cfg = _export_config(pm, config_file, overrides or {})
    _check_quantized_flags(cfg, overrides, tuned_compensation=bool(pm.get("mlp_compensation")))
    quantized_mlp = cfg.export.mlp_predictor_bits is not None
    # (a head density the run's stored config carries, as a tuned run's does, is not asked for here)
    asked = (overrides or {}).get("export.head_density")
    if asked is None and config_file is not None:
        from dejavu.config import load_config

        asked = load_config(config_file, {}).export.head_density
    _check_threshold_flags(cfg, asked)
    identity = pm.get("model") or {}
    # the model's layer count: the manifest's `layers` counts the trained ones (train.layers may pick a subset, the
    # others are exported dense)
    num_layers = int(identity.get("num_layers") or 0)
    if num_layers <= 0:
        raise DejavuError(f"{pred_dir}/manifest.json names no layer count")
    if out.resolve() in (run.resolve(), pred_dir.resolve()):
        raise DejavuError(f"--out {out} would overwrite the run itself; choose a separate bundle directory")
    replacing = check_bundle_out(out, stages=(pred_dir, collect_dir, pred_dir.parent / "predictors",
                                              pred_dir.parent / "tuned"))

    listed = {entry["path"] for entry in pm.get("files", [])}
    tensors: dict[str, torch.Tensor] = {}
    present = []
    predictor_bytes = 0
    tuned_compensation = pm.get("mlp_compensation")
    if tuned_compensation and cfg.export.mlp_compensation_rank:
        raise DejavuError(f"{pred_dir} carries an MLP compensation tuned with the predictors (rank "
                          f"{tuned_compensation.get('rank')}): drop --mlp-compensation-rank, which would fit another")
    for l in range(num_layers):  # noqa: E741
        name = layer_file(l)
        if name not in listed:
            present.append(False)
            continue
        wanted = [f"{kind}.{t}" for kind in KINDS for t in PREDICTOR_TENSORS]
        if tuned_compensation:  # learned by tune-predictors: into the bundle as mlp_compensation.{l}.*
            wanted += [f"{COMPENSATION_PREFIX}.{t}" for t in COMPENSATION_PARTS]
        layer = load_tensors(pred_dir / name, wanted)
        for key, value in layer.items():
            if not torch.isfinite(value).all():
                raise DejavuError(f"{pred_dir / name}: {key} contains NaN or infinite values (training diverged?)")
            if key.startswith(COMPENSATION_PREFIX + "."):
                tensors[f"{COMPENSATION_PREFIX}.{l}.{key.split('.', 1)[1]}"] = value.float().contiguous()
            else:
                tensors[f"layers.{l}.{key}"] = value.float().contiguous()
            predictor_bytes += value.numel() * 4
        present.append(True)
    if not any(present):
        raise DejavuError(f"{pred_dir} lists no trained layer files ({layer_file(0)}, ...)")

    mlp_density = cfg.export.mlp_density or pm.get("mlp_density") or cfg.train.mlp_density
    head_density = cfg.export.head_density or pm.get("head_density") or cfg.train.head_density
    candidates = cfg.export.mlp_candidate_density
    mlp_per_layer = _per_layer(mlp_density, cfg.export.mlp_density_per_layer, num_layers, present,
                               "export.mlp_density_per_layer")
    head_per_layer = _per_layer(head_density, {}, num_layers, present, "head density")
    above = [l for l, d in enumerate(mlp_per_layer) if present[l] and candidates is not None and candidates < d]  # noqa: E741
    if above:
        raise DejavuError(f"--mlp-candidate-density {candidates:g} is below the MLP density {mlp_per_layer[above[0]]:g} "
                          f"(layers {above[:8]}): two-stage selection picks the final neurons among the candidates")
    for l, d in enumerate(mlp_per_layer):  # noqa: E741 - a tuned term of a layer exported dense is never read
        for name in COMPENSATION_PARTS if d >= 1.0 else ():
            dropped = tensors.pop(f"{COMPENSATION_PREFIX}.{l}.{name}", None)
            predictor_bytes -= 0 if dropped is None else dropped.numel() * 4
    quantized_description = None
    if quantized_mlp:  # the run's head predictors stay; its MLP predictors give way to quantized copies
        for key in [key for key in tensors if key.split(".")[2:3] == ["mlp"]]:
            predictor_bytes -= tensors.pop(key).numel() * 4
        _, _, _, adapter = _calibration_model(model_name or identity.get("name") or cfg.model.name, identity, cfg)
        quantized, quantized_description = _quantized_mlp_tensors(
            adapter, cfg.export.mlp_predictor_bits, cfg.export.mlp_predictor_group, mlp_per_layer, present)
        tensors.update(quantized)
        predictor_bytes += sum(t.numel() * t.element_size() for t in quantized.values())
        quantized_description["replaces"] = "the run's trained MLP predictors"
    threshold_description = None
    # the run's means describe only the predictors the bundle keeps
    metrics = {kind: means for kind, means in (pm.get("metrics") or {}).items()
               if not (kind == "mlp" and quantized_mlp)}
    if cfg.export.mlp_keep_input is not None or cfg.export.keep_layer_bytes is not None:
        # before anything is written: a bad model loses nothing
        from dejavu.runtime.thresholds import thresholds_to_tensors

        thresholds, threshold_description, _ = _calibrated_thresholds(
            cfg, model_name or identity.get("name") or cfg.model.name, identity, float(mlp_density))
        if len(thresholds.x) != num_layers:
            raise DejavuError(f"the model has {len(thresholds.x)} layers, the predictors {num_layers}")
        tensors.update(thresholds_to_tensors(thresholds))
        if thresholds.attention:  # they replace head selection: the run's head predictors would never run
            dropped = [key for key in tensors if key.split(".")[2:3] == ["attn"] and key.startswith("layers.")]
            predictor_bytes -= sum(tensors.pop(key).numel() * 4 for key in dropped)
            head_per_layer = [1.0] * num_layers
            metrics.pop("attn", None)
            if dropped:
                print("note: attention thresholds replace head selection; the run's head predictors are left out",
                      flush=True)

    # score thresholds and a fitted compensation share one load of the model
    calibration_model = functools.cache(
        lambda: _calibration_model(model_name or identity.get("name") or cfg.model.name, identity, cfg))
    pairings = {"mlp_pairing": pm.get("mlp_pairing", cfg.train.mlp_pairing),
                "head_pairing": pm.get("head_pairing", cfg.train.head_pairing)}
    activation = pm.get("hidden_activation", cfg.train.hidden_activation)

    def set_score_thresholds(compensation_rank: int | None) -> dict:
        from dejavu.runtime.score_thresholds import DOWN_TENSOR_NAME, TENSOR_NAME, to_tensor

        values, down, description = _calibrated_score_thresholds(
            cfg, calibration_model, tensors, mlp_per_layer, head_per_layer, pairings, activation, compensation_rank)
        tensors[TENSOR_NAME] = to_tensor(values)
        if down is not None:
            tensors[DOWN_TENSOR_NAME] = to_tensor(down)
        return description

    compensation_description, compensation_runs = None, False
    if tuned_compensation:
        compensation_description, compensation_runs = _tuned_compensation(pm, cfg, present, mlp_per_layer,
                                                                           head_per_layer)
    score_description = None
    if cfg.export.mlp_selection == "threshold":  # before anything is written: a bad model loses nothing
        score_description = set_score_thresholds(tuned_compensation["rank"] if compensation_runs else None)
    if cfg.export.mlp_compensation_rank:  # (a tuned one is described above); before anything is written
        compensation_description = _calibrated_compensation(cfg, calibration_model, tensors, mlp_per_layer,
                                                             head_per_layer, pairings, activation)
        predictor_bytes += compensation_description.pop("bytes")  # read every token, as the predictors are
        if score_description is not None:
            # fitted with thresholds set without it; set them again with it, so the bundle keeps its densities
            score_description = set_score_thresholds(cfg.export.mlp_compensation_rank)

    tuned = pm.get("tuned") or {}
    if tuned and (any(d != tuned.get("mlp_density") for d, p in zip(mlp_per_layer, present, strict=True) if p)
                  or any(d != tuned.get("head_density") for d, p in zip(head_per_layer, present, strict=True) if p)):
        print(f"note: these predictors were tuned at MLP density {tuned.get('mlp_density')} and head density "
              f"{tuned.get('head_density')}; the bundle asks for others, where tuning was not measured", flush=True)
    # (a candidate density belongs to the rule tuned for with score thresholds only: a two-stage top-k is never tuned)
    tuned_rule = (tuned.get("mlp_selection", "topk"), tuned.get("mlp_candidate_density"))
    exported_rule = (cfg.export.mlp_selection, candidates if cfg.export.mlp_selection == "threshold" else None)
    if tuned and tuned_rule != exported_rule:
        def rule(selection, cand):
            return selection + (f" among candidates at {cand:g}" if cand is not None else "")

        flags = f"--mlp-selection {tuned_rule[0]}" + (
            f" --mlp-candidate-density {tuned_rule[1]:g}" if tuned_rule[1] is not None
            else " without --mlp-candidate-density" if exported_rule[1] is not None and tuned_rule[0] == "threshold"
            else "")
        print(f"note: these predictors were tuned for MLP selection {rule(*tuned_rule)}; the bundle selects by "
              f"{rule(*exported_rule)} ({flags} matches the tuning)", flush=True)
    # per-layer overrides make the top-level density their mean (what bench reports), not the default
    mlp_density, head_density = _mean_density(mlp_per_layer, present), _mean_density(head_per_layer, present)
    _writing_to(out, replacing)
    manifest = _write_bundle(
        out, cfg, tensors,
        parent=parent_ref(pred_dir, pm),
        model=identity,
        mlp_density=float(mlp_density),
        head_density=float(head_density),
        mlp_density_per_layer=mlp_per_layer,
        head_density_per_layer=head_per_layer,
        mlp_pairing=MLP_INPUT if quantized_mlp else pm.get("mlp_pairing", cfg.train.mlp_pairing),
        head_pairing=pm.get("head_pairing", cfg.train.head_pairing),
        rank=pm.get("rank", cfg.train.rank),
        hidden_activation=pm.get("hidden_activation", cfg.train.hidden_activation),
        metrics=metrics,
        # optional: how `dejavu tune-predictors` tuned them (held-out KL before and after; null: as trained)
        tuned=pm.get("tuned"),
        predictor_bytes=predictor_bytes,
        # optional: two-stage MLP selection default for the runtime (null: one-stage); with mlp_selection
        # "threshold", the density the score thresholds keep (score_thresholds.mlp_down cuts the rest)
        mlp_candidate_density=cfg.export.mlp_candidate_density,
        # optional: TEAL-style thresholds (tensors thresholds.*), which the runtime then applies
        thresholds=threshold_description,
        # "threshold": the MLP keeps the neurons scored above `score_thresholds.mlp` (described by
        # mlp_score_thresholds); "topk": each token's top-k
        mlp_selection=cfg.export.mlp_selection,
        mlp_score_thresholds=score_description,
        # optional: the low-rank MLP compensation (tensors mlp_compensation.*) and the rule it was fitted for
        mlp_compensation=compensation_description,
        # optional: quantized copies of gate and up as the MLP predictors (quantized_predictor.py)
        mlp_predictor=quantized_description,
    )
    trained = sum(present)
    kinds = (f"{cfg.export.mlp_predictor_bits}-bit gate/up copies for the MLP, fp32 heads" if quantized_mlp
             else "fp32")
    compensated = f", MLP compensation of rank {compensation_description['rank']}" if compensation_description else ""
    print(f"bundle written to {out}: {trained}/{num_layers} layers with predictors, "
          f"MLP density {mlp_density:g}"
          f"{' (score thresholds)' if score_description else ''}"
          f"{f' among candidates at {candidates:g}' if candidates is not None else ''}"
          f"{compensated}"
          f", head density {head_density:g}, "
          f"{predictor_bytes / 2**20:.1f} MiB of predictors ({kinds})")
    return manifest


def _check_shapes(manifest: dict, l: int, kind: str, t: dict[str, torch.Tensor], path: Path) -> None:  # noqa: E741
    model = manifest.get("model") or {}
    n_out = model.get("intermediate_size") if kind == "mlp" else model.get("num_heads")
    d = model.get("hidden_size")
    w1, w2 = t["w1"], t["w2"]
    if d is not None and w1.shape[1] != d:
        raise DejavuError(f"{path}: layer {l} {kind} predictor reads {w1.shape[1]} inputs, but the bundle's manifest "
                          f"describes its model with hidden_size={d} (the bundle is inconsistent)")
    if n_out is not None and w2.shape[0] != n_out:
        raise DejavuError(f"{path}: layer {l} {kind} predictor scores {w2.shape[0]} units, but the bundle's manifest "
                          f"describes its model with {n_out} (the bundle is inconsistent)")


def _require(missing: list[str], where: Path) -> None:
    if missing:
        fields = ", ".join(repr(key) for key in missing)
        raise DejavuError(f"{where} lacks the field{'s' if len(missing) > 1 else ''} {fields} "
                          "(written by another version?)")


def _check_manifest_fields(manifest: dict, where: Path) -> None:
    """Every field read without a default, and the model identity's dimensions and fingerprint (without
    them check_bundle_matches would pass any model): one refusal here instead of a KeyError later."""
    from dejavu.models.identity import IDENTITY_KEYS

    _require([key for key in REQUIRED_FIELDS if key not in manifest], where)
    model = manifest["model"]
    if not isinstance(model, dict):
        raise DejavuError(f"{where}: model must be the model's identity, got {type(model).__name__} (edited manifest?)")
    _require([f"model.{key}" for key in (*IDENTITY_KEYS, "fingerprint") if not model.get(key)], where)
    layers = model["num_layers"]
    if isinstance(layers, bool) or not isinstance(layers, int) or layers <= 0:
        raise DejavuError(f"{where}: model.num_layers must be a positive integer, got {layers!r} (edited manifest?)")


def _check_top_level_densities(manifest: dict, layers: list[LayerPredictors], thresholds, where: Path) -> None:
    """The top-level densities are what bench reports, the per-layer ones what runs: refuse a manifest where
    they disagree. Export writes each as the mean over the layers with predictors (_mean_density); a bundle
    of thresholds alone has none, and states the share of down's input its thresholds keep, heads dense."""
    for key, kind in (("mlp_density", "mlp"), ("head_density", "attn")):
        present = [getattr(layer, kind) is not None for layer in layers]
        expected = _mean_density(manifest[f"{key}_per_layer"], present)
        if expected is not None:
            source = f"the mean of {key}_per_layer over the layers with predictors"
        elif key == "mlp_density" and thresholds is not None:
            expected, source = thresholds.keep_h, "the share of down's input its thresholds keep"
        else:
            expected, source = 1.0, "1 (no layer has predictors)"
        if not math.isclose(manifest[key], expected, rel_tol=0.0, abs_tol=1e-9):
            raise DejavuError(f"{where}: {key} is {manifest[key]:g}, but {source} is {expected:g} (edited manifest?)")


def _check_manifest_densities(manifest: dict, where: Path) -> None:
    """The manifest's sha256 covers the tensors, not its own values: an edited density is caught here."""
    def density(value, key: str, optional: bool = False) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise DejavuError(f"{where}: {key} must be a number in (0, 1], got {value!r} (edited manifest?)")

    density(manifest.get("mlp_density"), "mlp_density")
    density(manifest.get("head_density"), "head_density")
    density(manifest.get("mlp_candidate_density"), "mlp_candidate_density", optional=True)
    for key in ("mlp_density_per_layer", "head_density_per_layer"):
        values = manifest.get(key)
        if not isinstance(values, list):
            raise DejavuError(f"{where}: {key} must be a list, got {type(values).__name__} (edited manifest?)")
        for l, value in enumerate(values):  # noqa: E741
            density(value, f"{key}[{l}]")


def _bundled_score_thresholds(manifest: dict, tensors: dict, layers: list[LayerPredictors], path: Path,
                              where: Path) -> tuple[list[float | None] | None, list[float | None] | None]:
    """The bundle's MLP score thresholds when its manifest selects by them (bundles before them: top-k), and
    its down thresholds when they keep candidates (two-stage), else None."""
    selection = manifest.get("mlp_selection", "topk")
    if selection not in ("topk", "threshold"):
        raise DejavuError(f"{where}: mlp_selection must be topk or threshold, not {selection!r} (an edited manifest?)")
    if selection == "topk":
        return None, None
    from dejavu.runtime.score_thresholds import DOWN_TENSOR_NAME, from_tensor

    if not isinstance(manifest.get("mlp_score_thresholds"), dict):
        raise DejavuError(f"{where}: mlp_selection is threshold but mlp_score_thresholds does not describe them "
                          "(an edited manifest?)")
    sparse = [lp.mlp is not None and lp.mlp_density < 1.0 for lp in layers]
    scores = from_tensor(tensors, len(layers), sparse, str(path / BUNDLE_FILE))
    if manifest.get("mlp_candidate_density") is None:
        return scores, None
    return scores, from_tensor(tensors, len(layers), sparse, str(path / BUNDLE_FILE), DOWN_TENSOR_NAME)


def _bundled_compensation(manifest: dict, tensors: dict, layers: list[LayerPredictors], path: Path, where: Path):
    """(the bundle's MLP compensation, the rule it was fitted for), or (None, None) when it has none."""
    described = manifest.get("mlp_compensation")
    if described is None:
        return None, None
    from dejavu.runtime.compensation import Compensation

    rank = described.get("rank") if isinstance(described, dict) else None
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or not isinstance(described.get("rule"), dict):
        raise DejavuError(f"{where}: mlp_compensation must give a rank of at least 1 and the rule it was fitted for "
                          "(an edited manifest?)")
    sparse = [lp.mlp is not None and lp.mlp_density < 1.0 for lp in layers]
    hidden = manifest["model"]["hidden_size"]
    return (Compensation.from_tensors(tensors, hidden, rank, sparse, str(path / BUNDLE_FILE)),
            described["rule"])


def _predictor_layers(tensors: dict[str, torch.Tensor], mlp_d: list[float], head_d: list[float],
                      activation: str | None, where, manifest: dict | None = None) -> list[LayerPredictors]:
    """Per layer, the predictors `layers.{l}.{kind}.*` of `tensors` at these densities (a kind without tensors:
    None, density 1.0); with a bundle's manifest, their shapes are checked against its model."""
    quantized = _quantized_mlp(manifest or {}, where)
    layers = []
    for l in range(len(mlp_d)):  # noqa: E741
        preds = {}
        if quantized is not None:
            preds["mlp"] = _quantized_layer(tensors, l, quantized, manifest, where)
        for kind in KINDS:
            if kind in preds:
                continue
            keys = {t: f"layers.{l}.{kind}.{t}" for t in PREDICTOR_TENSORS}
            if not any(k in tensors for k in keys.values()):
                preds[kind] = None
                continue
            missing = [k for k in keys.values() if k not in tensors]
            if missing:
                raise DejavuError(f"{where} lacks {missing[:3]}")
            t = {name: tensors[key] for name, key in keys.items()}
            bad = [keys[name] for name, value in t.items() if value.is_floating_point() and not torch.isfinite(value).all()]
            if bad:  # a bundle edited or written by hand: its scores would be NaN and choose at random
                raise DejavuError(f"{where}: {bad[0]} contains NaN or infinite values")
            preds[kind] = LowRankPredictor.from_tensors(t, activation, where=f"{where}: layer {l}'s {kind} predictor")
            if manifest is not None:
                _check_shapes(manifest, l, kind, t, where)
        layers.append(LayerPredictors(preds["mlp"], preds["attn"],
                                      float(mlp_d[l]) if preds["mlp"] is not None else 1.0,
                                      float(head_d[l]) if preds["attn"] is not None else 1.0))
    return layers


def _quantized_layer(tensors: dict[str, torch.Tensor], l: int, described: dict, manifest: dict, where):  # noqa: E741
    """Layer l's quantized-weight MLP predictor, its shapes checked against the bundle's model."""
    from dejavu.quantized_predictor import QuantizedMLPPredictor

    prefix = f"layers.{l}.mlp."
    mine = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
    if not mine:  # a layer the run did not train: dense
        return None
    predictor = QuantizedMLPPredictor(mine, described["bits"], described["group"], described["activation"],
                                      where=f"{where}: layer {l}'s quantized MLP predictor")
    model = manifest.get("model") or {}
    for got, key in ((predictor.d_in, "hidden_size"), (predictor.n_out, "intermediate_size")):
        if model.get(key) is not None and got != model[key]:
            raise DejavuError(f"{where}: layer {l}'s quantized MLP predictor has {got} for the model's {key}="
                              f"{model[key]}")
    return predictor


def bundle_directory(path: str | Path) -> Path:
    """The bundle a --bundle names: its directory, or one of its two files."""
    path = Path(path)
    return path.parent if path.is_file() and path.name in ("manifest.json", BUNDLE_FILE) else path


def load_bundle(path: str | Path) -> tuple[dict, PredictorSet]:
    """Verify (sha256, version) and read a bundle; returns (manifest, PredictorSet on CPU, fp32)."""
    path = bundle_directory(path)
    if not (path / "manifest.json").exists() and ((path / "predictors").is_dir() or (path / "collect").is_dir()):
        raise DejavuError(f"{path} is a training run, not a bundle: write one with "
                          f"`dejavu export --run {path} --out BUNDLE` and pass --bundle BUNDLE")
    where = path / "manifest.json"
    manifest = read_manifest(path, BUNDLE_KIND, verify=False)
    _check_manifest_fields(manifest, where)
    check_listed(path, manifest, [BUNDLE_FILE])  # every bundle, thresholds alone too, keeps its tensors there
    verify_files(path, manifest)
    _check_manifest_densities(manifest, where)
    model = manifest["model"]
    num_layers = model["num_layers"]
    mlp_d, head_d = manifest["mlp_density_per_layer"], manifest["head_density_per_layer"]
    if len(mlp_d) != num_layers or len(head_d) != num_layers:
        raise DejavuError(f"{path}/manifest.json: per-layer densities list {len(mlp_d)}/{len(head_d)} layers, "
                          f"the model has {num_layers}")
    all_tensors = load_tensors(path / BUNDLE_FILE)
    thresholds = None
    if manifest.get("thresholds"):
        from dejavu.runtime.thresholds import thresholds_from_tensors

        thresholds = thresholds_from_tensors(all_tensors, manifest["thresholds"], num_layers, str(path / BUNDLE_FILE))
    if any(key.startswith("layers.") for key in all_tensors):
        _require([key for key in PREDICTOR_FIELDS if key not in manifest], where)
        _check_predictor_fields(manifest, where)
    layers = _predictor_layers(all_tensors, mlp_d, head_d, manifest.get("hidden_activation"), path / BUNDLE_FILE,
                               manifest)
    _check_layers_with_predictors(manifest, layers, where)
    _check_top_level_densities(manifest, layers, thresholds, where)
    score_thresholds, down_thresholds = _bundled_score_thresholds(manifest, all_tensors, layers, path, where)
    compensation, compensation_rule = _bundled_compensation(manifest, all_tensors, layers, path, where)
    pset = PredictorSet(layers, mlp_pairing=manifest.get("mlp_pairing", "current"),
                        head_pairing=manifest.get("head_pairing", "lookahead"),
                        meta={"bundle": str(path), "model": model}, thresholds=thresholds,
                        mlp_score_thresholds=score_thresholds, mlp_down_thresholds=down_thresholds,
                        mlp_candidate_density=None if down_thresholds is None else manifest["mlp_candidate_density"],
                        mlp_compensation=compensation, mlp_compensation_rule=compensation_rule)
    _check_recorded_fields(manifest, path, where)
    return manifest, pset


def check_bundle_matches(manifest: dict, adapter) -> None:
    """Refuse a model the bundle was not made for, naming what differs (dims, then weights)."""
    from dejavu.models.identity import check_identity

    expected = manifest.get("model")
    if not expected:
        raise DejavuError("bundle manifest has no model identity; re-export it with this dejavu")
    check_identity(expected, adapter, what=f"bundle (for {expected.get('name', '?')})")
    quantized = manifest.get("mlp_predictor")
    if quantized and quantized.get("activation") != adapter.activation_name():
        raise DejavuError(f"the bundle's quantized MLP predictors score with activation "
                          f"{quantized.get('activation')!r}, the model's MLP uses {adapter.activation_name()!r} "
                          "(edited manifest?)")
