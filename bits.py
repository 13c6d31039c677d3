"""Bit-packing of boolean label matrices, shared by collect (writes) and train (reads).

Layout: [tokens, ceil(n / 8)] uint8; bit j (least significant first) of byte i is column 8*i + j.
"""

from __future__ import annotations

import torch

_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[T, n] bool -> [T, ceil(n/8)] uint8."""
    t, n = mask.shape
    pad = (-n) % 8
    if pad:
        mask = torch.nn.functional.pad(mask, (0, pad))
    groups = mask.to(torch.uint8).view(t, -1, 8)
    return (groups * _WEIGHTS.to(mask.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """[T, ceil(n/8)] uint8 -> [T, n] bool."""
    bits = packed.unsqueeze(-1).bitwise_and(_WEIGHTS.to(packed.device)).ne(0)
    return bits.view(packed.shape[0], -1)[:, :n]
