"""Per-layer thresholds on the MLP predictors' scores (runtime/apply.py `mlp_score_thresholds`).

A top-k gives every token the same number of neurons. A threshold on the predictor's score lets a token
whose scores are confident keep fewer and an uncertain one more, at the same mean. Each layer's
threshold is the score quantile that keeps the layer's density on calibration text, measured with the
model running sparse: layer l's inputs are those its sparse predecessors give, as at inference, so the
kept share there is the density asked (a dense forward would set thresholds that keep more once
the earlier layers run sparse).

With a candidate density (two-stage): the score thresholds keep the candidate density (gate/up rows), and
per-layer thresholds on |down input| keep the MLP density of all neurons (down rows).

In a bundle (export/bundle.py): one fp32 tensor [num_layers] named `score_thresholds.mlp`, NaN for a
layer that runs its MLP dense, described by the manifest's `mlp_score_thresholds`; two-stage adds
`score_thresholds.mlp_down` (the same layout) and the manifest's `mlp_candidate_density`.
"""

from __future__ import annotations

import math

import torch

from dejavu.errors import DejavuError
from dejavu.predictor import PredictorSet

TENSOR_NAME = "score_thresholds.mlp"
DOWN_TENSOR_NAME = "score_thresholds.mlp_down"


@torch.no_grad()
def calibrate_score_thresholds(model, adapter, predictors: PredictorSet, ids: torch.Tensor, window: int,
                               mlp_density: float | None = None, head_density: float | None = None,
                               windows_per_forward: int = 4) -> list[float | None]:
    """Each layer's MLP score threshold from sparse forwards over `ids` (1-D token ids) in windows of
    `window`; each window's thresholds are the quantiles of its own scores, averaged over the windows.
    Layers without an MLP predictor (density 1.0) get None. The MLP and heads run at
    `mlp_density` / `head_density` (None: the bundle's per-layer ones), as they will at inference."""
    scores, _ = _calibrate(model, adapter, predictors, ids, window, mlp_density, head_density, None,
                           windows_per_forward)
    return scores


@torch.no_grad()
def calibrate_two_stage(model, adapter, predictors: PredictorSet, ids: torch.Tensor, window: int,
                        candidate_density: float, mlp_density: float | None = None, head_density: float | None = None,
                        windows_per_forward: int = 4) -> tuple[list[float | None], list[float | None]]:
    """(score thresholds, down thresholds) for score-threshold candidates at `candidate_density` whose down
    rows are cut at a second threshold to keep `mlp_density` of all neurons (runtime/apply.py), both set in
    the same sparse forwards (each stage's inputs are those the other stage's cuts give, as at inference)."""
    return _calibrate(model, adapter, predictors, ids, window, mlp_density, head_density, candidate_density,
                      windows_per_forward)


def _calibrate(model, adapter, predictors, ids, window, mlp_density, head_density, candidate_density,
               windows_per_forward, compensation=None):
    from dejavu.runtime.apply import SparseRuntime

    ids = ids.reshape(-1)
    usable = ids.numel() // window * window
    if usable == 0:  # shorter than one window: one window of all of it
        rows = [ids[None]]
    else:
        chunks = ids[:usable].reshape(-1, window)
        rows = [chunks[i:i + windows_per_forward] for i in range(0, chunks.shape[0], windows_per_forward)]
    device = next(model.parameters()).device
    two_stage = candidate_density is not None
    sums: dict[str, dict[int, float]] = {"score": {}, "down": {}}
    counts: dict[int, int] = {}
    with SparseRuntime(model, adapter, predictors, selection="predictor", mlp_density=mlp_density,
                       head_density=head_density, mlp_score_thresholds="batch", mlp_candidate_density=candidate_density,
                       mlp_down_thresholds="batch" if two_stage else None, mlp_compensation=compensation) as runtime:
        for batch in rows:
            runtime.batch_score_thresholds.clear()
            runtime.batch_down_thresholds.clear()
            model(input_ids=batch.to(device), use_cache=False)
            for kind, found in (("score", runtime.batch_score_thresholds), ("down", runtime.batch_down_thresholds)):
                for l, value in found.items():  # noqa: E741
                    value = float(value)
                    if not math.isfinite(value):
                        what = ("MLP predictor's scores" if kind == "score" else "MLP activations (down's input)")
                        raise DejavuError(f"layer {l}: no finite {kind} threshold on the calibration text: the {what} "
                                          "are not finite (a damaged bundle, or a model in a dtype that overflows?), "
                                          "or the density asked keeps every neuron")
                    tokens = int(runtime.batch_score_tokens[l])
                    sums[kind][l] = sums[kind].get(l, 0.0) + value * tokens
                    if kind == "score":
                        counts[l] = counts.get(l, 0) + tokens
        sparse = [d < 1.0 for d in runtime.mlp_density]

    def mean(kind):
        return [sums[kind][l] / counts[l] if sparse[l] else None for l in range(len(sparse))]  # noqa: E741

    return mean("score"), mean("down") if two_stage else None


def calibrate_on_corpus(model, adapter, tokenizer, predictors: PredictorSet, data, tokens: int, max_window: int,
                        mlp_density: float | None = None, head_density: float | None = None,
                        candidate_density: float | None = None,
                        compensation=None) -> tuple[list[float | None], list[float | None] | None]:
    """(score thresholds, down thresholds or None) over the first `tokens` tokens of `data.dataset` (a
    DataConfig), in windows of the model's context or `max_window`, whichever is shorter: how export and bench
    set them. With `candidate_density` the score thresholds keep it and down thresholds keep the MLP density.
    With an MLP compensation (runtime/compensation.py) it runs as at inference: it shifts the later layers'
    inputs, and so the shares the thresholds keep."""
    from dejavu.runtime.quality import model_context
    from dejavu.runtime.thresholds import calibration_ids

    ids = calibration_ids(tokenizer, data, tokens)
    what = "MLP score thresholds" + (" and down thresholds" if candidate_density is not None else "")
    print(f"  calibrating {what} on {ids.numel()} tokens of {data.dataset}", flush=True)
    return _calibrate(model, adapter, predictors, ids, min(model_context(model), max_window), mlp_density,
                      head_density, candidate_density, 4, compensation)


def to_tensor(values: list[float | None]) -> torch.Tensor:
    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)


def from_tensor(tensors: dict[str, torch.Tensor], num_layers: int, mlp_sparse: list[bool],
                where: str, name: str = TENSOR_NAME) -> list[float | None]:
    """The bundle's thresholds (`name`), checked: one per layer, finite wherever the layer's MLP runs sparse."""
    if name not in tensors:
        raise DejavuError(f"{where} lacks {name}, which its manifest describes")
    t = tensors[name]
    if t.ndim != 1 or t.numel() != num_layers:
        raise DejavuError(f"{where}: {name} has shape {tuple(t.shape)}, expected ({num_layers},)")
    values: list[float | None] = []
    for l, (v, sparse) in enumerate(zip(t.tolist(), mlp_sparse, strict=True)):  # noqa: E741
        if sparse and not math.isfinite(v):
            raise DejavuError(f"{where}: layer {l} runs a sparse MLP but its {name} value is {v} (edited file?)")
        values.append(v if sparse else None)
    return values
