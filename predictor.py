"""The predictor: one small low-rank MLP per layer and kind (MLP neurons, attention heads).

Shared by train (which fits it) and the runtime (which runs it), so the math is defined once:

    z      = (x - input_mean) * input_scale         # x: the paired block input, [..., d]
    h      = z @ w1.T + b1                          # [..., rank]; relu(h) if activation == "relu"
    scores = h @ w2.T + b2                          # [..., n_out]
    chosen = top-k(scores), k = units_for_density(density, n_out)

Tensor names inside a layer's state dict: input_mean, input_scale, w1, b1, w2, b2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

PREDICTOR_TENSORS = ("input_mean", "input_scale", "w1", "b1", "w2", "b2")
KINDS = ("mlp", "attn")


def units_for_density(density: float, total: int) -> int:
    """How many neurons/heads a density keeps: at least one, at most all."""
    return max(1, min(total, int(math.ceil(density * total - 1e-9))))


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask of the top-k entries of the last dimension, k = units_for_density(density, n)."""
    n = scores.shape[-1]
    k = units_for_density(density, n)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    idx = scores.float().topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


class LowRankPredictor(nn.Module):
    def __init__(self, d_in: int, n_out: int, rank: int, activation: str = "none"):
        super().__init__()
        if activation not in ("none", "relu"):
            raise ValueError(f"unknown predictor activation {activation!r}")
        self.activation = activation
        self.register_buffer("input_mean", torch.zeros(d_in))
        self.register_buffer("input_scale", torch.ones(d_in))
        self.w1 = nn.Parameter(torch.empty(rank, d_in))
        self.b1 = nn.Parameter(torch.zeros(rank))
        self.w2 = nn.Parameter(torch.empty(n_out, rank))
        self.b2 = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.w1, std=d_in**-0.5)
        nn.init.normal_(self.w2, std=rank**-0.5)

    @property
    def d_in(self) -> int:
        return self.w1.shape[1]

    @property
    def n_out(self) -> int:
        return self.w2.shape[0]

    @property
    def rank(self) -> int:
        return self.w1.shape[0]

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.input_mean.copy_(mean)
        self.input_scale.copy_(1.0 / std.clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.w1.dtype
        z = (x.to(dtype) - self.input_mean) * self.input_scale
        h = nn.functional.linear(z, self.w1, self.b1)
        if self.activation == "relu":
            h = torch.relu(h)
        return nn.functional.linear(h, self.w2, self.b2)

    def select(self, x: torch.Tensor, density: float) -> torch.Tensor:
        """Indices of the top-k units per row: [..., k] int64."""
        k = units_for_density(density, self.n_out)
        return self.forward(x).topk(k, dim=-1).indices

    def num_bytes(self, dtype: torch.dtype | None = None) -> int:
        itemsize = torch.empty((), dtype=dtype or self.w1.dtype).element_size()
        return sum(p.numel() for p in (self.w1, self.b1, self.w2, self.b2, self.input_mean, self.input_scale)) * itemsize

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], activation: str = "none",
                     where: str = "predictor") -> LowRankPredictor:
        """The predictor these tensors describe; their dtypes and shapes checked against each other (`copy_` would
        broadcast a wrong-sized bias or input statistic into place and score with it)."""
        from dejavu.errors import DejavuError

        not_float = [f"{name} ({t.dtype})" for name, t in tensors.items() if not t.is_floating_point()]
        if not_float:
            raise DejavuError(f"{where}: {', '.join(not_float)} must hold floating-point values")
        w1, w2 = tensors["w1"], tensors["w2"]
        if w1.dim() != 2 or w2.dim() != 2:
            raise DejavuError(f"{where}: w1 and w2 must be matrices, got shapes {list(w1.shape)} and {list(w2.shape)}")
        (rank, d_in), n_out = w1.shape, w2.shape[0]
        expected = {"input_mean": [d_in], "input_scale": [d_in], "w1": [rank, d_in], "b1": [rank],
                    "w2": [n_out, rank], "b2": [n_out]}
        wrong = [f"{name} {list(tensors[name].shape)} (expected {shape})" for name, shape in expected.items()
                 if list(tensors[name].shape) != shape]
        if wrong:
            raise DejavuError(f"{where}: shapes do not fit a rank-{rank} predictor of {d_in} inputs: {'; '.join(wrong)}")
        pred = cls(d_in, n_out, rank, activation)
        with torch.no_grad():
            for name in PREDICTOR_TENSORS:
                getattr(pred, name).copy_(tensors[name])
        return pred.to(w1.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach() for name in PREDICTOR_TENSORS}


@dataclass
class LayerPredictors:
    mlp: LowRankPredictor | None
    attn: LowRankPredictor | None
    mlp_density: float = 1.0
    head_density: float = 1.0


def predictor_rank(rank: int, n_out: int, activation: str = "none") -> int:
    """A linear low-rank map wider than its output is no more expressive than rank n_out: the head
    predictor (a handful of outputs) would otherwise cost as much as the MLP's."""
    return min(rank, n_out) if activation == "none" else rank


@dataclass
class PredictorSet:
    """What the runtime needs from a bundle: per-layer predictors, densities and pairings.

    pairing "current": layer l reads its own block input; "lookahead": layer l-1's (layer 0 its own).
    """

    layers: list[LayerPredictors]
    mlp_pairing: str = "current"
    head_pairing: str = "lookahead"
    meta: dict = field(default_factory=dict)
    # TEAL-style thresholds the bundle carries (runtime.thresholds.Thresholds), or None
    thresholds: Any = None
    # per-layer thresholds on the MLP predictors' scores (runtime/score_thresholds.py), set at these
    # predictors' MLP densities (None for layers that run dense), or None: each token's top-k
    mlp_score_thresholds: list | None = None
    # two-stage score thresholds (runtime/apply.py): the score thresholds keep the candidates, and these per-layer
    # |down input| thresholds keep the MLP density; None: one stage
    mlp_down_thresholds: list | None = None
    # the candidate density the down thresholds were calibrated at: a runtime asked for another refuses them
    # (their candidates would keep another share than the score thresholds were set to leave)
    mlp_candidate_density: float | None = None
    # a low-rank term for what each sparse MLP leaves out (runtime/compensation.py Compensation), fitted for this
    # MLP rule and these densities, or None
    mlp_compensation: Any = None
    # the rule it was fitted for (the bundle manifest's mlp_compensation["rule"]): a runtime running another
    # drops it
    mlp_compensation_rule: dict | None = None

    @property
    def has_predictors(self) -> bool:
        return any(lp.mlp is not None or lp.attn is not None for lp in self.layers)

    def to(self, device=None, dtype=None) -> PredictorSet:
        for lp in self.layers:
            for p in (lp.mlp, lp.attn):
                if p is not None:
                    p.to(device=device, dtype=dtype)
        return self

    def at_densities(self, mlp: float | None = None, heads: float | None = None) -> bool:
        """Whether every layer with a predictor of a kind runs at that density already (None: any)."""
        return ((mlp is None or all(lp.mlp is None or lp.mlp_density == mlp for lp in self.layers))
                and (heads is None or all(lp.attn is None or lp.head_density == heads for lp in self.layers)))

    def with_densities(self, mlp: float | None = None, heads: float | None = None) -> PredictorSet:
        """Run every layer at these densities (None keeps a kind's own). Score thresholds were set for the
        densities they came with, so other densities drop them (or their layers would keep another share)."""
        if not self.at_densities(mlp, heads):
            self.mlp_score_thresholds = self.mlp_down_thresholds = self.mlp_candidate_density = None
            self.mlp_compensation = self.mlp_compensation_rule = None
        for lp in self.layers:
            if mlp is not None:
                lp.mlp_density = mlp
            if heads is not None:
                lp.head_density = heads
        return self

    @classmethod
    def random(cls, num_layers: int, hidden: int, neurons: int, heads: int, rank: int,
               mlp_density: float, head_density: float, seed: int = 0) -> PredictorSet:
        """Random predictors at real shapes, ranks as training gives them: for synthetic speed runs only."""
        torch.manual_seed(seed)
        return cls([
            LayerPredictors(LowRankPredictor(hidden, neurons, predictor_rank(rank, neurons)),
                            LowRankPredictor(hidden, heads, predictor_rank(rank, heads)),
                            mlp_density, head_density)
            for _ in range(num_layers)
        ], meta={"synthetic": True})
