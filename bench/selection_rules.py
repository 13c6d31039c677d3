"""MLP selection rules compared at equal final density: what does each cost in quality and weight bytes?

    python bench/selection_rules.py --bundle /work/runs/smol65k/bundle --max-eval-tokens 2048 \\
        --window 1024 --stride 512 --rule oracle:0.5 predictor:0.5 gate:0.5 up:0.5 two-stage:0.75:0.5

Rules (MLP only; attention stays dense unless --head-density):
- oracle:D      true top-D of |down input| from the same forward (needs the dense activation: a bound);
- oracle-out:D  the same weighted by the norm of each neuron's column of down (what it adds to the output);
- predictor:D   the bundle's predictors pick D (the runtime's default);
- gate:D        exact top-D of |act(gate(x))| (gated MLPs; every gate row is read to choose);
- up:D          exact top-D of |up(x)| (every up row is read to choose);
- two-stage:C:D predictor candidates at C, then exact top-D (share of all neurons) of |down input|
                among them (runtime/apply.py `mlp_candidate_density`).
- up-pred:D:A   exact |up(x)| for every neuron (the up projection read in full) combined with the
                predictor: top-D of log|up| + A * predictor logit (runtime/apply.py `mlp_up_weight`).
- input:X:D     no predictor (TEAL-style input sparsity): each token keeps the top-X of its MLP input's
                |x| entries, so gate and up read only those columns; then the top-D of |down input|
                computed from that x go through down. input:1:D is the oracle.
- threshold:X:D the same with one magnitude threshold per layer instead of a per-token top-k (what a
                kernel can apply while it reads, as TEAL does): thresholds are quantiles of |x| and of the
                dense |down input| over --calibration-tokens of the calibration corpus, set to keep X and
                D on average there; the report gives the shares actually kept on the evaluation text.
- threshold:X:D:A the same, and attention too (TEAL's whole-model rule): thresholds keep A of q/k/v's
                input and of o's input; every head is computed. The report adds the attention shares
                kept and the whole layer's weight bytes.
- greedy:T      thresholds on all four inputs (as threshold:X:D:A) keeping T of every layer's weight bytes,
                split over q/k/v's, o's, gate/up's and down's inputs per layer by TEAL's greedy search
                (runtime/allocation.py) on the same calibration tokens.
- quant:B:D     selection from a B-bit copy of gate and up (round-to-nearest, one scale per 64 inputs):
                top-D of |act(x Q(Wg)^T) * (x Q(Wu)^T)|, then the exact MLP for those neurons. MLP bytes
                count the copy (2/3 * B/16) plus D. SmolLM2's GGUF weights are themselves 4-bit (Q4_1,
                32 per group), so bits >= 4 are near exact here and say little about other models.
- quant-clip:B:D the same with 2^B levels and no zero, each group's scale clipped for least squared error
                (absmax round-to-nearest leaves 2 bits only 3 levels).
- upq-pred:B:D:A up-pred with |up| from a B-bit copy of up (quant-clip's quantiser) instead of the exact up:
                MLP bytes (1/3 * B/16) + D on a gated MLP, predictor weights not counted as for up-pred.
- score-threshold:D the bundle's predictors with one threshold on their MLP scores per layer instead of a
                per-token top-k (runtime/score_thresholds.py): each token keeps the neurons scored above
                its layer's threshold, set on --calibration-tokens of the calibration corpus run sparse to
                keep D on average; the report gives the share kept on the evaluation text.

Every evaluated token is sparse, windows/stride as in runtime/quality.py; dense log-probs are computed
once and reused. "MLP bytes" is the share of the dense MLP's weight bytes a real kernel must read per
token (predictor weights not included): D for predictor; up_share*C + (1-up_share)*D for two-stage
(up_share = 2/3 gated, 1/2 plain); up_share/2 + (1 - up_share/2)*D for gate/up on a gated MLP (one of
gate/up in full), 1/2 + D/2 for up on a plain MLP; the oracle's D is an ideal no kernel can reach.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from dejavu.artifacts import atomic_write_json
from dejavu.errors import DejavuError
from dejavu.predictor import topk_mask
from dejavu.runtime.allocation import greedy_allocation
from dejavu.runtime.apply import SparseRuntime
from dejavu.runtime.quality import (
    default_eval_dataset,
    dense_reference,
    eval_tokens,
    model_context,
    reference_ppl,
    score_against,
)
from dejavu.runtime.thresholds import calibrate_thresholds

KINDS = {"oracle": 1, "oracle-out": 1, "predictor": 1, "gate": 1, "up": 1, "two-stage": 2, "up-pred": 2, "input": 2, "threshold": (2, 3),
         "greedy": 1,
         "quant": 2, "quant-clip": 2, "upq-pred": 3, "score-threshold": 1}


def parse_rule(text: str) -> tuple[str, tuple[float, ...]]:
    kind, *values = text.split(":")
    if kind not in KINDS or len(values) not in ((KINDS[kind],) if isinstance(KINDS[kind], int) else KINDS[kind]):
        raise DejavuError(f"rule {text!r}: expected oracle:D, oracle-out:D, predictor:D, gate:D, up:D, two-stage:C:D, up-pred:D:A, "
                          "input:X:D, threshold:X:D[:A], quant:B:D, quant-clip:B:D or upq-pred:B:D:A")
    try:
        numbers = tuple(float(v) for v in values)
    except ValueError:
        raise DejavuError(f"rule {text!r}: densities must be numbers") from None
    if not all(0.0 < v <= 1.0 for v in (numbers[:1] if kind == "up-pred" else numbers[1:2] if kind == "upq-pred"
                                        else numbers[1:] if kind.startswith("quant") else numbers)):
        raise DejavuError(f"rule {text!r}: densities must be in (0, 1]")
    return kind, numbers


class NeuronMaskRule:
    """A rule that picks each token's neurons before down: a subclass's hooks fill `_masks[l]`, a
    pre-hook on down zeroes the rest (same effect as computing only the kept ones)."""

    def __init__(self):
        self.enabled, self.token_mask = True, None  # what score_against sets on a runtime
        self._masks: dict[int, torch.Tensor] = {}
        self._handles = []

    def _apply(self, l: int):  # noqa: E741
        def hook(module: nn.Module, args):
            x = args[0]
            return (x * self._masks.pop(l).reshape(x.shape).to(x.dtype),) + tuple(args[1:])

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class ExactRule(NeuronMaskRule):
    """Keeps the exact top-k of |act(gate)| or |up| per token: a forward hook on that projection scores
    the neurons."""

    def __init__(self, adapter, source: str, density: float):
        super().__init__()
        for l, layer in enumerate(adapter.decoder_layers()):  # noqa: E741
            if source == "gate":
                proj, act = adapter.gate_proj(layer), adapter.activation(layer)
                if proj is None:
                    raise DejavuError("rule gate:D needs a gated MLP (this model has none)")
            else:
                proj, act = adapter.up_proj(layer), None
            self._handles.append(proj.register_forward_hook(self._score(l, act, density)))
            self._handles.append(adapter.down_proj(layer).register_forward_pre_hook(self._apply(l)))

    def _score(self, l: int, act, density: float):  # noqa: E741
        def hook(module: nn.Module, args, out: torch.Tensor):
            self._masks[l] = topk_mask((act(out) if act is not None else out).abs(), density)

        return hook


class OutputOracleRule(NeuronMaskRule):
    """The oracle by what each neuron adds to the MLP's output: top-D of |down input_j| x ||down[:, j]||
    (the plain oracle ranks by |down input_j| alone, as if every column of down had the same norm)."""

    def __init__(self, adapter, density: float):
        super().__init__()
        for l, layer in enumerate(adapter.decoder_layers()):  # noqa: E741
            norms = adapter.mlp_weights(layer).down.detach().float().norm(dim=0)  # [n]: down is [out, n]
            self._handles.append(adapter.down_proj(layer).register_forward_pre_hook(self._score(l, norms, density)))
            self._handles.append(adapter.down_proj(layer).register_forward_pre_hook(self._apply(l)))

    def _score(self, l, norms, density):  # noqa: E741
        def hook(module, args):
            self._masks[l] = topk_mask(args[0].float().abs() * norms, density)

        return hook


def fake_quantize(weight: torch.Tensor, bits: int, group: int = 64) -> torch.Tensor:
    """Symmetric round-to-nearest with one scale per `group` input columns of each row (the usual
    weight-only scheme); returns the dequantised weight."""
    rows, cols = weight.shape
    w = weight.float().reshape(rows, cols // group, group)
    levels = 2 ** (bits - 1) - 1 if bits > 1 else 1
    scale = w.abs().amax(-1, keepdim=True).clamp_min(1e-12) / levels
    q = torch.sign(w) if bits == 1 else (w / scale).round().clamp(-levels, levels)
    if bits == 1:  # sign times the group's mean magnitude
        scale = w.abs().mean(-1, keepdim=True)
    return (q * scale).reshape(rows, cols).to(weight.dtype)


def fake_quantize_clipped(weight: torch.Tensor, bits: int, group: int = 64) -> torch.Tensor:
    """2^bits levels without a zero (midrise: 2 bits give 4 levels, not absmax's 3) and each group's scale
    chosen among clip ratios of its absmax by least squared error; returns the dequantised weight."""
    rows, cols = weight.shape
    w = weight.float().reshape(rows, cols // group, group)
    half = 2 ** (bits - 1)
    amax = w.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    best, best_err = None, None
    for ratio in [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]:
        scale = amax * ratio / (half - 0.5)  # ratio 1: the top level sits on the group's absmax
        q = (torch.floor(w / scale).clamp(-half, half - 1) + 0.5) * scale
        err = ((q - w) ** 2).sum(-1, keepdim=True)
        if best is None:
            best, best_err = q, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, q, best), torch.where(better, err, best_err)
    return best.reshape(rows, cols).to(weight.dtype)


class QuantRule(NeuronMaskRule):
    """Selection from a low-bit copy of gate and up: score = |act(x Q(Wg)^T) * (x Q(Wu)^T)|, top-D go
    through the exact MLP. The low-bit copy is what a kernel would read before the sparse MLP."""

    def __init__(self, adapter, bits: float, density: float, clipped: bool = False):
        super().__init__()
        for l, layer in enumerate(adapter.decoder_layers()):  # noqa: E741
            w = adapter.mlp_weights(layer)  # [out, in] whatever the module type (Conv1D included)
            fq = fake_quantize_clipped if clipped else fake_quantize
            qg = fq(w.gate.detach(), int(bits)) if w.gate is not None else None
            qu = fq(w.up.detach(), int(bits))
            self._handles.append(adapter.up_proj(layer).register_forward_pre_hook(
                self._score(l, qg, qu, adapter.activation(layer), density)))
            self._handles.append(adapter.down_proj(layer).register_forward_pre_hook(self._apply(l)))

    def _score(self, l, qg, qu, act, density):  # noqa: E741
        def hook(module, args):
            x = args[0]
            u = x @ qu.T
            s = act(x @ qg.T) * u if qg is not None else act(u)
            self._masks[l] = topk_mask(s.abs(), density)

        return hook


class InputRule:
    """TEAL-style: pre-hooks on gate/up zero all but the top-X of |x| per token (the columns a kernel
    would read), and a pre-hook on down keeps the top-D of the resulting |down input|."""

    def __init__(self, adapter, input_density: float, density: float):
        self.enabled, self.token_mask = True, None  # what score_against sets on a runtime
        self._handles = []
        for layer in adapter.decoder_layers():
            for proj in (adapter.gate_proj(layer), adapter.up_proj(layer)):
                if proj is not None:
                    self._handles.append(proj.register_forward_pre_hook(self._keep_top(input_density)))
            self._handles.append(adapter.down_proj(layer).register_forward_pre_hook(self._keep_top(density)))

    @staticmethod
    def _keep_top(density: float):
        def hook(module: nn.Module, args):
            x = args[0]
            if density >= 1.0:
                return None
            return (x * topk_mask(x.abs(), density).reshape(x.shape).to(x.dtype),) + tuple(args[1:])

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def weight_share(kind: str, numbers: tuple[float, ...], gated: bool, stats: dict | None) -> float:
    up_share = 2 / 3 if gated else 1 / 2
    if kind == "input":
        return up_share * numbers[0] + (1 - up_share) * numbers[1]
    if kind.startswith("quant"):  # the low-bit copy of gate/up (bf16 = 16 bits), then D of the MLP
        return up_share * numbers[0] / 16 + numbers[1]
    if kind == "upq-pred":  # the low-bit copy of up alone (half of gate + up), then D of the MLP
        return up_share / 2 * numbers[0] / 16 + numbers[1]
    if kind in ("gate", "up"):
        full = up_share / 2 if gated else up_share  # the projection read in full to choose
        return full + (1 - full) * numbers[0]
    if stats is not None:  # predictor / two-stage / threshold: what the runtime measured
        return stats["mlp_weight_share"]
    return numbers[-1]


_allocations: dict = {}


def run_rule(model, adapter, predictors, ref, kind, numbers, head_density,
             calibration=None) -> tuple[dict, dict | None]:
    if kind in ("threshold", "greedy"):  # the runtime's own rule: shares kept on the evaluation text in its stats
        tokens, window = calibration
        if kind == "greedy":  # one search serves every greedy rule of the run: its path covers each target
            if _allocations.get("lowest", 2.0) > numbers[0]:
                _allocations.update(lowest=numbers[0], allocation=greedy_allocation(model, adapter, tokens, numbers[0],
                                                                                    window=window))
            thresholds = _allocations["allocation"].thresholds(numbers[0])
        else:
            thresholds = calibrate_thresholds(model, adapter, tokens, numbers[0], numbers[1], window=window,
                                              keep_attn=numbers[2] if len(numbers) > 2 else None)
        with SparseRuntime(model, adapter, None, selection="dense", thresholds=thresholds) as runtime:
            return score_against(model, runtime, ref, desc=kind), runtime.stats.summary()
    if kind in ("gate", "up", "input", "quant", "quant-clip", "oracle-out"):
        rule = (InputRule(adapter, *numbers) if kind == "input"
                else OutputOracleRule(adapter, numbers[0]) if kind == "oracle-out"
                else QuantRule(adapter, *numbers, clipped=kind == "quant-clip") if kind.startswith("quant")
                else ExactRule(adapter, kind, numbers[0]))
        try:
            return score_against(model, rule, ref, desc=kind), None
        finally:
            rule.remove()
    if kind != "oracle" and predictors is None:
        raise DejavuError(f"rule {kind} needs --bundle")
    if kind == "score-threshold":
        return _score_threshold(model, adapter, predictors, ref, numbers[0], head_density, calibration)
    kw = {"mlp_density": numbers[-1], "head_density": head_density}
    if kind == "two-stage":
        kw["mlp_candidate_density"] = numbers[0]
    if kind == "up-pred":
        kw.update(mlp_density=numbers[0], mlp_up_weight=numbers[1])
    if kind == "upq-pred":
        kw.update(mlp_density=numbers[1], mlp_up_weight=numbers[2])
        return _with_quantized_up(model, adapter, predictors, ref, int(numbers[0]), kw)
    with SparseRuntime(model, adapter, None if kind == "oracle" else predictors,
                       selection="oracle" if kind == "oracle" else "predictor", **kw) as runtime:
        metrics = score_against(model, runtime, ref, desc=kind)
        return metrics, runtime.stats.summary()


def _score_threshold(model, adapter, predictors, ref, density, head_density, calibration) -> tuple[dict, dict]:
    from dejavu.runtime.score_thresholds import calibrate_score_thresholds

    tokens, window = calibration
    thresholds = calibrate_score_thresholds(model, adapter, predictors, tokens, window, mlp_density=density,
                                            head_density=head_density)
    with SparseRuntime(model, adapter, predictors, selection="predictor", mlp_density=density,
                       head_density=head_density, mlp_score_thresholds=thresholds) as runtime:
        return score_against(model, runtime, ref, desc="score-threshold"), runtime.stats.summary()


def _with_quantized_up(model, adapter, predictors, ref, bits: int, kw: dict) -> tuple[dict, dict]:
    """up-pred with log|up| taken from a low-bit copy of up: the runtime's exact-up rule, its up scores
    swapped for those of the copy (read in full, like exact-up's up, but at `bits` per weight)."""
    import dejavu.runtime.apply as apply_module

    copies = [fake_quantize_clipped(adapter.mlp_weights(layer).up.detach(), bits)
              for layer in adapter.decoder_layers()]
    latest: dict[str, torch.Tensor] = {}
    handles = [adapter.up_proj(layer).register_forward_pre_hook(
        lambda module, args, q=q: latest.__setitem__("up", args[0] @ q.T))
        for layer, q in zip(adapter.decoder_layers(), copies, strict=True)]
    exact = apply_module.exact_up_scores
    apply_module.exact_up_scores = lambda up, logits, weight: exact(latest["up"].reshape(up.shape), logits, weight)
    try:
        with SparseRuntime(model, adapter, predictors, selection="predictor", **kw) as runtime:
            return score_against(model, runtime, ref, desc="upq-pred"), runtime.stats.summary()
    finally:
        apply_module.exact_up_scores = exact
        for handle in handles:
            handle.remove()


def layer_share(shape, mlp_bytes: float, stats: dict | None, head_density: float) -> float:
    """The share of a decoder layer's weight bytes read: the MLP's share, plus attention's (thresholds:
    q/k/v rows for the kept inputs, o rows for the kept o inputs; else the heads computed, k/v in full)."""
    d, n, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.num_heads * hd * d, 2 * shape.num_kv_heads * hd * d
    mlp = 3 * n * d
    if stats and "attn_input_kept" in stats:
        attention = (q + kv) * stats["attn_input_kept"] + q * stats["attn_o_kept"]
    else:
        attention = 2 * q * head_density + kv
    return (mlp * mlp_bytes + attention) / (mlp + 2 * q + kv)


def markdown(rows: list[dict], dense_ppl: float) -> str:
    lines = [f"| rule | candidates | final MLP density | ppl (dense {dense_ppl:.3f}) | Δppl | top-1 agree | "
             "KL(dense‖sparse) | MLP weight bytes | layer weight bytes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cand = f"{r['candidates']:g}" if r["candidates"] is not None else "–"
        note = " (ideal)" if r["kind"] == "oracle" else ""
        lines.append(f"| {r['rule']} | {cand} | {r['density']:g} | {r['sparse_ppl']:.3f} | "
                     f"{(r['sparse_ppl'] / dense_ppl - 1) * 100:+.1f} % | {r['top1_agreement']:.4f} | "
                     f"{r['kl']:.4f} | {r['mlp_bytes']:.3f}{note} | {r['layer_bytes']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    from dejavu.config import RuntimeConfig
    from dejavu.export.bundle import check_bundle_matches, load_bundle
    from dejavu.models.adapters import adapter_for
    from dejavu.models.loading import load_model

    defaults = RuntimeConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the bundle's model")
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--dataset", default=None, help="default: ../shared/data/wikitext-2-raw/wiki.test.raw")
    ap.add_argument("--max-eval-tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=defaults.eval_window)
    ap.add_argument("--stride", type=int, default=defaults.eval_stride)
    ap.add_argument("--head-density", type=float, default=1.0)
    ap.add_argument("--rule", nargs="+", required=True,
                    help="oracle:D predictor:D gate:D up:D two-stage:C:D up-pred:D:A input:X:D")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the shared machine has 2 cores)")
    ap.add_argument("--json", type=Path, default=None, help="results, rewritten after every rule")
    ap.add_argument("--calibration", default=None,
                    help="threshold rules: corpus the thresholds are set on (default: ../shared/data/wikitext-2/valid.txt)")
    ap.add_argument("--calibration-tokens", type=int, default=8192, help="threshold rules: tokens calibrated on")
    args = ap.parse_args()
    rules = [parse_rule(r) for r in args.rule]
    torch.set_num_threads(args.threads)

    manifest, predictors = load_bundle(args.bundle) if args.bundle else (None, None)
    name = args.model or (manifest["model"].get("name") if manifest else None) or "smollm2-135m"
    model, tokenizer, source = load_model(name, device=args.device, dtype=args.dtype)
    adapter = adapter_for(model)
    if manifest is not None:
        check_bundle_matches(manifest, adapter)
    gated = adapter.gate_proj(adapter.decoder_layers()[0]) is not None
    dataset = args.dataset or default_eval_dataset()
    if dataset is None:
        raise DejavuError("no evaluation corpus: pass --dataset")
    window = min(model_context(model), args.window)
    stride = min(args.stride, window)
    tokens = eval_tokens(tokenizer, dataset, args.max_eval_tokens)
    with torch.no_grad():
        ref = dense_reference(model, tokens, window, stride)
    dense = reference_ppl(ref)
    print(f"{source.display}: {tokens.numel()} tokens of {dataset}, windows of {window}, stride {stride} "
          f"({len(ref.windows)} windows, {dense['scored_tokens']} scored); dense ppl {dense['dense_ppl']:.3f}",
          flush=True)
    result = {"model": source.display, "dataset": dataset, "tokens": tokens.numel(), "window": window,
              "stride": stride, "head_density": args.head_density, "dtype": args.dtype, "device": args.device,
              "dense_ppl": dense["dense_ppl"], "rules": []}
    calibration = None
    if any(kind in ("threshold", "greedy", "score-threshold") for kind, _ in rules):
        corpus = args.calibration or str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt")
        from dejavu.corpus import load_texts, tokenize_stream

        calib = tokenize_stream(load_texts(corpus, split="train"), tokenizer)[:args.calibration_tokens]
        calibration = (calib, window)
        result["calibration"] = {"corpus": corpus, "tokens": calib.numel()}
    for kind, numbers in rules:
        text = f"{kind}:" + ":".join(f"{v:g}" for v in numbers)
        t0 = time.perf_counter()
        metrics, stats = run_rule(model, adapter, predictors, ref, kind, numbers, args.head_density, calibration)
        row = {"rule": text, "kind": kind, "candidates": numbers[0] if kind == "two-stage" else None,
               "density": numbers[0] if kind == "up-pred" else numbers[1] if kind in ("threshold", "quant", "quant-clip",
                                                                                        "upq-pred")
               else numbers[-1], **metrics, "computed": stats,
               "mlp_bytes": weight_share(kind, numbers, gated, stats), "seconds": time.perf_counter() - t0}
        row["layer_bytes"] = layer_share(adapter.shape(), row["mlp_bytes"], stats, args.head_density)
        result["rules"].append(row)
        print(f"  {text}: ppl {row['sparse_ppl']:.3f}, top-1 {row['top1_agreement']:.4f}, KL {row['kl']:.4f}, "
              f"MLP bytes {row['mlp_bytes']:.3f}, layer bytes {row['layer_bytes']:.3f} ({row['seconds']:.0f} s)",
              flush=True)
        if args.json is not None:
            atomic_write_json(args.json, result)
    print()
    print(markdown(result["rules"], dense["dense_ppl"]))


if __name__ == "__main__":
    main()
