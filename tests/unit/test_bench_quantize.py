"""The low-bit copies behind bench/selection_rules.py's quant rules (BENCHMARKS.md, session 11)."""

import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "selection_rules", Path(__file__).resolve().parents[2] / "bench" / "selection_rules.py")
selection_rules = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(selection_rules)


def test_clipped_copy_uses_every_level_and_errs_less_than_absmax():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    for bits in (2, 3, 4):
        clipped = selection_rules.fake_quantize_clipped(w, bits)
        absmax = selection_rules.fake_quantize(w, bits)
        # midrise: up to 2^bits distinct values in a group, where absmax round-to-nearest has 2^bits - 1
        assert clipped[0, :64].unique().numel() <= 2 ** bits
        assert ((clipped - w) ** 2).sum() < ((absmax - w) ** 2).sum()
    assert selection_rules.fake_quantize_clipped(w, 2)[0, :64].unique().numel() == 4


def test_clipped_copy_is_exact_on_a_grid_it_can_represent():
    levels = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    w = levels[torch.randint(0, 4, (8, 128))]
    w[:, ::64] = 1.5  # every group reaches the grid's absmax, so ratio 1.0 reproduces it
    assert torch.equal(selection_rules.fake_quantize_clipped(w, 2), w)
