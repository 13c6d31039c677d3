"""Held-out quality of a top-k selection: recall, precision, densities and the |activation| mass kept.

Recall alone misleads (missing a large activation costs more than missing a small one), so every
report also carries `mass_kept`: per token, the |activation| mass of the chosen set over the mass of
the oracle top-k set of the same size, averaged over tokens. 1.0 means the oracle's choice.
"""

from __future__ import annotations

import torch

from dejavu.fp8 import dequantize_rows
from dejavu.predictor import topk_mask, units_for_density

METRIC_KEYS = ("recall", "precision", "predicted_density", "true_density", "density", "mass_kept")
# where the collect run kept the MLP's down inputs: the squared norm of the MLP output part the chosen set
# leaves out, over the whole output's (above 1 when the kept and dropped parts partly cancel), and the
# same for the oracle top-k
OUTPUT_KEYS = ("output_error", "oracle_output_error")
# bce+output: how sharply a score above / below the k-th largest keeps / drops its neuron (per logit unit)
OUTPUT_SHARPNESS = 2.0
CHUNK = 4096


def output_error(scores: torch.Tensor, act: torch.Tensor, w_down: torch.Tensor, k: int,
                 sharpness: float | None = OUTPUT_SHARPNESS) -> torch.Tensor:
    """Per token, ||W_down (drop * act)||^2 / ||W_down act||^2: the output part a selection of k neurons
    by `scores` leaves out, relative to the whole output (not bounded by 1: the parts may cancel). sharpness None: the hard top-k (a metric); a number: each neuron
    kept with probability sigmoid(sharpness * (score - k-th largest score)), so the loss has a gradient."""
    if sharpness is None:
        keep = torch.zeros_like(act).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)
    else:
        threshold = scores.detach().kthvalue(scores.shape[-1] - k + 1, dim=-1, keepdim=True).values
        keep = torch.sigmoid((scores - threshold) * sharpness)
    whole = (act @ w_down.T).pow(2).sum(-1)
    dropped = ((act * (1 - keep)) @ w_down.T).pow(2).sum(-1)
    return dropped / whole.clamp_min(1e-30)


@torch.no_grad()
def output_metrics(scores: torch.Tensor, down_q: torch.Tensor, down_scale: torch.Tensor, w_down: torch.Tensor,
                   density: float) -> dict:
    """Mean over tokens of output_error for the top-k by scores and for the oracle top-k by |act|."""
    k = units_for_density(density, scores.shape[-1])
    w = w_down.float()
    chosen, oracle = [], []
    for s in range(0, scores.shape[0], CHUNK):
        act = dequantize_rows(down_q[s:s + CHUNK], down_scale[s:s + CHUNK])
        chosen.append(output_error(scores[s:s + CHUNK].float(), act, w, k, None))
        oracle.append(output_error(act.abs(), act, w, k, None))
    return {"output_error": torch.cat(chosen).mean().item(), "oracle_output_error": torch.cat(oracle).mean().item()}


def selection_metrics(scores: torch.Tensor, truth: torch.Tensor, magnitude: torch.Tensor, density: float) -> dict:
    """scores, magnitude: [T, n] float; truth: [T, n] bool (the labels the predictor was trained on)."""
    k = units_for_density(density, scores.shape[-1])
    chosen = topk_mask(scores, density)
    hits = (chosen & truth).sum().item()
    magnitude = magnitude.float().abs()
    kept = (magnitude * chosen).sum(-1)
    oracle = magnitude.topk(k, dim=-1).values.sum(-1)
    # A token whose oracle set holds no mass at all loses nothing whatever is chosen.
    ratio = torch.where(oracle > 0, kept / oracle.clamp_min(1e-30), torch.ones_like(kept))
    return {
        "recall": hits / max(1, truth.sum().item()),
        "precision": hits / max(1, chosen.sum().item()),
        "predicted_density": chosen.float().mean().item(),
        "true_density": truth.float().mean().item(),
        "density": density,
        "mass_kept": ratio.mean().item(),
    }


def mean_metrics(per_layer: list[dict]) -> dict:
    if not per_layer:
        return {}
    keys = METRIC_KEYS + tuple(k for k in OUTPUT_KEYS if all(k in m for m in per_layer))
    return {key: sum(m[key] for m in per_layer) / len(per_layer) for key in keys}


def format_table(layers: dict[str, dict], means: dict) -> str:
    """The per-layer table printed at the end of training (with the MLP's output error where measured)."""
    show_output = all("output_error" in m.get("mlp", {}) for m in layers.values()) and bool(layers)
    out_head = f" {'out err':>7}" if show_output else ""
    head = (f"{'layer':>5} | {'mlp recall':>10} {'precision':>9} {'mass kept':>9}{out_head} | "
            f"{'attn recall':>11} {'precision':>9} {'mass kept':>9}")
    lines = [head, "-" * len(head)]

    def row(name: str, m: dict) -> str:
        mlp, attn = m.get("mlp", {}), m.get("attn", {})
        out = f" {mlp.get('output_error', 0):7.3f}" if show_output else ""
        return (f"{name:>5} | {mlp.get('recall', 0):10.3f} {mlp.get('precision', 0):9.3f} {mlp.get('mass_kept', 0):9.3f}"
                f"{out} | {attn.get('recall', 0):11.3f} {attn.get('precision', 0):9.3f} {attn.get('mass_kept', 0):9.3f}")

    for name in sorted(layers, key=int):
        lines.append(row(name, layers[name]))
    lines.append("-" * len(head))
    lines.append(row("mean", means))
    if show_output:
        lines.append("out err: the MLP output's squared norm left out by the predicted set, over the whole "
                     f"output's (oracle top-k: {means.get('mlp', {}).get('oracle_output_error', 0):.3f})")
    return "\n".join(lines)
