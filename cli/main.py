"""The `dejavu` command line: Typer wiring only.

Each command turns flags into a RunConfig (flag > --config file > defaults) and calls one library
function; heavy imports (torch, transformers) happen inside the commands so `--help` is instant.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(
    name="dejavu",
    help="Contextual sparsity for fast LLM decoding: collect -> train-predictors -> export -> bench; "
    "generate runs a bundle.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain help: rich's boxes squeeze the long option texts into a narrow column and show <bool> beside
    # flags that take no value
    rich_markup_mode=None,
)

def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"dejavu {version('dejavu')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            typer.echo("dejavu (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit."),
) -> None:
    pass


def _shipped_defaults() -> dict[str, Any]:
    """The values a run gets with no flags and no --config (the shipped default config over the built-in
    defaults), for the help texts; flags default to None so a --config file can set them."""
    try:
        from dejavu.config import load_config

        return load_config(None, {}).to_dict()
    except Exception:  # noqa: BLE001 - help must render even if the shipped config is broken
        return {}


_DEFAULTS = _shipped_defaults()


def default(dotted: str) -> str:
    """' (default: V)' for a config key, as the help texts show it."""
    section, _, key = dotted.partition(".")
    value = _DEFAULTS.get(section, {}).get(key)
    if value is None:
        return ""
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    return f" (default: {value})"


ConfigOpt = typer.Option(
    None, "--config", "-c",
    help="YAML config (a path, or a name from configs/ such as smollm2-135m or tiny). Flags override it; "
    "it overrides built-in defaults.",
)
DebugOpt = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors.")

# Options `bench` and `generate` share: both apply a bundle to a model the same way (runtime/plan.py).
ModelOpt = typer.Option(None, "--model", "-m", help="Hub id, local model dir, .gguf file, or alias (default: the bundle's model).")
BundleOpt = typer.Option(
    None, "--bundle", "-b", help="Bundle from `dejavu export` (none: dense, or thresholds / the oracle given by flags).")
MlpDensityOpt = typer.Option(None, "--mlp-density", help="Override the bundle's MLP density, in (0, 1].")
HeadDensityOpt = typer.Option(None, "--head-density", help="Override the bundle's head density, in (0, 1].")
MlpCandidateDensityOpt = typer.Option(
    None, "--mlp-candidate-density",
    help="Two-stage MLP selection: predictor candidates at this density (gate/up run for them), then the top "
         "--mlp-density by exact activation; with --mlp-selection threshold, score thresholds keep the candidates "
         "and a per-layer threshold on the activation keeps --mlp-density for down, both calibrated on "
         "--calibration (default: the bundle's; unset: one-stage).")
MlpUpWeightOpt = typer.Option(
    None, "--mlp-up-weight",
    help="Exact-up MLP selection: compute up for every neuron and keep the top --mlp-density by "
         "log|up| + this weight x predictor logit for gate and down (0.4 measured best on SmolLM2). Not with "
         "--mlp-candidate-density or thresholds.")
MlpSelectionOpt = typer.Option(
    None, "--mlp-selection",
    help="How MLP neurons are picked from the predictor's scores: topk (the same count for every token) or "
         "threshold (those scored above per-layer thresholds that keep --mlp-density on average: confident tokens "
         "keep fewer, uncertain ones more), calibrated now on --calibration. Unset: the bundle's rule; a threshold "
         "bundle's own thresholds apply at its densities, other densities calibrate anew. The decode loop runs "
         "either; thresholds at batch 1, and in a batch the top-k of its scores (the union of the sequences' sets "
         "would be nearly every neuron).")
MlpCompensationOpt = typer.Option(
    None, "--mlp-compensation/--no-mlp-compensation",
    help="Add the bundle's MLP compensation (a low-rank linear term per layer for what the sparse MLP leaves out, "
         "from tune-predictors or export --mlp-compensation-rank) where the rule run is the one it was made for; "
         "--no-mlp-compensation "
         "leaves it out, to measure what it adds (default: the config's runtime.mlp_compensation, else on).")
SkipKvOpt = typer.Option(
    None, "--skip-kv/--all-kv",
    help="Decode loop: compute k/v only for the KV groups the selected heads read; a skipped group's "
         "positions are computed when one of its heads is next selected, so the output is unchanged "
         "(default: the config's, else --all-kv).")
MlpKeepInputOpt = typer.Option(
    None, "--mlp-keep-input",
    help="MLP sparsity without a predictor (TEAL-style): per-layer magnitude thresholds keep this share of "
         "each token's MLP input (gate/up read only those columns) and --mlp-density (default 0.5) of "
         "down's input. Calibrated on the config's data.dataset; heads still use the bundle, if given.")
AttnKeepInputOpt = typer.Option(
    None, "--attn-keep-input",
    help="With --mlp-keep-input: attention sparsity the same way (TEAL's whole-model rule). Thresholds keep "
         "this share of each token's q/k/v input (columns read; every head still computed) and of o's "
         "input (rows read). Replaces head selection (head density 1.0).")
KeepLayerBytesOpt = typer.Option(
    None, "--keep-layer-bytes",
    help="Sparsity without a predictor on every input of every layer (q/k/v, o, gate/up, down: TEAL's "
         "whole-model rule): thresholds keep this share of each layer's weight bytes, split over the four "
         "inputs per layer by a greedy search (least output error per byte) on the calibration corpus. "
         "Replaces --mlp-keep-input / --attn-keep-input and head selection.")
CalibrationOpt = typer.Option(
    None, "--calibration",
    help="Corpus the thresholds (--mlp-keep-input / --keep-layer-bytes, or --mlp-selection threshold's score "
         "thresholds) are calibrated on (default: the config's data.dataset).")
CalibrationTokensOpt = typer.Option(
    None, "--calibration-tokens",
    help="Tokens of the calibration corpus the thresholds are set on (fewer: a faster, noisier calibration)."
         + default("runtime.calibration_tokens"))
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda or auto (default: auto: cuda when there is a GPU).")
DtypeOpt = typer.Option(None, "--dtype", help="float32, bfloat16, float16 or auto (default: auto).")
SelectionOpt = typer.Option(None, "--selection", help="predictor (the bundle), oracle (true top-k) or dense." + default("runtime.selection"))


def _rule_overrides(mlp_density, head_density, mlp_candidate_density, mlp_up_weight, skip_kv, mlp_keep_input,
                    attn_keep_input, keep_layer_bytes, calibration, device, dtype, selection,
                    mlp_selection=None, mlp_compensation=None) -> dict[str, Any]:
    """The config keys of the options bench and generate share (None: not given)."""
    return {
        "runtime.mlp_selection": mlp_selection, "runtime.mlp_compensation": mlp_compensation,
        "runtime.mlp_density": mlp_density, "runtime.head_density": head_density,
        "runtime.mlp_candidate_density": mlp_candidate_density, "runtime.mlp_up_weight": mlp_up_weight,
        "runtime.skip_kv": skip_kv, "runtime.mlp_keep_input": mlp_keep_input,
        "runtime.attn_keep_input": attn_keep_input, "runtime.keep_layer_bytes": keep_layer_bytes,
        "data.dataset": calibration, "runtime.device": device, "runtime.dtype": dtype, "runtime.selection": selection,
    }


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


# The commands whose work survives an interruption (collect's shards, train-predictors' layers,
# tune-predictors' checkpoint).
RESUMABLE = ("collect", "train_predictors", "tune_predictors")


def _check_rule_flags(config: str | None, section: str, calibration: str | None, model: str | None = None,
                      selection: str | None = None, densities: tuple = (), skip_kv: bool | None = None,
                      engine: str | None = None, calibration_tokens: int | None = None,
                      mlp_selection: str | None = None, compensation_rank: int | None = None,
                      run: str | None = None, bundle: Path | None = None,
                      mlp_compensation: bool | None = None) -> None:
    """Flags that would change nothing are refused (--calibration, export's --model without thresholds to
    calibrate) or noted (densities under --selection dense, --skip-kv with the hooks), before any work.
    run: export's --run, whose stored config (the rule it asks for) is the base under the file; bundle: bench's
    or generate's, whose score thresholds are calibrated anew at other densities."""
    from dejavu.errors import DejavuError

    if calibration is not None or model is not None or calibration_tokens is not None:
        rules = getattr(_export_base_config(run, config) if run is not None else build_config(config, {}), section)
        chosen = mlp_selection or rules.mlp_selection
        # a score-threshold bundle runs its own thresholds unless the densities, candidate density or compensation
        # asked for (by flag or config file) differ: then they are calibrated anew, on the corpus these flags set
        asks_other = (any(d is not None for d in densities) or mlp_compensation is not None
                      or any(getattr(rules, key, None) is not None
                             for key in ("mlp_density", "head_density", "mlp_candidate_density"))
                      or getattr(rules, "mlp_compensation", True) is False)
        scored = chosen == "threshold" or (chosen is None and asks_other
                                            and _bundle_mlp_selection(bundle) == "threshold")
        compensated = bool(compensation_rank if compensation_rank is not None
                           else getattr(rules, "mlp_compensation_rank", 0))
        if rules.mlp_keep_input is None and rules.keep_layer_bytes is None and not (scored or compensated):
            flag = ("--calibration" if calibration is not None else "--model" if model is not None
                    else "--calibration-tokens")
            raise DejavuError(f"{flag} is used only to calibrate thresholds (--mlp-keep-input, --keep-layer-bytes or "
                              "--mlp-selection threshold) or, on export, to fit --mlp-compensation-rank; drop it or "
                              "add one of them")
    if selection == "dense" and any(d is not None for d in densities):
        typer.echo("note: --selection dense computes every neuron and head; the densities given are not used", err=True)
    if skip_kv and engine == "hooks":
        typer.echo("note: --skip-kv applies to the decode loop only; the hooks compute k/v for every head", err=True)


def _bundle_mlp_selection(bundle: Path | None) -> str | None:
    """The MLP rule a bundle's manifest names, or None (no bundle, or one loading will refuse by name later)."""
    import json

    from dejavu.export.bundle import bundle_directory

    if bundle is None:
        return None
    try:
        manifest = json.loads((bundle_directory(bundle) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("mlp_selection") if isinstance(manifest, dict) else None


def _export_base_config(run: str, config: str | None):
    """The config export will run with for --run RUN (its predictors' stored config, then the file), for checks made
    before it starts; where the run cannot be read yet, the file's (export names the problem itself)."""
    from dejavu.artifacts import read_manifest
    from dejavu.errors import DejavuError
    from dejavu.export.bundle import _export_config

    for directory in (Path(run) / "predictors", Path(run)):
        try:
            pm = read_manifest(directory, "dejavu.predictors", verify=False)
        except DejavuError:
            continue
        return _export_config(pm, config, {})
    return build_config(config, {})


def handle_errors(func):
    """One-line `error: ...` for problems the user can fix; tracebacks only with --debug."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False) or os.environ.get("DEJAVU_DEBUG") == "1"
        from dejavu.errors import DejavuError

        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except DejavuError as exc:
            if debug:
                raise
            _fail(str(exc))
        except KeyboardInterrupt:
            if os.environ.get("RANK", "0") == "0":  # under torchrun every process is interrupted: say it once
                resumable = func.__name__ in RESUMABLE
                kept = "the last checkpoint is" if func.__name__ == "tune_predictors" else "finished shards/layers are"
                typer.echo(f"interrupted: {kept} kept; run the same command again to resume"
                           if resumable else "interrupted", err=True)
            raise typer.Exit(code=130) from None
        except (OSError, ValueError, RuntimeError) as exc:
            if debug:
                raise
            _fail(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)")

    return wrapper


def _numbers(text: str | None, kind: type, flag: str) -> list | None:
    """A comma-separated flag as a list (duplicates dropped, order kept); a one-line error otherwise."""
    if not text:
        return None
    try:
        values = [kind(x) for x in text.split(",")]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        from dejavu.errors import DejavuError

        raise DejavuError(f"{flag}: expected comma-separated {what} such as "
                          f"{'1,4,8' if kind is int else '0.3,0.5'}, got {text!r}") from None
    return list(dict.fromkeys(values))


def build_config(config_file: str | None, overrides: dict[str, Any]):
    from dejavu.config import load_config

    return load_config(config_file, overrides)


@app.command()
@handle_errors
def collect(
    model: str | None = typer.Option(None, "--model", "-m", help="Hub id, local model dir, .gguf file, or alias (smollm2-135m)." + default("model.name")),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Calibration corpus: datasets hub id (name or name:config) or local .txt/.jsonl/.parquet file, dir or glob." + default("data.dataset")),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory; collected data goes to RUN/collect/."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", "-n", help="Token budget for calibration, in whole --seq-len sequences (rounded up); the held-out split "
         "(collect.eval_tokens, at most half) comes out of it." + default("collect.max_tokens")),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Tokens per calibration sequence." + default("data.seq_len")),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Sequences per forward pass." + default("collect.batch_size")),
    split: str | None = typer.Option(None, "--split", help="Dataset split for hub datasets." + default("data.split")),
    text_field: str | None = typer.Option(None, "--text-field", help="Field holding the text (jsonl, parquet, hub)." + default("data.text_field")),
    mlp_label_densities: str | None = typer.Option(None, "--mlp-label-densities", help="Comma-separated top-k fractions to label MLP neurons at, e.g. 0.3,0.5."
                                                  + default("collect.mlp_label_densities")),
    down_inputs: bool | None = typer.Option(None, "--down-inputs/--no-down-inputs", help="Also keep each token's MLP "
                                            "down-projection input (fp8, one byte a neuron) and a copy of the down "
                                            "projections, for train-predictors' bce+output loss and its output-error "
                                            "metric; --no-down-inputs roughly halves the run." + default("collect.record_down_input")),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or auto (default: auto: cuda when there is a GPU)."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, bfloat16, float16 or auto (default: auto)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard an existing RUN/collect/ instead of resuming it."),
    config: str | None = ConfigOpt,
    debug: bool = DebugOpt,
):
    """Run the dense model over a corpus; record block inputs and label active neurons and heads."""
    densities = _numbers(mlp_label_densities, float, "--mlp-label-densities")
    cfg = build_config(config, {
        "model.name": model, "model.device": device, "model.dtype": dtype,
        "data.dataset": dataset, "data.seq_len": seq_len, "data.split": split, "data.text_field": text_field,
        "collect.max_tokens": max_tokens, "collect.batch_size": batch_size,
        "collect.mlp_label_densities": densities, "collect.record_down_input": down_inputs,
    })
    from dejavu.collect.collect import run_collect

    run_collect(cfg, Path(out), overwrite=overwrite)


@app.command("train-predictors")
@handle_errors
def train_predictors(
    run: Path = typer.Option(..., "--run", "-r", help="Run directory written by `dejavu collect`."),
    mlp_density: float | None = typer.Option(None, "--mlp-density", help="Top-k fraction of MLP neurons to train for, in (0, 1]." + default("train.mlp_density")),
    head_density: float | None = typer.Option(None, "--head-density", help="Top-k fraction of attention heads to train for, in (0, 1]." + default("train.head_density")),
    rank: int | None = typer.Option(None, "--rank", help="Low-rank width of each predictor." + default("train.rank")),
    epochs: int | None = typer.Option(None, "--epochs", help="Passes over each layer's training tokens." + default("train.epochs")),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (AdamW)." + default("train.lr")),
    mlp_pairing: str | None = typer.Option(None, "--mlp-pairing", help="current (layer l's own block input) or lookahead (layer l-1's)." + default("train.mlp_pairing")),
    head_pairing: str | None = typer.Option(None, "--head-pairing", help="current or lookahead (Deja Vu predicts heads one layer ahead)." + default("train.head_pairing")),
    loss: str | None = typer.Option(None, "--loss", help="bce, bce+rank, bce+output (BCE plus the share of the MLP's "
                                    "output the predicted set leaves out; needs a collect run with down inputs) or "
                                    "auto (bce+output where the run has them, else bce)." + default("train.loss")),
    overwrite: bool = typer.Option(False, "--overwrite", help="Retrain every layer instead of resuming finished ones."),
    cpu_threads: int | None = typer.Option(
        None, "--cpu-threads", help="CPU threads per process for shard loading (and CPU training); 0 (default): "
        "this machine's cores shared by its processes, overriding the OMP_NUM_THREADS=1 that launchers set."),
    config: str | None = ConfigOpt,
    debug: bool = DebugOpt,
):
    """Train one low-rank predictor per layer for MLP neurons and attention heads (Accelerate).

    Unset flags take the run's config (what `collect` ran with); the defaults shown are the shipped config's.
    """
    from dejavu.train.train import run_train

    run_train(Path(run), config_file=config, overrides={
        "train.mlp_density": mlp_density, "train.head_density": head_density, "train.rank": rank,
        "train.epochs": epochs, "train.lr": lr, "train.mlp_pairing": mlp_pairing,
        "train.head_pairing": head_pairing, "train.loss": loss, "train.cpu_threads": cpu_threads,
    }, overwrite=overwrite)


@app.command("tune-predictors")
@handle_errors
def tune_predictors(
    run: Path = typer.Option(..., "--run", "-r", help="Run directory holding predictors/ from `dejavu train-predictors`."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps." + default("tune.steps")),
    sequences: int | None = typer.Option(None, "--sequences", help="Sequences of data.seq_len tokens per step." + default("tune.sequences")),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (Adam, cosine decay)." + default("tune.lr")),
    mlp_density: float | None = typer.Option(
        None, "--mlp-density", help="MLP density to tune at, in (0, 1]; unset: what export gives the bundle by default "
        "(the config's export.mlp_density, else the trained density)."),
    head_density: float | None = typer.Option(
        None, "--head-density", help="Head density to tune at; unset: export.head_density, else the trained one. At 1.0 "
        "the head predictors are left as trained."),
    dataset: str | None = typer.Option(
        None, "--dataset", "-d", help="Calibration corpus (default: the one collect read). Its last --eval-sequences "
        "sequences are held out and measured before, every --eval-every steps and after."),
    eval_sequences: int | None = typer.Option(None, "--eval-sequences", help="Held-out sequences." + default("tune.eval_sequences")),
    eval_every: int | None = typer.Option(
        None, "--eval-every", help="Steps between held-out measurements; the predictors with the lowest held-out KL "
        "are written, the trained ones if nothing beats them (0: measure before and after only)."
        + default("tune.eval_every")),
    model: str | None = typer.Option(None, "--model", "-m", help="Model to tune against (default: the one the predictors were trained for)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or auto (default: the run's model.device)."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Model dtype while tuning: float32, bfloat16, float16 or auto (default: the run's "
        "model.dtype; auto is bfloat16 on cuda). The predictors stay float32."),
    mlp_selection: str | None = typer.Option(
        None, "--mlp-selection", help="The MLP selection to tune for: topk, or threshold (each step keeps the "
        "neurons scored above the quantile that keeps --mlp-density of each sequence's scores; export the result with "
        "--mlp-selection threshold)." + default("tune.mlp_selection")),
    mlp_candidate_density: float | None = typer.Option(
        None, "--mlp-candidate-density", help="With --mlp-selection threshold: tune two-stage score thresholds, "
        "the scores keeping this share of neurons for gate/up and each sequence's activation quantile --mlp-density "
        "for down (export with --mlp-selection threshold --mlp-candidate-density C). Unset: one stage."),
    mlp_compensation_rank: int | None = typer.Option(
        None, "--mlp-compensation-rank", min=0,
        help="Also learn an MLP compensation of this rank with the predictors: per layer, a low-rank linear map of "
             "the MLP's input added to the sparse MLP's output, for what the skipped neurons leave out; it starts "
             "at zero, and export carries it into the bundle. 0: none." + default("tune.mlp_compensation_rank")),
    mlp_compensation_lr: float | None = typer.Option(
        None, "--mlp-compensation-lr", help="Learning rate of the MLP compensation (unset: --lr), decayed alike."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start again: replace a finished RUN/tuned, or a checkpoint of other settings, "
        "instead of keeping it (a rerun with the same settings keeps a finished tuning and resumes an unfinished one)."),
    config: str | None = ConfigOpt,
    debug: bool = DebugOpt,
):
    """Tune every layer's predictors together against the dense model (KL of the next-token distribution).

    Writes RUN/tuned/ (the predictors' format); export it with `dejavu export --run RUN/tuned`. Optional: it
    loads the model and runs it forward and backward, so it costs far more than train-predictors per token.
    The model, corpus and densities come from the run; the tune settings from flags, then --config, then the
    built-in defaults (not from the run's stored config). Under torchrun or `accelerate launch` the
    processes share every step's sequences (--sequences a multiple of their number).
    """
    from dejavu.train.tune import run_tune

    run_tune(Path(run), config_file=config, model_name=model, overwrite=overwrite, overrides={
        "tune.steps": steps, "tune.sequences": sequences, "tune.lr": lr, "tune.mlp_density": mlp_density,
        "tune.head_density": head_density, "data.dataset": dataset, "tune.eval_sequences": eval_sequences,
        "tune.eval_every": eval_every, "model.device": device, "model.dtype": dtype,
        "tune.mlp_selection": mlp_selection, "tune.mlp_candidate_density": mlp_candidate_density,
        "tune.mlp_compensation_rank": mlp_compensation_rank, "tune.mlp_compensation_lr": mlp_compensation_lr,
    })


@app.command()
@handle_errors
def export(
    run: Path | None = typer.Option(
        None, "--run", "-r",
        help="Run directory holding predictors/ from `dejavu train-predictors`, or its tuned/ from `dejavu "
             "tune-predictors` (may be left out with "
             "--mlp-keep-input or --keep-layer-bytes: a bundle of thresholds alone; or with --mlp-predictor-bits)."),
    out: Path = typer.Option(
        ..., "--out", "-o",
        help="Bundle directory to write (safetensors + manifest.json): a new or empty directory, or an earlier "
             "bundle, which is replaced."),
    mlp_density: float | None = typer.Option(
        None, "--mlp-density", help="MLP density the runtime should compute, in (0, 1]; unset: the config's "
        "export.mlp_density, else the density the predictors were trained for." + default("export.mlp_density")),
    head_density: float | None = typer.Option(
        None, "--head-density", help="Head density the runtime should compute, in (0, 1]; unset: the config's "
        "export.head_density, else the trained one." + default("export.head_density")),
    mlp_candidate_density: float | None = typer.Option(
        None, "--mlp-candidate-density",
        help="Two-stage MLP selection default: predictor candidates at this density, final top-k by exact activation; "
             "with --mlp-selection threshold, score thresholds keep the candidates and per-layer thresholds on the "
             "activation keep --mlp-density for down (both calibrated now)."),
    mlp_keep_input: float | None = typer.Option(
        None, "--mlp-keep-input",
        help="Also store TEAL-style MLP thresholds, calibrated now on the config's data.dataset: keep this share "
             "of each token's MLP input and --mlp-density (default: the bundle's; 0.5 without --run) of down's input. `bench` "
             "then runs the MLP by them instead of predictors."),
    attn_keep_input: float | None = typer.Option(
        None, "--attn-keep-input",
        help="With --mlp-keep-input: attention thresholds too, keeping this share of q/k/v's and of o's input "
             "(replaces head selection)."),
    keep_layer_bytes: float | None = typer.Option(
        None, "--keep-layer-bytes",
        help="Store thresholds on every input of every layer (q/k/v, o, gate/up, down: TEAL's whole-model rule) "
             "that keep this share of each layer's weight bytes; how the share splits over the four inputs is "
             "searched per layer (greedy, least output error per byte) on the calibration corpus. Replaces "
             "--mlp-keep-input / --attn-keep-input and head selection."),
    mlp_selection: str | None = typer.Option(
        None, "--mlp-selection",
        help="topk: the runtime keeps each token's top --mlp-density neurons by predictor score; threshold: it keeps "
             "those scored above per-layer thresholds, calibrated now (model loaded, predictors run sparse on "
             "--calibration) to keep --mlp-density on average; confident tokens keep fewer neurons, uncertain ones "
             "more." + default("export.mlp_selection")),
    mlp_compensation_rank: int | None = typer.Option(
        None, "--mlp-compensation-rank", min=0,
        help="Also fit and store an MLP compensation of this rank: per layer, a low-rank linear map of the MLP's "
             "input for what the predicted neurons leave out, fitted now by ridge regression on --calibration with "
             "the bundle's selection rule (model loaded). Its bytes are read every token: rank R costs 2 x R x hidden "
             "values a layer. 0: none." + default("export.mlp_compensation_rank")),
    mlp_predictor_bits: int | None = typer.Option(
        None, "--mlp-predictor-bits",
        help="MLP predictors made from the model's own gate and up weights quantized to this many bits (4 or 8), no "
             "collect or training. The runtime keeps each token's top --mlp-density (default 0.5) neurons by "
             "|act(gate~) * up~| on the MLP's input. Without --run heads run dense; with --run the run's head "
             "predictors stay and its MLP predictors give way. They cost bits/16 of gate and up's bytes every "
             "token (4 bits: 0.18 of a gated MLP's bytes); the decode loop scores them with PyTorch's int4 matmul "
             "(CUDA in bf16, CPU) or a Triton kernel."),
    mlp_predictor_group: int | None = typer.Option(
        None, "--mlp-predictor-group",
        help="With --mlp-predictor-bits: inputs sharing one fp16 scale (a power of two of at least 8 that divides the hidden "
             "size; 32-256 for PyTorch's int4 matmul)."
             + default("export.mlp_predictor_group")),
    calibration: str | None = typer.Option(
        None, "--calibration", help="Corpus the thresholds and the MLP compensation are calibrated on (default: the "
        "config's data.dataset)."),
    calibration_tokens: int | None = typer.Option(
        None, "--calibration-tokens",
        help="Tokens of the calibration corpus the thresholds (and a fitted MLP compensation) are set on (fewer: a "
             "faster, noisier calibration)." + default("export.calibration_tokens")),
    model: str | None = typer.Option(
        None, "--model", "-m",
        help="Model to calibrate thresholds or fit the MLP compensation on, or to quantize with --mlp-predictor-bits "
             "(default: the training run's model; without --run, the config's)."),
    config: str | None = ConfigOpt,
    debug: bool = DebugOpt,
):
    """Write a self-describing predictor bundle (safetensors + manifest; no pickle).

    --run RUN reads RUN/predictors/; --run RUN/tuned the predictors `dejavu tune-predictors` tuned."""
    from dejavu.export.bundle import run_export

    if mlp_keep_input is None and keep_layer_bytes is None:
        # --model with --run names the model to quantize when --mlp-predictor-bits asks for copies
        _check_rule_flags(config, "export", calibration, model if run is not None and mlp_predictor_bits is None else None,
                          calibration_tokens=calibration_tokens, mlp_selection=mlp_selection,
                          compensation_rank=mlp_compensation_rank, run=run)
    run_export(Path(run) if run is not None else None, Path(out), config_file=config, model_name=model, overrides={
        "export.mlp_density": mlp_density, "export.head_density": head_density,
        "export.mlp_candidate_density": mlp_candidate_density, "export.mlp_keep_input": mlp_keep_input,
        "export.attn_keep_input": attn_keep_input, "export.keep_layer_bytes": keep_layer_bytes,
        "data.dataset": calibration, "export.calibration_tokens": calibration_tokens,
        "export.mlp_selection": mlp_selection, "export.mlp_compensation_rank": mlp_compensation_rank,
        "export.mlp_predictor_bits": mlp_predictor_bits, "export.mlp_predictor_group": mlp_predictor_group,
    })


@app.command()
@handle_errors
def bench(
    model: str | None = ModelOpt,
    bundle: Path | None = BundleOpt,
    dataset: str | None = typer.Option(
        None, "--dataset", "-d",
        help="Evaluation corpus for perplexity and agreement: a datasets hub id (its test split) or local "
             ".txt/.jsonl/.parquet file, dir or glob (default: ../shared/data/wikitext-2-raw/wiki.test.raw beside "
             "the repository)."),
    eval_split: str | None = typer.Option(
        None, "--eval-split", help="Split of a hub evaluation corpus." + default("runtime.eval_split")),
    eval_text_field: str | None = typer.Option(
        None, "--eval-text-field",
        help="Field holding the text of a hub, jsonl or parquet evaluation corpus (default: the config's "
             "data.text_field, 'text')."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the report as JSON here (a PNG plot goes beside it)."),
    mlp_density: float | None = MlpDensityOpt,
    head_density: float | None = HeadDensityOpt,
    mlp_candidate_density: float | None = MlpCandidateDensityOpt,
    mlp_up_weight: float | None = MlpUpWeightOpt,
    mlp_selection: str | None = MlpSelectionOpt,
    mlp_compensation: bool | None = MlpCompensationOpt,
    skip_kv: bool | None = SkipKvOpt,
    mlp_keep_input: float | None = MlpKeepInputOpt,
    attn_keep_input: float | None = AttnKeepInputOpt,
    keep_layer_bytes: float | None = KeepLayerBytesOpt,
    calibration: str | None = CalibrationOpt,
    calibration_tokens: int | None = CalibrationTokensOpt,
    max_eval_tokens: int | None = typer.Option(None, "--max-eval-tokens", help="Bound on evaluated tokens." + default("runtime.max_eval_tokens")),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    selection: str | None = SelectionOpt,
    batch_sizes: str | None = typer.Option(None, "--batch-sizes", help="Comma-separated decode batch sizes for speed, e.g. 1,4,8." + default("runtime.batch_sizes")),
    prompt_len: int | None = typer.Option(
        None, "--prompt-len",
        help="Speed: tokens of context before the timed decode; attention reads a cache this long (default 16)."),
    decode_tokens: int | None = typer.Option(
        None, "--decode-tokens",
        help="Speed: decode steps timed per rule and batch size (more: steadier figures)." + default("runtime.decode_tokens")),
    warmup: int | None = typer.Option(
        None, "--warmup", help="Speed: untimed steps before timing." + default("runtime.warmup")),
    synthetic: str | None = typer.Option(None, "--synthetic", help="Random weights at a real model's shapes: speed only. Presets: llama-2-7b, llama-3-8b, mistral-7b, mistral-7b-v0.1, qwen2-7b, qwen3-8b, phi-3-mini, gemma-2-9b, gemma-3-12b, olmo-2-7b, granite-3-8b, opt-6.7b, gpt2-xl, pythia-6.9b, pythia-2.8b, smollm2-135m."),
    layers: int | None = typer.Option(
        None, "--layers", help="With --synthetic: keep only the first N decoder layers (quick or CPU runs)."),
    quality: bool = typer.Option(True, "--quality/--no-quality", help="Measure perplexity, agreement and KL."),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="Measure decode speed."),
    config: str | None = ConfigOpt,
    debug: bool = DebugOpt,
):
    """Load model + bundle into the runtime; report speed and quality against dense."""
    from dejavu.runtime.bench import run_bench

    sizes = _numbers(batch_sizes, int, "--batch-sizes")
    if synthetic and (calibration is not None or calibration_tokens is not None):
        from dejavu.errors import DejavuError
        from dejavu.runtime.thresholds import RANDOM_CALIBRATION_TOKENS

        raise DejavuError(f"--synthetic calibrates any thresholds on {RANDOM_CALIBRATION_TOKENS} random tokens through "
                          "its random model (no corpus fits random weights): drop --calibration / --calibration-tokens")
    if mlp_keep_input is None and keep_layer_bytes is None:
        _check_rule_flags(config, "runtime", calibration, selection=selection,
                          densities=(mlp_density, head_density, mlp_candidate_density),
                          calibration_tokens=calibration_tokens, mlp_selection=mlp_selection, bundle=bundle,
                          mlp_compensation=mlp_compensation)
    ignored = [flag for flag, value, used in (("--prompt-len", prompt_len, speed), ("--batch-sizes", batch_sizes, speed),
                                              ("--decode-tokens", decode_tokens, speed), ("--warmup", warmup, speed),
                                              ("--max-eval-tokens", max_eval_tokens, quality)) if value is not None and not used]
    if ignored:
        typer.echo(f"note: {', '.join(ignored)} set what a measurement switched off here would use; not used", err=True)
    run_bench(
        model=model, bundle=bundle, dataset=dataset, json_out=json_out, config_file=config,
        overrides={
            **_rule_overrides(mlp_density, head_density, mlp_candidate_density, mlp_up_weight, skip_kv,
                              mlp_keep_input, attn_keep_input, keep_layer_bytes, calibration, device, dtype,
                              selection, mlp_selection, mlp_compensation),
            "runtime.max_eval_tokens": max_eval_tokens, "runtime.eval_split": eval_split,
            "runtime.eval_text_field": eval_text_field, "runtime.batch_sizes": sizes, "runtime.prompt_len": prompt_len,
            "runtime.calibration_tokens": calibration_tokens, "runtime.decode_tokens": decode_tokens,
            "runtime.warmup": warmup,
        },
        synthetic=synthetic, layers=layers, quality=quality, speed=speed,
    )


@app.command()
@handle_errors
def generate(
    prompts: list[str] = typer.Option(
        [], "--prompt", "-p", help="Text to continue; repeat the flag for several prompts (run one after another, "
        "or --batch-size at a time)."),
    prompt_file: Path | None = typer.Option(
        None, "--prompt-file", help="A text file of prompts, one per line (blank lines skipped), after any --prompt; "
        "'-' reads standard input."),
    model: str | None = ModelOpt,
    bundle: Path | None = BundleOpt,
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Most tokens to generate per prompt."),
    temperature: float = typer.Option(
        0.0, "--temperature", help="0: greedy (the same tokens every run); above 0: sample at this temperature."),
    top_p: float = typer.Option(1.0, "--top-p", help="When sampling: draw only from the smallest set of tokens whose "
                                "probability reaches this, in (0, 1]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling generator (sampled runs repeat with it)."),
    chat: bool = typer.Option(False, "--chat/--no-chat", help="Wrap each prompt as a user turn in the tokenizer's "
                              "chat template (instruct models)."),
    compare_dense: bool = typer.Option(
        False, "--compare-dense", help="Also generate dense with the same engine and print both, with their speed."),
    engine: str = typer.Option(
        "auto", "--engine", help="decode-loop (Llama family: static KV cache, CUDA graph on GPU, sparse kernels), "
        "hooks (any family: Hugging Face's forward with the reference runtime), or auto (the decode loop where "
        "it runs)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the generations and settings as JSON here."),
    stream: bool | None = typer.Option(
        None, "--stream/--no-stream", help="Print the text as it is generated (default: when the output is a "
        "terminal and --batch-size is 1). The decode loop hands over tokens 16 at a time."),
    batch_size: int = typer.Option(
        1, "--batch-size", help="Generate this many prompts together: shorter ones are left-padded and each step "
        "computes one token of every prompt. The decode loop's predictors then pick one set of neurons and heads "
        "for the whole batch (the top-k of its scores; MLP score thresholds apply at batch 1 only); "
        "the hooks keep each prompt's own."),
    mlp_density: float | None = MlpDensityOpt,
    head_density: float | None = HeadDensityOpt,
    mlp_candidate_density: float | None = MlpCandidateDensityOpt,
    mlp_up_weight: float | None = MlpUpWeightOpt,
    mlp_selection: str | None = MlpSelectionOpt,
    mlp_compensation: bool | None = MlpCompensationOpt,
    skip_kv: bool | None = SkipKvOpt,
    mlp_keep_input: float | None = MlpKeepInputOpt,
    attn_keep_input: float | None = AttnKeepInputOpt,
    keep_layer_bytes: float | None = KeepLayerBytesOpt,
    calibration: str | None = CalibrationOpt,
    calibration_tokens: int | None = CalibrationTokensOpt,
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    selection: str | None = SelectionOpt,
    config: str | None = ConfigOpt,
    debug: bool = DebugOpt,
):
    """Generate text with a bundle applied: the prompt runs dense, every new token sparse."""
    from dejavu.runtime.generate import run_generate

    if mlp_keep_input is None and keep_layer_bytes is None:
        _check_rule_flags(config, "runtime", calibration, selection=selection,
                          densities=(mlp_density, head_density, mlp_candidate_density),
                          skip_kv=skip_kv, engine=engine, mlp_selection=mlp_selection, bundle=bundle,
                          calibration_tokens=calibration_tokens, mlp_compensation=mlp_compensation)
    if temperature == 0 and top_p != 1.0 and 0.0 < top_p <= 1.0:  # an invalid one is refused below instead
        typer.echo("note: --top-p applies only when sampling (--temperature above 0); decoding greedily", err=True)
    run_generate(
        prompts, prompt_file=prompt_file, model=model, bundle=bundle, config_file=config, json_out=json_out, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed, chat=chat, compare_dense=compare_dense, engine=engine, stream=stream,
        batch_size=batch_size,
        overrides={**_rule_overrides(mlp_density, head_density, mlp_candidate_density, mlp_up_weight, skip_kv,
                                     mlp_keep_input, attn_keep_input, keep_layer_bytes, calibration, device, dtype,
                                     selection, mlp_selection, mlp_compensation),
                   "runtime.calibration_tokens": calibration_tokens},
    )


@app.command()
@handle_errors
def compare(
    reports: list[Path] = typer.Argument(
        ..., metavar="REPORT.json", help="Bench reports: the JSON files `dejavu bench --json` writes."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the table as JSON here."),
    config: str | None = typer.Option(
        None, "--config", "-c", help="Accepted as by every command; compare has no settings of its own, so the "
        "file is only checked."),
    debug: bool = DebugOpt,
):
    """Several bench reports side by side: one line per sparse rule, its bytes, quality and speed."""
    from dejavu.runtime.compare import run_compare

    if config is not None:
        build_config(config, {})
    run_compare(reports, json_out=json_out)


def _usage_errors():
    try:  # typer vendors click from 0.2x on; older releases use the click package
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:  # pragma: no cover - depends on the installed typer
        from click.exceptions import NoArgsIsHelpError, UsageError
    return NoArgsIsHelpError, UsageError


def main(argv: list[str] | None = None) -> int:
    """The `dejavu` console entry point: click's usage errors (an unknown flag, a missing or malformed
    value) become one `error: ...` line too, with exit status 2 as click gives them."""
    if not sys.stderr.isatty():
        # in a log file every redraw of a progress bar is kept: one every 30 s instead of ten a second
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    no_args, usage_error = _usage_errors()
    try:
        code = app(args=argv, prog_name="dejavu", standalone_mode=False)
    except no_args as exc:  # bare `dejavu`: the help, as no_args_is_help promises
        typer.echo(exc.format_message())
        return 0
    except usage_error as exc:
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        typer.echo(f"error: {exc.format_message().rstrip('.')}{where}", err=True)
        return exc.exit_code
    except typer.Abort:
        typer.echo("interrupted", err=True)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
