"""Per-layer magnitude thresholds for TEAL-style MLP sparsity (no predictor, no selection step).

Each decode step drops, per sequence, the entries of the MLP's input x whose |x| is at or below the
layer's x threshold (gate and up then read only the kept columns) and the entries of down's input at or
below its h threshold (down reads only the kept rows). The thresholds are quantiles of those
magnitudes over calibration text, set so that the shares `keep_x` and `keep_h` are kept on average
there; the shares kept on other text differ a little (bench/selection_rules.py reports them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MlpThresholds:
    x: list[float]  # per layer: |x| above this is kept (gate/up columns read)
    h: list[float]  # per layer: |down input| above this is kept (down rows read)
    keep_x: float  # the shares they were calibrated to keep
    keep_h: float


@torch.no_grad()
def calibrate_mlp_thresholds(model, adapter, tokens: torch.Tensor, keep_x: float, keep_h: float,
                             window: int = 1024) -> MlpThresholds:
    """Quantiles of |x| (the MLP input) and of the dense |down input| per layer over `tokens` (1-D)."""
    layers = adapter.decoder_layers()
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(layers):
        for name, module in (("x", adapter.gate_proj(layer) or adapter.up_proj(layer)), ("h", adapter.down_proj(layer))):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, key=(name, i): seen.setdefault(key, []).append(args[0].detach().abs().float().flatten().cpu())))
    device = next(model.parameters()).device
    try:
        for start in range(0, tokens.numel(), window):
            model(tokens[start:start + window][None].to(device))
    finally:
        for h in handles:
            h.remove()

    def quantile(values: list[torch.Tensor], keep: float) -> float:
        if keep >= 1.0:
            return -1.0  # keeps everything, zeros included
        flat = torch.cat(values)
        return float(flat.kthvalue(min(flat.numel(), max(1, round((1 - keep) * flat.numel())))).values)

    return MlpThresholds(x=[quantile(seen[("x", i)], keep_x) for i in range(len(layers))],
                         h=[quantile(seen[("h", i)], keep_h) for i in range(len(layers))],
                         keep_x=keep_x, keep_h=keep_h)


def calibrate_on_random_tokens(model, adapter, keep_x: float, keep_h: float, tokens: int = 256) -> MlpThresholds:
    """For random-weight (synthetic) models, which have no corpus: their own activations over random tokens."""
    ids = torch.randint(1, model.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
    return calibrate_mlp_thresholds(model, adapter, ids, keep_x, keep_h, window=tokens)
