"""Per-layer thresholds on the MLP predictors' scores (runtime/apply.py `mlp_score_thresholds`).

A top-k gives every token the same number of neurons. A threshold on the predictor's score lets a token
whose scores are confident keep fewer and an uncertain one more, at the same mean. Each layer's
threshold is the score quantile that keeps the layer's density on calibration text, measured with the
model running sparse: layer l's inputs are those its sparse predecessors give, as at inference, so the
kept share there is the density asked (a dense forward would set thresholds that keep more once
the earlier layers run sparse).

In a bundle (export/bundle.py): one fp32 tensor [num_layers] named `score_thresholds.mlp`, NaN for a
layer that runs its MLP dense, described by the manifest's `mlp_score_thresholds`.
"""

from __future__ import annotations

import math

import torch

from dejavu.errors import DejavuError
from dejavu.predictor import PredictorSet

TENSOR_NAME = "score_thresholds.mlp"


@torch.no_grad()
def calibrate_score_thresholds(model, adapter, predictors: PredictorSet, ids: torch.Tensor, window: int,
                               mlp_density: float | None = None, head_density: float | None = None,
                               windows_per_forward: int = 4) -> list[float | None]:
    """Each layer's MLP score threshold from sparse forwards over `ids` (1-D token ids) in windows of
    `window`; each window's thresholds are the quantiles of its own scores, averaged over the windows.
    Layers without an MLP predictor (density 1.0) get None. The MLP and heads run at
    `mlp_density` / `head_density` (None: the bundle's per-layer ones), as they will at inference."""
    from dejavu.runtime.apply import SparseRuntime

    ids = ids.reshape(-1)
    usable = ids.numel() // window * window
    if usable == 0:  # shorter than one window: one window of all of it
        rows = [ids[None]]
    else:
        chunks = ids[:usable].reshape(-1, window)
        rows = [chunks[i:i + windows_per_forward] for i in range(0, chunks.shape[0], windows_per_forward)]
    device = next(model.parameters()).device
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    with SparseRuntime(model, adapter, predictors, selection="predictor", mlp_density=mlp_density,
                       head_density=head_density, mlp_score_thresholds="batch") as runtime:
        for batch in rows:
            runtime.batch_score_thresholds.clear()
            model(input_ids=batch.to(device), use_cache=False)
            for l, value in runtime.batch_score_thresholds.items():  # noqa: E741
                value = float(value)
                if not math.isfinite(value):
                    raise DejavuError(f"layer {l}: the MLP predictor's scores on the calibration text are not finite "
                                      "(a damaged bundle, or a model in a dtype that overflows?)")
                tokens = int(runtime.batch_score_tokens[l])
                sums[l] = sums.get(l, 0.0) + value * tokens
                counts[l] = counts.get(l, 0) + tokens
        sparse = [d < 1.0 for d in runtime.mlp_density]
    return [sums[l] / counts[l] if sparse[l] else None for l in range(len(sparse))]  # noqa: E741


def calibrate_on_corpus(model, adapter, tokenizer, predictors: PredictorSet, data, tokens: int, max_window: int,
                        mlp_density: float | None = None, head_density: float | None = None) -> list[float | None]:
    """calibrate_score_thresholds over the first `tokens` tokens of `data.dataset` (a DataConfig), in
    windows of the model's context or `max_window`, whichever is shorter: how export and bench set them."""
    from dejavu.runtime.quality import model_context
    from dejavu.runtime.thresholds import calibration_ids

    ids = calibration_ids(tokenizer, data, tokens)
    print(f"  calibrating MLP score thresholds on {ids.numel()} tokens of {data.dataset}", flush=True)
    return calibrate_score_thresholds(model, adapter, predictors, ids, min(model_context(model), max_window),
                                      mlp_density=mlp_density, head_density=head_density)


def to_tensor(values: list[float | None]) -> torch.Tensor:
    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)


def from_tensor(tensors: dict[str, torch.Tensor], num_layers: int, mlp_sparse: list[bool],
                where: str) -> list[float | None]:
    """The bundle's thresholds, checked: one per layer, finite wherever the layer's MLP runs sparse."""
    if TENSOR_NAME not in tensors:
        raise DejavuError(f"{where} lacks {TENSOR_NAME}, which its manifest describes")
    t = tensors[TENSOR_NAME]
    if t.ndim != 1 or t.numel() != num_layers:
        raise DejavuError(f"{where}: {TENSOR_NAME} has shape {tuple(t.shape)}, expected ({num_layers},)")
    values: list[float | None] = []
    for l, (v, sparse) in enumerate(zip(t.tolist(), mlp_sparse, strict=True)):  # noqa: E741
        if sparse and not math.isfinite(v):
            raise DejavuError(f"{where}: layer {l} runs a sparse MLP but its score threshold is {v} (edited file?)")
        values.append(v if sparse else None)
    return values
