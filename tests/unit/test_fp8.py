"""Row-scaled fp8, the storage of the MLP's down inputs (collect writes, train reads)."""

from __future__ import annotations

import torch

from dejavu.fp8 import FP8, dequantize_rows, quantize_rows

from helpers import e4m3_bound


def test_rows_round_trip_within_e4m3_precision():
    torch.manual_seed(0)
    x = torch.randn(64, 300) * torch.logspace(-3, 3, 64)[:, None]  # rows six decades apart
    x[5] = 0.0
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (64,) and scale[5] == 1.0
    back = dequantize_rows(q, scale)
    assert torch.equal(back[5], x[5])
    assert ((back - x).abs() <= e4m3_bound(x)).all()
    torch.testing.assert_close(back.abs().amax(dim=1), x.abs().amax(dim=1), rtol=1e-6, atol=0)  # the largest: exact but for rounding


def test_nan_rows_are_found_and_tiny_rows_stay_finite():
    from dejavu.fp8 import non_finite_rows

    x = torch.randn(4, 10)
    x[1, 3] = float("nan")
    x[2] = 1e-44  # its scale would underflow to 0
    q, scale = quantize_rows(x)
    assert non_finite_rows(q).tolist() == [False, True, False, False]
    back = dequantize_rows(q, scale)
    assert torch.isfinite(back[2]).all() and torch.isfinite(back[[0, 3]]).all()
