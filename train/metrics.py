"""Held-out quality of a top-k selection: recall, precision, densities and the |activation| mass kept.

Recall alone misleads (missing a large activation costs more than missing a small one), so every
report also carries `mass_kept`: per token, the |activation| mass of the chosen set over the mass of
the oracle top-k set of the same size, averaged over tokens. 1.0 means the oracle's choice.
"""

from __future__ import annotations

import torch

from dejavu.predictor import topk_mask, units_for_density

METRIC_KEYS = ("recall", "precision", "predicted_density", "true_density", "density", "mass_kept")


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
    return {key: sum(m[key] for m in per_layer) / len(per_layer) for key in METRIC_KEYS}


def format_table(layers: dict[str, dict], means: dict) -> str:
    """The per-layer table printed at the end of training."""
    head = (f"{'layer':>5} | {'mlp recall':>10} {'precision':>9} {'mass kept':>9} | "
            f"{'attn recall':>11} {'precision':>9} {'mass kept':>9}")
    lines = [head, "-" * len(head)]

    def row(name: str, m: dict) -> str:
        mlp, attn = m.get("mlp", {}), m.get("attn", {})
        return (f"{name:>5} | {mlp.get('recall', 0):10.3f} {mlp.get('precision', 0):9.3f} {mlp.get('mass_kept', 0):9.3f} | "
                f"{attn.get('recall', 0):11.3f} {attn.get('precision', 0):9.3f} {attn.get('mass_kept', 0):9.3f}")

    for name in sorted(layers, key=int):
        lines.append(row(name, layers[name]))
    lines.append("-" * len(head))
    lines.append(row("mean", means))
    return "\n".join(lines)
