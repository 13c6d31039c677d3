"""Which sparse rule a run applies: a bundle's predictors or thresholds, the config's flags over them.

`dejavu bench` and `dejavu generate` (and `load_sparse` in Python) resolve it here, once, so both
apply a bundle the same way: flags > config file > the bundle's own settings. The plan then builds
the reference runtime's hooks (`SparsePlan.hooks`) or the decode loop (`SparsePlan.decode_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dejavu.errors import DejavuError
from dejavu.predictor import PredictorSet
from dejavu.quantized_predictor import MLP_INPUT
from dejavu.runtime.thresholds import Thresholds


@dataclass
class SparsePlan:
    selection: str  # "predictor" (the bundle's), "oracle" (true top-k), or "dense"
    predictors: PredictorSet | None  # the predictors that select; None with oracle/dense or thresholds alone
    thresholds: Thresholds | None  # per-layer magnitude thresholds (TEAL), from the bundle or calibrated here
    mlp_density: float  # as reported: the bundle's or the flag's (mean over layers when per layer)
    head_density: float
    # flags over the bundle's per-layer densities; None keeps the bundle's
    mlp_density_flag: float | None
    head_density_flag: float | None
    mlp_candidate_density: float | None  # two-stage MLP selection (predictor only)
    mlp_up_weight: float | None  # exact-up MLP selection (predictor only)
    skip_kv: bool
    description: dict  # what the reports record about the rule
    # per-layer thresholds on the MLP predictors' scores (runtime/score_thresholds.py); None: top-k
    mlp_score_thresholds: list | None = None
    # with them and mlp_candidate_density: per-layer |down input| thresholds, the second stage
    mlp_down_thresholds: list | None = None
    # the bundle's MLP compensation (runtime/compensation.py) when the rule run is the one it was fitted for
    mlp_compensation: object | None = None
    # the oracle with a bundle: the bundle's per-layer densities (its untrained layers at 1.0), unless a flag sets one
    oracle_densities: tuple[list[float] | None, list[float] | None] = (None, None)

    @property
    def decode_loop_note(self) -> str | None:
        """Why the decode loop cannot run this plan, or None."""
        if self.selection == "oracle":
            return ("the decode loop has no oracle selection (it needs the dense activations first); the reference "
                    "runtime computes it")
        if (self.predictors is not None and self.predictors.mlp_pairing == MLP_INPUT
                and self.mlp_score_thresholds is not None):
            return ("the decode loop runs quantized-weight MLP predictors with a top-k, not score thresholds; the "
                    "reference runtime computes them")
        return None

    @property
    def sparse(self) -> bool:
        return self.selection != "dense" or self.thresholds is not None

    def hooks(self, model, adapter, mode: str = "mask"):
        """The reference runtime (hooks on the HF model) for this plan; a context manager."""
        from dejavu.runtime.apply import SparseRuntime

        use = self.predictors
        per_layer_mlp, per_layer_heads = self.oracle_densities
        return SparseRuntime(model, adapter, use, selection=self.selection,
                             mlp_density=self.mlp_density_flag if use else per_layer_mlp or self.mlp_density,
                             head_density=self.head_density_flag if use else per_layer_heads or self.head_density,
                             mlp_candidate_density=self.mlp_candidate_density, mlp_up_weight=self.mlp_up_weight,
                             thresholds=self.thresholds, mode=mode, mlp_score_thresholds=self.mlp_score_thresholds,
                             mlp_down_thresholds=self.mlp_down_thresholds, mlp_compensation=self.mlp_compensation)

    def decode_predictors(self) -> PredictorSet | None:
        """The predictors at the densities the decode loop should run (flags applied to every layer)."""
        if self.predictors is None:
            return None
        use = self.predictors.with_densities(self.mlp_density_flag, self.head_density_flag)
        use.mlp_score_thresholds = self.mlp_score_thresholds  # set for these densities (or None: top-k)
        use.mlp_down_thresholds = self.mlp_down_thresholds
        use.mlp_candidate_density = None if self.mlp_down_thresholds is None else self.mlp_candidate_density
        use.mlp_compensation = self.mlp_compensation
        return use

    def decode_model(self, model, adapter, device, dtype, max_len: int):
        """The graph-capturable decode loop (runtime/decode.py) for this plan."""
        from dejavu.runtime.decode import DecodeModel

        if self.decode_loop_note is not None:
            raise DejavuError(self.decode_loop_note)
        return DecodeModel(model, adapter, self.decode_predictors(), device, dtype, max_len,
                           mlp_candidate_density=self.mlp_candidate_density, mlp_up_weight=self.mlp_up_weight,
                           skip_kv=self.skip_kv, thresholds=self.thresholds)


def read_bundle(bundle: Path | None) -> tuple[dict | None, PredictorSet | None]:
    """(manifest, predictors) of a bundle, checked (hashes, shapes, densities), or (None, None)."""
    if bundle is None:
        return None, None
    from dejavu.export.bundle import load_bundle

    return load_bundle(bundle)


def model_to_load(given: str | None, manifest: dict | None, cfg) -> str:
    """The model to load: the flag's, else the one the bundle was made for, else the config's."""
    return given or (manifest["model"].get("name") if manifest else None) or cfg.model.name


def revision_to_load(given: str | None, manifest: dict | None, cfg) -> str | None:
    """The hub revision to load: the config's, else (the bundle's own model) the one the bundle was made at."""
    if cfg.model.revision is not None or not manifest or (given and given != manifest["model"].get("name")):
        return cfg.model.revision
    stored = ((manifest.get("config") or {}).get("model") or {}).get("revision")
    return stored if isinstance(stored, str) else None


def _calibrate(model, adapter, tokenizer, cfg, keep_down: float) -> Thresholds:
    """Per-layer thresholds from a dense forward over the calibration corpus (data.dataset)."""
    from dejavu.runtime.thresholds import calibrate_on_corpus

    rt = cfg.runtime
    return calibrate_on_corpus(model, adapter, tokenizer, cfg.data, rt.calibration_tokens, rt.mlp_keep_input,
                               keep_down, rt.attn_keep_input, max_window=rt.eval_window,
                               layer_bytes=rt.keep_layer_bytes)


def _bundled_thresholds(cfg, predictors: PredictorSet | None) -> Thresholds | None:
    """A bundle's own thresholds, which apply unless a flag recalibrates them or asks for another selection."""
    rt = cfg.runtime
    flagged = rt.mlp_keep_input is not None or rt.keep_layer_bytes is not None
    if predictors is None or rt.selection != "predictor" or flagged:
        return None
    return predictors.thresholds


def check_selection_flags(cfg, synthetic: bool = False) -> None:
    rt = cfg.runtime
    if synthetic and rt.selection != "predictor":
        raise DejavuError(f"--synthetic times random predictors (speed only): --selection {rt.selection} does not "
                          "apply; drop it")
    if rt.selection != "predictor" and (rt.mlp_up_weight is not None or rt.mlp_candidate_density is not None
                                        or rt.mlp_selection == "threshold"):
        raise DejavuError(f"--mlp-up-weight, --mlp-candidate-density and --mlp-selection threshold refine the "
                          f"predictors' choice; --selection {rt.selection} does not use them")


def check_flags(cfg, predictors: PredictorSet | None, command: str) -> None:
    """Flags that cannot work with this bundle (or without one); checked before the model loads."""
    rt = cfg.runtime
    check_selection_flags(cfg)
    flagged = rt.mlp_keep_input is not None or rt.keep_layer_bytes is not None
    bundled = _bundled_thresholds(cfg, predictors)
    selecting = predictors is not None and predictors.has_predictors
    if rt.selection == "predictor" and not (selecting or flagged or bundled is not None):
        api = "" if command == "bench" else (
            "; in Python, load_sparse(model, bundle=...) or load_sparse(model, selection='oracle') and so on")
        raise DejavuError(f"{command} needs --bundle (or --selection oracle|dense, --mlp-keep-input, "
                          "--keep-layer-bytes" + (", or --synthetic NAME)" if command == "bench" else ")") + api)
    if (rt.selection == "predictor" and rt.head_density is not None and rt.head_density < 1.0
            and (predictors is None or not any(lp.attn is not None for lp in predictors.layers))):
        what = ("no bundle: magnitude thresholds compute every head" if predictors is None else
                f"this bundle holds {'thresholds' if not selecting else 'MLP predictors'} and no head predictors")
        raise DejavuError(f"{what}, so --head-density would change nothing: drop it (or use --selection oracle for "
                          "true top-k heads, or --attn-keep-input for attention thresholds)")
    if (bundled is not None or flagged) and (rt.mlp_candidate_density is not None or rt.mlp_up_weight is not None):
        raise DejavuError("thresholds are their own MLP rule: drop --mlp-candidate-density / --mlp-up-weight")
    if (selecting and predictors.mlp_pairing == MLP_INPUT and rt.selection == "predictor"
            and (rt.mlp_candidate_density is not None or rt.mlp_up_weight is not None)):
        raise DejavuError("this bundle's quantized-weight MLP predictors score every neuron from gate and up already: "
                          "drop --mlp-candidate-density / --mlp-up-weight")
    if rt.mlp_selection == "threshold" and (bundled is not None or flagged):
        raise DejavuError("MLP magnitude thresholds (--mlp-keep-input, --keep-layer-bytes, or the bundle's) replace the "
                          "MLP predictors: drop --mlp-selection threshold")
    if rt.mlp_selection == "threshold" and not (predictors is not None and any(
            lp.mlp is not None for lp in predictors.layers)):
        raise DejavuError("--mlp-selection threshold sets thresholds on the MLP predictors' scores: it needs a "
                          "bundle with MLP predictors")
    if bundled is not None:
        if bundled.attention and rt.head_density is not None and rt.head_density < 1.0:
            raise DejavuError("the bundle's attention thresholds replace head selection: drop --head-density")
        if rt.mlp_density is not None:
            raise DejavuError(f"the bundle's MLP thresholds were calibrated to keep {bundled.keep_h:g} of down's input "
                              "(its MLP density), which --mlp-density cannot move: export again with --mlp-density, "
                              "or calibrate here with --mlp-keep-input X --mlp-density D")


def resolve_plan(cfg, manifest: dict | None, predictors: PredictorSet | None, model, adapter, tokenizer,
                 bundle: Path | None = None) -> SparsePlan:
    """The rule to apply to `model`, from the bundle (manifest, predictors) and cfg.runtime's flags.

    Calibrates thresholds when a flag asks for them (a dense pass over data.dataset)."""
    from dejavu.export.bundle import check_bundle_matches

    rt = cfg.runtime
    check_flags(cfg, predictors, "this run")
    if manifest is not None:
        check_bundle_matches(manifest, adapter)
        for flag, value, key in (("--mlp-density", rt.mlp_density, "mlp_density_per_layer"),
                                 ("--head-density", rt.head_density, "head_density_per_layer")):
            if value is not None and len(set(manifest[key])) > 1:
                print(f"  note: {flag} {value:g} replaces the bundle's per-layer densities "
                      f"({min(manifest[key]):g}-{max(manifest[key]):g}) in every layer", flush=True)
    thresholds_on = rt.mlp_keep_input is not None or rt.keep_layer_bytes is not None
    bundled = _bundled_thresholds(cfg, predictors)
    if predictors is not None and not predictors.has_predictors:
        predictors = None  # a bundle of thresholds alone: nothing else to select with
    # without a bundle the oracle keeps what a bundle would ask by default (export's densities, else the
    # training ones); everything would be no comparison at all
    oracle_alone = manifest is None and rt.selection == "oracle"

    def alone(exported: float | None, trained: float) -> float:
        return (exported if exported is not None else trained) if oracle_alone else 1.0

    mlp_d = rt.mlp_density if rt.mlp_density is not None else (
        manifest["mlp_density"] if manifest else alone(cfg.export.mlp_density, cfg.train.mlp_density))
    head_d = rt.head_density if rt.head_density is not None else (
        manifest["head_density"] if manifest else alone(cfg.export.head_density, cfg.train.head_density))
    use = predictors if rt.selection == "predictor" else None
    thresholds = bundled
    if bundled is not None:
        print(f"  thresholds from the bundle (calibrated on {manifest['thresholds'].get('calibration')})", flush=True)
    if thresholds_on:
        thresholds = _calibrate(model, adapter, tokenizer, cfg, rt.mlp_density if rt.mlp_density is not None else 0.5)
    if thresholds is not None:
        mlp_d = thresholds.keep_h
        if thresholds.attention:
            head_d, use = 1.0, None  # the attention thresholds replace the bundle's head predictors
    selection = rt.selection if use is not None or rt.selection != "predictor" else "dense"  # heads, with thresholds
    if rt.selection == "dense":  # everything computed, whatever the bundle asks (thresholds aside)
        head_d = 1.0
        mlp_d = mlp_d if thresholds is not None else 1.0
    # flag/config > bundle; two-stage applies to predictor selection only
    cand_d = rt.mlp_candidate_density
    if cand_d is None and manifest is not None:
        cand_d = manifest.get("mlp_candidate_density")
    cand_d = cand_d if use is not None and thresholds is None else None
    up_w = rt.mlp_up_weight if use is not None and thresholds is None else None  # exact-up: predictor only
    if cand_d is not None and up_w is not None:
        raise DejavuError("choose one MLP rule: --mlp-up-weight (exact up) or the bundle's two-stage "
                          f"--mlp-candidate-density {cand_d:g}")
    if cand_d is not None and cand_d < mlp_d:
        cand_from = "--mlp-candidate-density" if rt.mlp_candidate_density is not None else "the bundle's candidate density"
        mlp_from = " (--mlp-density)" if rt.mlp_density is not None else ""
        raise DejavuError(f"{cand_from} {cand_d:g} is below the MLP density {mlp_d:g}{mlp_from}: the candidates "
                          "must include the final set")
    wanted = rt.mlp_selection or (manifest or {}).get("mlp_selection", "topk")
    compensation = _compensation(cfg, use, thresholds, up_w, "threshold" if wanted == "threshold" else "topk", cand_d)
    score_thresholds, down_thresholds, score_description = _score_thresholds(
        cfg, manifest, use, model, adapter, tokenizer, thresholds, cand_d, up_w, compensation)
    if use is not None and score_thresholds is None:
        # a threshold bundle run by another rule: the decode loop takes its top-k
        use.mlp_score_thresholds = use.mlp_down_thresholds = use.mlp_candidate_density = None
    description = {
        "mlp_density": mlp_d, "head_density": head_d, "selection": selection,
        # (None where magnitude thresholds run the MLP, the heads perhaps by the bundle's predictors)
        "mlp_selection": "threshold" if score_thresholds is not None else "topk" if use is not None and thresholds
        is None else None,
        "mlp_score_thresholds": score_description,
        "mlp_candidate_density": cand_d, "mlp_up_weight": up_w,
        "mlp_compensation": None if compensation is None else {**manifest["mlp_compensation"], "from_bundle": True},
        "bundle": str(Path(bundle).resolve()) if bundle else None,
        "mlp_pairing": use.mlp_pairing if use is not None and thresholds is None else None,
        "head_pairing": use.head_pairing if use else None,
        # the bundle's predictors were tuned end to end (`dejavu tune-predictors`)
        "tuned": bool(use is not None and manifest is not None and manifest.get("tuned")),
        # quantized-weight MLP predictors (quantized_predictor.py): bits, group, their share of the MLP's bytes
        "mlp_predictor": (manifest or {}).get("mlp_predictor") if use is not None and thresholds is None else None,
        "thresholds": None if thresholds is None else {
            **thresholds.describe(), "calibration": cfg.data.dataset, "calibration_tokens": rt.calibration_tokens}
        if bundled is None else {**manifest["thresholds"], "from_bundle": True},
    }
    oracle_densities = (None, None)
    if selection == "oracle" and manifest is not None:  # the ceiling of this bundle: its densities layer by layer
        oracle_densities = (manifest["mlp_density_per_layer"] if rt.mlp_density is None else None,
                            manifest["head_density_per_layer"] if rt.head_density is None else None)
    return SparsePlan(selection=selection, predictors=use, thresholds=thresholds, mlp_density=mlp_d,
                      head_density=head_d, mlp_density_flag=rt.mlp_density, head_density_flag=rt.head_density,
                      mlp_candidate_density=cand_d, mlp_up_weight=up_w, skip_kv=rt.skip_kv, description=description,
                      mlp_score_thresholds=score_thresholds, mlp_down_thresholds=down_thresholds,
                      mlp_compensation=compensation, oracle_densities=oracle_densities)


def _compensation(cfg, use: PredictorSet | None, thresholds, up_w, mlp_selection: str, cand_d):
    """The bundle's MLP compensation when this run's rule is the one it was fitted for (a note says why not
    otherwise), or None."""
    from dejavu.runtime.compensation import compensation_rule, rule_differences

    if use is None or use.mlp_compensation is None:
        return None
    if not cfg.runtime.mlp_compensation:
        print("  the bundle's MLP compensation is left out (--no-mlp-compensation)", flush=True)
        return None
    rt = cfg.runtime
    running = compensation_rule(
        mlp_selection, cand_d,
        # a layer without a predictor of a kind runs it dense whatever the flags say
        [1.0 if lp.mlp is None else lp.mlp_density if rt.mlp_density is None else rt.mlp_density for lp in use.layers],
        [1.0 if lp.attn is None else lp.head_density if rt.head_density is None else rt.head_density
         for lp in use.layers])
    differences = rule_differences(use.mlp_compensation_rule or {}, running)
    if thresholds is not None or up_w is not None:
        differences.append("magnitude thresholds or exact-up selection")
    if differences:
        print(f"  note: the bundle's MLP compensation was fitted for another rule, so it is left out: "
              f"{'; '.join(differences)}", flush=True)
        return None
    return use.mlp_compensation


def _score_thresholds(cfg, manifest: dict | None, use: PredictorSet | None, model, adapter, tokenizer,
                      thresholds, cand_d, up_w, compensation=None) -> tuple[list | None, list | None, dict | None]:
    """The MLP score thresholds to run with, and with a candidate density the down thresholds after them: the
    bundle's (a threshold bundle at the densities and candidate density it was exported for), or calibrated
    here when --mlp-selection threshold asks (always: the flag asks to calibrate now) or those differ;
    (None, None, None) for top-k."""
    rt = cfg.runtime
    wanted = rt.mlp_selection or (manifest or {}).get("mlp_selection", "topk")
    if wanted != "threshold" or use is None:
        return None, None, None
    other = ("magnitude thresholds" if thresholds is not None else "exact-up selection" if up_w is not None else None)
    if other is not None:
        if rt.mlp_selection == "threshold":  # asked for explicitly: say why it cannot apply
            raise DejavuError(f"--mlp-selection threshold cannot apply: the MLP runs by {other} here")
        return None, None, None
    densities = [rt.mlp_density if rt.mlp_density is not None else lp.mlp_density
                 for lp in use.layers if lp.mlp is not None]
    if all(d >= 1.0 for d in densities):
        return None, None, None  # every MLP dense: nothing to select
    bundled, bundled_down = use.mlp_score_thresholds, use.mlp_down_thresholds
    # thresholds set with the MLP compensation running keep another share without it, and the other way round
    calibrated_with = bool(((manifest or {}).get("mlp_score_thresholds") or {}).get("with_mlp_compensation"))
    same = (use.at_densities(rt.mlp_density, rt.head_density)
            and cand_d == (manifest or {}).get("mlp_candidate_density")
            and calibrated_with == (compensation is not None))
    if bundled is not None and same and rt.mlp_selection is None:
        print(f"  MLP score thresholds from the bundle (calibrated on "
              f"{manifest['mlp_score_thresholds'].get('calibration')})", flush=True)
        return bundled, bundled_down, {**manifest["mlp_score_thresholds"], "from_bundle": True}
    from dejavu.runtime.score_thresholds import calibrate_on_corpus

    if bundled is not None:
        why = ("as --mlp-selection threshold asks" if same
               else "with the MLP compensation left out" if calibrated_with and compensation is None
               else "with the MLP compensation running" if compensation is not None and not calibrated_with
               else "for these densities (or candidate density)")
        print(f"  note: not the bundle's MLP score thresholds: calibrating {why}", flush=True)
    values, down = calibrate_on_corpus(model, adapter, tokenizer, use, cfg.data, rt.calibration_tokens, rt.eval_window,
                                       mlp_density=rt.mlp_density, head_density=rt.head_density,
                                       candidate_density=cand_d, compensation=compensation)
    return values, down, {"calibration": cfg.data.dataset, "calibration_tokens": rt.calibration_tokens,
                          "with_mlp_compensation": compensation is not None}
