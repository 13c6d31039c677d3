"""Row-scaled fp8 (e4m3) for activations kept only to weigh a training loss, shared by collect (writes)
and train (reads): each row is divided by its own |max| / 448 (e4m3's largest value) and rounded, so a
row of n values costs n bytes plus one fp32 scale, at a few per cent error per value.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8).max


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, n] float -> ([T, n] float8_e4m3fn, [T] float32 scales); an all-zero row gets scale 1."""
    amax = x.detach().abs().amax(dim=-1).float()
    scale = amax / _FP8_MAX
    # a row of zeros (or so small its scale underflows) stores zeros with scale 1; a NaN row keeps its NaN,
    # for the reader's check (train-predictors refuses it, naming the layer)
    scale = torch.where((scale > 0) | torch.isnan(scale), scale, torch.ones_like(scale))
    return (x.float() / scale[:, None]).clamp(-_FP8_MAX, _FP8_MAX).to(FP8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The inverse of quantize_rows, in float32."""
    return q.float() * scale.float()[:, None]


def non_finite_rows(q: torch.Tensor) -> torch.Tensor:
    """[T] bool: rows of a quantize_rows tensor holding a NaN (e4m3fn has no infinities; NaN is S.1111.111)."""
    return (q.view(torch.uint8) & 0x7F).eq(0x7F).any(dim=-1)
