"""`dejavu bench`: quality (perplexity, agreement, KL, generations) and speed of a bundle vs dense.

Speed comes from runtime/speed.py (the decode loop and kernels). Families the decode loop does not
cover (OPT, GPT-2, GPT-NeoX, Gemma 2/3) are timed with Hugging Face eager greedy decode instead (dense
vs the reference gather path), and the report says so.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from dejavu.errors import DejavuError
from dejavu.models.loading import dtype_name
from dejavu.quantized_predictor import MLP_INPUT

CONTRACT_KEYS = ("model", "device", "dtype", "batch_size", "mlp_density", "head_density", "dense.ppl", "sparse.ppl",
                 "dense.ms_per_token", "sparse.ms_per_token", "speedup", "top1_agreement", "synthetic")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 1.0


@torch.no_grad()
def _fallback_speed(model, adapter, predictors, *, device, dtype, batch_sizes, decode_tokens, warmup,
                    prompt_len, mlp_candidate_density: float | None = None) -> dict:
    """HF eager greedy decode: dense vs the reference gather path (MLP rows only; heads masked). The
    candidate density applies with the predictors' down thresholds (two-stage score thresholds) only."""
    from dejavu.runtime.apply import SparseRuntime

    def timed(runtime, batch: int) -> float:
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
        out = model(input_ids=ids, use_cache=True)
        past, step = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for i in range(warmup + decode_tokens):
            if i == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            out = model(input_ids=step, past_key_values=past, use_cache=True)
            past, step = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000 / max(decode_tokens, 1)

    batches = {}
    for b in batch_sizes:
        dense_ms = timed(None, b)
        sparse_ms = None
        if predictors is not None:
            cut = predictors.mlp_down_thresholds
            with SparseRuntime(model, adapter, predictors, mode="gather",
                               mlp_score_thresholds=predictors.mlp_score_thresholds, mlp_down_thresholds=cut,
                               mlp_candidate_density=mlp_candidate_density if cut is not None else None,
                               mlp_compensation=predictors.mlp_compensation) as runtime:
                sparse_ms = timed(runtime, b)
        batches[str(b)] = {"dense_ms_per_token": dense_ms, "sparse_ms_per_token": sparse_ms,
                           "speedup": dense_ms / sparse_ms if sparse_ms else None}
    first = batches[str(batch_sizes[0])]
    return {"batches": batches, "hf_eager_ms_per_token": first["dense_ms_per_token"],
            "method": "HF eager decode, dense vs the reference gather path (no fast decode loop for this family)"}


def check_speed_context(model, rt) -> None:
    """Refuse, before any measuring, a timed decode that would run past the model's context."""
    from dejavu.runtime.quality import model_context
    from dejavu.runtime.speed import cache_length

    longest = cache_length(rt.prompt_len, rt.warmup, rt.decode_tokens)
    if longest > model_context(model):
        raise DejavuError(f"--prompt-len {rt.prompt_len} with {rt.warmup} warm-up and {rt.decode_tokens} timed "
                          f"tokens reaches position {longest}, past the model's context of {model_context(model)}")


def measure_speed(model, adapter, predictors, *, device, dtype, batch_sizes, decode_tokens, warmup, prompt_len,
                  mlp_candidate_density: float | None = None, mlp_up_weight: float | None = None,
                  skip_kv: bool = False, thresholds=None) -> dict:
    from dejavu.runtime.decode import SUPPORTED_MODEL_TYPES
    from dejavu.runtime.speed import speed_report

    model_type = getattr(model.config, "model_type", "")
    common = dict(device=device, dtype=dtype, batch_sizes=batch_sizes, decode_tokens=decode_tokens, warmup=warmup,
                  prompt_len=prompt_len)
    if model_type not in SUPPORTED_MODEL_TYPES:
        warnings.warn(f"no fast decode loop for {model_type!r} models yet; timing HF eager decode instead",
                      stacklevel=2)
        if thresholds is not None:
            raise DejavuError(f"MLP thresholds are timed only in the fast decode loop, which does not run "
                              f"{model_type!r} models; use --no-speed")
        down_cut = predictors is not None and predictors.mlp_down_thresholds is not None
        if (mlp_candidate_density is not None and not down_cut) or mlp_up_weight is not None or skip_kv:
            warnings.warn("the HF eager timing runs the predictor's own selection with every k/v; two-stage top-k, "
                          "exact-up and skip_kv are timed only in the fast loop", stacklevel=2)
        return _fallback_speed(model, adapter, predictors, mlp_candidate_density=mlp_candidate_density, **common)
    return speed_report(model, adapter, predictors, mlp_candidate_density=mlp_candidate_density,
                        mlp_up_weight=mlp_up_weight, skip_kv=skip_kv, thresholds=thresholds, **common)


def _flatten(nested: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key in ("dense", "sparse"):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def build_report(base: dict, quality: dict | None, speed: dict | None, batch_size: int) -> dict:
    first = None
    if speed:
        batches = speed.get("batches") or {}
        first = batches.get(str(batch_size)) or (next(iter(batches.values())) if batches else None)
    q = quality or {}
    report = {
        **base,
        "batch_size": batch_size,
        "dense": {"ppl": q.get("dense_ppl"), "ms_per_token": first and first.get("dense_ms_per_token")},
        "sparse": {"ppl": q.get("sparse_ppl"), "ms_per_token": first and first.get("sparse_ms_per_token")},
        "speedup": first and first.get("speedup"),
        "top1_agreement": q.get("top1_agreement"),
        "kl": q.get("kl"),
        "quality": quality,
        "speed": speed,
    }
    # The contract names keys like `dense.ppl`; readers differ on whether that means a nested path
    # or a literal key, so both forms are written and both read the same numbers.
    report.update(_flatten({"dense": report["dense"], "sparse": report["sparse"]}))
    return report


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def rule_lines(report: dict) -> list[str]:
    """The sparse rule a report (or a generation's settings) describes, as indented lines."""
    two = report.get("mlp_candidate_density")
    scored = report.get("mlp_selection") == "threshold"
    second = "down rows by per-layer thresholds on the activation" if scored else "final top-k by exact activation"
    selection = report.get("selection")
    if selection == "dense" and report.get("thresholds"):  # (the heads' selection: the thresholds rule the rest)
        selection = "by magnitude thresholds, every head"
    lines = [f"  selection {selection}{' (tuned predictors)' if report.get('tuned') else ''}, MLP density {_fmt(report['mlp_density'], 'g')}, "
             f"head density {_fmt(report['head_density'], 'g')}"
             + (f", two-stage MLP (predictor candidates {two:g}, {second})" if two else "")
             + (f", exact-up MLP (log|up| + {report['mlp_up_weight']:g} x predictor logit)"
                if report.get("mlp_up_weight") is not None else "")]
    st = report.get("mlp_score_thresholds")
    if st:
        lines.append("  MLP neurons: those scored above per-layer thresholds ("
                     + ("the bundle's, " if st.get("from_bundle") else "")
                     + f"calibrated on {st.get('calibration_tokens')} tokens of {st.get('calibration')} to keep the "
                     + ("candidate density on average; the down thresholds keep the MLP density), not a top-k" if two
                        else "MLP density on average), not a top-k"))
    t = report.get("thresholds")
    allocation = (t or {}).get("allocation")
    if allocation:
        means = {k: sum(v) / len(v) for k, v in allocation["layer_shares"].items()}
        lines.append(f"  magnitude thresholds (no predictor) on every layer input, calibrated on "
                     f"{t['calibration_tokens']} tokens of {t['calibration']} to keep {allocation['layer_bytes']:g} "
                     f"of each layer's weight bytes; split per layer by greedy search, mean shares kept: q/k/v input "
                     f"{means['attn_x']:.2f}, o input {means['attn_o']:.2f}, MLP input {means['x']:.2f}, down input "
                     f"{means['h']:.2f}")
    elif t:
        lines.append(f"  MLP by magnitude thresholds (no predictor): calibrated on {t['calibration_tokens']} tokens "
                     f"of {t['calibration']} to keep {t['keep_input']:g} of the MLP input and "
                     f"{t['keep_down_input']:g} of down's input")
        if t.get("keep_attn_input") is not None:
            lines.append(f"  attention by magnitude thresholds: keep {t['keep_attn_input']:g} of q/k/v's input and "
                         f"of o's input (every head computed)")
    return lines


def print_report(report: dict, out=None) -> None:
    out = out or sys.stdout  # looked up per call, so redirected/captured stdout gets the report
    p = lambda s="": print(s, file=out)  # noqa: E731
    p(f"dejavu bench: {report['model']} on {report['device']} ({report['dtype']})"
      f"{'  [synthetic weights: speed only]' if report['synthetic'] else ''}")
    for line in rule_lines(report):
        p(line)
    q = report.get("quality")
    if q:
        p(f"  quality on {q['scored_tokens']} tokens of {q['dataset']} (windows of {q['window']}, stride "
          f"{q['stride']}; every token sparse):")
        p(f"    perplexity   dense {q['dense_ppl']:.3f}   sparse {q['sparse_ppl']:.3f}   "
          f"({(q['sparse_ppl'] / q['dense_ppl'] - 1) * 100:+.2f} %)")
        p(f"    top-1 agreement {q['top1_agreement']:.4f}   mean KL(dense||sparse) {q['kl']:.4f}")
        sel = q.get("computed")
        if sel:
            p(f"    computed: {sel['mlp_kept']:.3f} of MLP neurons, {sel['head_kept']:.3f} of heads; "
              f"{sel['kv_groups_skippable']:.3f} of KV groups skippable")
            if "mlp_weight_share" in sel and report.get("thresholds"):
                p(f"    MLP weight bytes read: {sel['mlp_weight_share']:.3f} of dense (gate/up columns for "
                  f"{sel['mlp_candidates_kept']:.3f} of the input, down rows for {sel['mlp_kept']:.3f})")
            elif "mlp_weight_share" in sel and report.get("mlp_up_weight") is not None:
                p(f"    MLP weight bytes read: {sel['mlp_weight_share']:.3f} of dense (up for every neuron, "
                  f"gate and down for {sel['mlp_kept']:.3f})")
            elif "mlp_weight_share" in sel:
                p(f"    MLP weight bytes read: {sel['mlp_weight_share']:.3f} of dense (gate/up for "
                  f"{sel['mlp_candidates_kept']:.3f} of neurons, down for {sel['mlp_kept']:.3f})")
            quantized = report.get("mlp_predictor")
            if quantized:
                p(f"    MLP predictors: {quantized['bits']}-bit copies of gate and up, "
                  f"{quantized['share_of_mlp_bytes']:.3f} of the MLP's bytes every token on top of the above")
            if "attn_input_kept" in sel:
                p(f"    attention: {sel['attn_input_kept']:.3f} of q/k/v's input kept (columns read), "
                  f"{sel['attn_o_kept']:.3f} of o's input (rows read)")
        for g in q.get("generations", []):
            p(f"    prompt: {g['prompt']!r}")
            p(f"      dense : {g['dense']!r}")
            p(f"      sparse: {g['sparse']!r}")
    s = report.get("speed")
    if s:
        kv = "" if s.get("kv_for_all_heads", True) else "; k/v of the read KV groups only, filled lazily"
        p(f"  speed ({s.get('method', 'runtime.speed')}{kv}):")
        for b, row in (s.get("batches") or {}).items():
            p(f"    batch {b}: dense {_fmt(row.get('dense_ms_per_token'), '.2f')} ms/token, sparse "
              f"{_fmt(row.get('sparse_ms_per_token'), '.2f')} ms/token, speedup "
              f"{_fmt(row.get('speedup'), '.2f') + ('x' if row.get('speedup') is not None else '')}"
              + (f" (MLP neurons computed: {row['sparse_mlp_share_read']:.3f} of them"
                 + (f", down rows read for {row['sparse_mlp_down_share_read']:.3f}"
                    if row.get("sparse_mlp_down_share_read") is not None else "")
                 + ", the mean over the timed steps)" if row.get("sparse_mlp_share_read") is not None else ""))
        if (report.get("mlp_selection") == "threshold" and "method" not in s  # (the eager fallback keeps each's own)
                and any(int(b) > 1 for b in (s.get("batches") or {}))):
            p("    (at batch > 1 the decode loop runs the batch's top-k of its scores: score thresholds are a "
              "batch-1 rule" + ("; down thresholds still cut each sequence's activations" if report.get(
                  "mlp_candidate_density") else "") + ")")


def run_bench(model: str | None = None, bundle: Path | None = None, dataset: str | None = None,
              json_out: Path | None = None, config_file=None, overrides: dict[str, Any] | None = None,
              synthetic: str | None = None, layers: int | None = None, quality: bool = True,
              speed: bool = True) -> dict:
    from dejavu.config import load_config
    from dejavu.models.loading import resolve_device, resolve_dtype

    cfg = load_config(config_file, overrides or {})
    if json_out is not None:  # before minutes of measuring, not after
        from dejavu.artifacts import check_report_path
        from dejavu.config import report_inputs
        from dejavu.runtime.plot import plot_path
        from dejavu.runtime.quality import default_eval_dataset

        inputs = report_inputs(config_file, cfg, bundle, model,
                               dataset or (None if synthetic else default_eval_dataset()))
        check_report_path(json_out, inputs=inputs, beside=plot_path(json_out))
    rt = cfg.runtime
    if not quality and not speed:
        raise DejavuError("--no-quality and --no-speed leave nothing to measure")
    if synthetic and (bundle is not None or dataset is not None):
        raise DejavuError("--synthetic builds random weights and random predictors and measures speed only: "
                          "drop --bundle / --dataset")
    if synthetic and not speed:
        raise DejavuError("--synthetic builds random weights and measures speed only: drop --no-speed")
    from dejavu.runtime.plan import check_selection_flags

    check_selection_flags(cfg, synthetic=bool(synthetic))
    device = resolve_device(rt.device if rt.device != "auto" else cfg.model.device)
    dtype = resolve_dtype(rt.dtype if rt.dtype != "auto" else cfg.model.dtype, device)
    batch_sizes = rt.batch_sizes or [1]
    if synthetic:
        report = _synthetic_bench(synthetic, layers, device, dtype, cfg, batch_sizes, speed)
    else:
        if layers is not None:
            raise DejavuError("--layers applies to --synthetic runs only (a bundle is made for the whole model)")
        report = _model_bench(model, bundle, dataset, cfg, device, dtype, batch_sizes, quality, speed)
    print_report(report)
    if json_out is not None:
        from dejavu.artifacts import atomic_write_json

        atomic_write_json(json_out, report)
        print(f"  JSON report: {json_out}")
        from dejavu.runtime.plot import plot_path, write_speed_plot

        if write_speed_plot(report, plot_path(json_out)) is not None:
            print(f"  plot: {plot_path(json_out)}")
        else:
            if plot_path(json_out).is_file():  # an earlier run's plot of this report would now describe nothing here
                plot_path(json_out).unlink()
                print(f"  removed the earlier plot {plot_path(json_out)} (this run measured no speed to plot)"
                      if not report.get("speed") else f"  removed the earlier plot {plot_path(json_out)}")
            if report.get("speed"):
                print("  no plot: matplotlib is not installed (pip install 'dejavu[plot]')")
    return report


def _synthetic_bench(name, layers, device, dtype, cfg, batch_sizes, speed) -> dict:
    from dejavu.runtime.synthetic import build_synthetic

    mlp_d = cfg.runtime.mlp_density or cfg.export.mlp_density or cfg.train.mlp_density
    head_d = cfg.runtime.head_density or cfg.export.head_density or cfg.train.head_density
    model, adapter, predictors = build_synthetic(name, layers, device, dtype, mlp_d, head_d)
    if speed:
        check_speed_context(model, cfg.runtime)
    from dejavu.runtime.thresholds import RANDOM_CALIBRATION_TOKENS

    # thresholds of either kind come from the random model's own activations over random tokens (no corpus fits
    # random weights)
    random_calibration = {"calibration": "random text through the synthetic model",
                          "calibration_tokens": RANDOM_CALIBRATION_TOKENS}
    thresholds = None
    if cfg.runtime.mlp_keep_input is not None or cfg.runtime.keep_layer_bytes is not None:
        from dejavu.runtime.thresholds import calibrate_on_random_tokens

        thresholds = calibrate_on_random_tokens(model, adapter, cfg.runtime.mlp_keep_input,
                                                cfg.runtime.mlp_density or 0.5,
                                                keep_attn=cfg.runtime.attn_keep_input,
                                                layer_bytes=cfg.runtime.keep_layer_bytes)
        mlp_d = thresholds.keep_h
        if thresholds.attention:
            head_d = 1.0
            predictors = predictors.with_densities(None, 1.0)
    score_calibration = None
    if cfg.runtime.mlp_selection == "threshold":
        if thresholds is not None or cfg.runtime.mlp_up_weight:
            raise DejavuError("--mlp-selection threshold is an MLP rule of its own: drop the magnitude thresholds "
                              "and --mlp-up-weight")
        from dejavu.runtime.score_thresholds import calibrate_score_thresholds, calibrate_two_stage
        from dejavu.runtime.thresholds import random_calibration_ids

        ids, cand = random_calibration_ids(model), cfg.runtime.mlp_candidate_density
        if cand is None:
            predictors.mlp_score_thresholds = calibrate_score_thresholds(model, adapter, predictors, ids,
                                                                         RANDOM_CALIBRATION_TOKENS)
        else:
            predictors.mlp_score_thresholds, predictors.mlp_down_thresholds = calibrate_two_stage(
                model, adapter, predictors, ids, RANDOM_CALIBRATION_TOKENS, cand)
            predictors.mlp_candidate_density = cand
        score_calibration = random_calibration
    speed_data = None
    if speed:
        speed_data = measure_speed(model, adapter, predictors, device=device, dtype=dtype, batch_sizes=batch_sizes,
                                   decode_tokens=cfg.runtime.decode_tokens, warmup=cfg.runtime.warmup,
                                   prompt_len=cfg.runtime.prompt_len,
                                   mlp_candidate_density=cfg.runtime.mlp_candidate_density,
                                   mlp_up_weight=cfg.runtime.mlp_up_weight, skip_kv=cfg.runtime.skip_kv,
                                   thresholds=thresholds)
    base = {"model": name, "device": str(device), "dtype": dtype_name(dtype), "mlp_density": mlp_d,
            "head_density": head_d, "synthetic": True,
            "mlp_selection": "threshold" if score_calibration is not None else None,
            "mlp_score_thresholds": score_calibration,
            "selection": "predictor (random weights)" if thresholds is None else
            "thresholds, no predictor" if thresholds.attention else "MLP thresholds, heads by predictor (random weights)",
            "mlp_candidate_density": cfg.runtime.mlp_candidate_density, "mlp_up_weight": cfg.runtime.mlp_up_weight,
            "layers": layers,
            "thresholds": None if thresholds is None else {
                **thresholds.describe(),
                **random_calibration}}
    return build_report(base, None, speed_data, batch_sizes[0])


def _model_bench(model_name, bundle, dataset, cfg, device, dtype, batch_sizes, quality, speed) -> dict:
    from dejavu.models.adapters import adapter_for
    from dejavu.models.loading import load_model
    from dejavu.runtime.plan import check_flags, model_to_load, read_bundle, resolve_plan, revision_to_load
    from dejavu.runtime.quality import compare, default_eval_dataset, eval_tokens, generations, model_context

    rt = cfg.runtime
    manifest, predictors = read_bundle(bundle)
    check_flags(cfg, predictors, "bench")
    scored = (rt.mlp_selection or (manifest or {}).get("mlp_selection")) == "threshold"
    if (speed and rt.selection == "predictor" and scored and predictors is not None
            and predictors.mlp_pairing == MLP_INPUT):  # before the model loads and the thresholds calibrate
        raise DejavuError("the decode loop runs quantized-weight MLP predictors with a top-k, not score thresholds: "
                          "add --no-speed to measure their quality")
    model, tokenizer, source = load_model(model_to_load(model_name, manifest, cfg), device=str(device),
                                          dtype=dtype_name(dtype), revision=revision_to_load(model_name, manifest, cfg),
                                          trust_remote_code=cfg.model.trust_remote_code)
    if speed:
        check_speed_context(model, cfg.runtime)
    adapter = adapter_for(model)
    plan = resolve_plan(cfg, manifest, predictors, model, adapter, tokenizer, bundle)
    base = {"model": source.display, "device": str(device), "dtype": dtype_name(dtype), "synthetic": False,
            **plan.description}
    quality_data = None
    if quality:
        dataset = dataset or default_eval_dataset()
        if dataset is None:
            raise DejavuError("no evaluation corpus: pass --dataset (e.g. ../shared/data/wikitext-2-raw/wiki.test.raw)")
        window = min(model_context(model), rt.eval_window)
        stride = min(rt.eval_stride, window)
        tokens = eval_tokens(tokenizer, dataset, rt.max_eval_tokens, rt.eval_text_field or cfg.data.text_field,
                             rt.eval_split)
        if len(tokens) < rt.max_eval_tokens:
            print(f"  note: {dataset} holds only {len(tokens)} tokens (--max-eval-tokens {rt.max_eval_tokens}); "
                  "quality figures on so few are noisy", flush=True)
        # Explicit densities from flags override the bundle's per-layer ones; otherwise keep those.
        with plan.hooks(model, adapter) as runtime:
            t0 = time.perf_counter()
            quality_data = compare(model, runtime, tokens, window, stride)
            quality_data["computed"] = runtime.stats.summary()
            quality_data["generations"] = generations(model, tokenizer, runtime, 24, rt.sparse_prefill)
            quality_data["seconds"] = time.perf_counter() - t0
        quality_data.update({
            "dataset": dataset, "window": window, "stride": stride,
            "sparse_tokens": "every evaluated token (scored and context) in perplexity, agreement and KL; in "
                             "generations " + ("prompt and generated tokens" if rt.sparse_prefill else
                                               "the generated tokens (prompt dense)"),
        })
    speed_data = None
    if speed:
        speed_data = measure_speed(model, adapter, plan.decode_predictors(), device=device, dtype=dtype,
                                   batch_sizes=batch_sizes, decode_tokens=rt.decode_tokens, warmup=rt.warmup,
                                   prompt_len=rt.prompt_len, mlp_candidate_density=plan.mlp_candidate_density,
                                   mlp_up_weight=plan.mlp_up_weight, skip_kv=plan.skip_kv,
                                   thresholds=plan.thresholds)
    return build_report(base, quality_data, speed_data, batch_sizes[0])
