"""A low-rank linear term for what a sparse MLP leaves out (runtime/apply.py `mlp_compensation`).

The neurons a predictor skips still add something to the MLP's output, and a predictor's misses are not
random: they follow the input it reads. Per layer, c(x) = b (a x) + bias is added to the sparse MLP's
output, x being the MLP's input. It is fitted by ridge regression from x to (dense output - sparse output)
on calibration text, with the layers' selection rule running as it will at inference, then truncated to
rank R along the fitted values' top principal directions (reduced-rank regression). Later layers see the
dense output during the fit, so each layer's term is fitted to its own error alone.

Why not judge it by the output error it removes: on SmolLM2 a rank-8 term removes only 15 % of that error
under an exact-gate selection, yet cuts perplexity from 21.8 to 19.3 (BENCHMARKS.md, session 23).

In a bundle (export/bundle.py): per layer `mlp_compensation.{l}.a` [R, d], `.b` [d, R] and `.bias` [d]
(fp32) for every layer whose MLP runs sparse, described by the manifest's `mlp_compensation`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dejavu.errors import DejavuError

TENSOR_PREFIX = "mlp_compensation"
PARTS = ("a", "b", "bias")  # a layer's tensors, `{TENSOR_PREFIX}.{l}.{part}` in bundles


@dataclass
class Compensation:
    """Per layer (a [R, d], b [d, R], bias [d]) or None where the MLP runs dense."""

    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _, _ in filter(None, self.layers)), default=0)

    def check(self, mlp_sparse: list[bool]) -> None:
        """Refuses a compensation that does not fit these layers: one entry per layer, a term wherever the MLP runs
        sparse."""
        if len(self.layers) != len(mlp_sparse):
            raise DejavuError(f"the MLP compensation covers {len(self.layers)} layers, the model has {len(mlp_sparse)}")
        for l, (sparse, parts) in enumerate(zip(mlp_sparse, self.layers, strict=True)):  # noqa: E741
            if sparse and parts is None:
                raise DejavuError(f"layer {l} runs a sparse MLP but the MLP compensation has no term for it: fit it at "
                                  "these densities")

    def term(self, l: int, x: torch.Tensor) -> torch.Tensor | None:  # noqa: E741
        """c(x) for layer l in x's dtype, or None."""
        parts = self.layers[l]
        if parts is None:
            return None
        a, b, bias = (t.to(device=x.device, dtype=x.dtype) for t in parts)
        return nn.functional.linear(nn.functional.linear(x, a), b, bias)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for l, parts in enumerate(self.layers):  # noqa: E741
            if parts is not None:
                for name, t in zip(PARTS, parts, strict=True):
                    out[f"{TENSOR_PREFIX}.{l}.{name}"] = t.detach().float().contiguous().cpu()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], hidden: int, rank: int, mlp_sparse: list[bool],
                     where: str) -> Compensation:
        """The bundle's terms, checked: present for every sparse layer, at the manifest's rank, finite."""
        layers: list = []
        for l, sparse in enumerate(mlp_sparse):  # noqa: E741
            names = [f"{TENSOR_PREFIX}.{l}.{n}" for n in PARTS]
            if not sparse:
                layers.append(None)
                continue
            missing = [n for n in names if n not in tensors]
            if missing:
                raise DejavuError(f"{where} lacks {', '.join(missing)}, which its manifest's mlp_compensation describes")
            a, b, bias = (tensors[n] for n in names)
            if a.shape != (rank, hidden) or b.shape != (hidden, rank) or bias.shape != (hidden,):
                raise DejavuError(f"{where}: layer {l}'s MLP compensation has shapes {tuple(a.shape)}, "
                                  f"{tuple(b.shape)}, {tuple(bias.shape)}; expected ({rank}, {hidden}), "
                                  f"({hidden}, {rank}), ({hidden},)")
            if not all(torch.isfinite(t).all() for t in (a, b, bias)):
                raise DejavuError(f"{where}: layer {l}'s MLP compensation is not finite (edited file?)")
            layers.append((a, b, bias))
        return cls(layers)


def compensation_rule(mlp_selection: str, candidate_density: float | None, mlp_density: list[float],
                      head_density: list[float]) -> dict:
    """The selection rule a compensation is fitted for (the manifest keeps it; runtime/plan.py compares)."""
    return {"mlp_selection": mlp_selection, "mlp_candidate_density": candidate_density,
            "mlp_density_per_layer": [float(d) for d in mlp_density],
            "head_density_per_layer": [float(d) for d in head_density]}


def rule_differences(fitted: dict, running: dict) -> list[str]:
    """What differs between the rule a compensation was fitted for and the one running (empty: the same)."""
    return [f"{key} {fitted.get(key)} (running {running[key]})" for key in running if fitted.get(key) != running[key]]


class _Moments:
    """X^T X and X^T R of one layer, X = [x, 1] (float64: sums over many tokens)."""

    def __init__(self, d: int, device):
        self.xtx = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=device)
        self.xtr = torch.zeros(d + 1, d, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, r: torch.Tensor) -> None:
        x1 = torch.cat([x.double(), torch.ones_like(x[:, :1], dtype=torch.float64)], dim=1)
        self.xtx += x1.T @ x1
        self.xtr += x1.T @ r.double()

    def fit(self, rank: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.xtr.shape[1]
        lam = ridge * self.xtx.diagonal()[:d].mean().clamp_min(1e-12)
        w = torch.linalg.solve(self.xtx + lam * torch.eye(d + 1, dtype=torch.float64, device=self.xtx.device), self.xtr)
        if not torch.isfinite(w).all():
            raise DejavuError("the MLP compensation fit is not finite: the calibration activations overflow "
                              "(run calibration in float32)")
        # the fitted values' top principal directions: the rank-R map closest to w on these inputs
        _, vectors = torch.linalg.eigh(w.T @ self.xtx @ w)
        v = vectors[:, -rank:] if rank < d else vectors
        a = (w[:d] @ v).T  # [R, d]
        bias = w[d] @ v @ v.T
        return a.float().cpu(), v.float().cpu(), bias.float().cpu()


@torch.no_grad()
def calibrate_compensation(model, adapter, predictors, ids: torch.Tensor, window: int, rank: int,
                           ridge: float = 1e-4, windows_per_forward: int = 4, **rule) -> Compensation:
    """Fit each sparse layer's term over `ids` (1-D token ids) in windows of `window`, the MLPs selecting
    by `rule` (SparseRuntime's keyword arguments: densities, candidate density, score/down thresholds)."""
    from dejavu.models.adapters import _linear_weight
    from dejavu.runtime.apply import SparseRuntime

    if rank < 1:
        raise DejavuError(f"the MLP compensation rank must be at least 1, got {rank}")
    ids = ids.reshape(-1)
    usable = ids.numel() // window * window
    chunks = ids[:usable].reshape(-1, window) if usable else ids[None]
    device = next(model.parameters()).device
    layers = adapter.decoder_layers()
    moments: dict[int, _Moments] = {}
    handles = []
    captured: dict[tuple[str, int], torch.Tensor] = {}  # ("x" | "h", layer): MLP input, dense down input

    def input_hook(l):  # noqa: E741
        def hook(module, args):
            captured[("x", l)] = args[0]
        return hook

    def dense_down_input(l):  # noqa: E741
        def hook(module, args):  # runs before the runtime's mask: the dense activation
            captured[("h", l)] = args[0]
        return hook

    def residual(l):  # noqa: E741
        def hook(module, args, out):
            dropped = captured.pop(("h", l)) - args[0]
            x = captured.pop(("x", l))
            r = nn.functional.linear(dropped, _linear_weight(module))  # Conv1D (GPT-2) too
            moments.setdefault(l, _Moments(x.shape[-1], device)).add(x.reshape(-1, x.shape[-1]),
                                                                     r.reshape(-1, r.shape[-1]))
            return out + r  # the dense output: later layers fit to their own error alone
        return hook

    with SparseRuntime(model, adapter, predictors, selection="predictor", mode="mask", **rule) as runtime:
        sparse = [d < 1.0 for d in runtime.mlp_density]
        if not any(sparse):
            raise DejavuError("every MLP runs dense: there is nothing to compensate")
        for l, layer in enumerate(layers):  # noqa: E741
            if not sparse[l]:
                continue
            down = adapter.down_proj(layer)
            handles.append(adapter.mlp_input_projections(layer)[0].register_forward_pre_hook(input_hook(l)))
            handles.append(down.register_forward_pre_hook(dense_down_input(l), prepend=True))
            handles.append(down.register_forward_hook(residual(l)))
        try:
            for i in range(0, chunks.shape[0], windows_per_forward):
                model(input_ids=chunks[i:i + windows_per_forward].to(device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
    return Compensation([moments[l].fit(rank, ridge) if sparse[l] else None for l in range(len(layers))])  # noqa: E741
