"""How a layer's byte budget is split over its thresholded inputs (TEAL's block-wise greedy).

Uniform thresholds keep the same share of every input (q/k/v's, o's, gate/up's, down's). Inputs differ in
how much dropping their small entries costs: on SmolLM2 dropping half of the MLP's input costs far more
than dropping half of down's. `greedy_allocation` finds, per decoder layer, shares that keep a given
share of the layer's weight bytes at the least error in the layer's output:

- one dense forward over calibration text records each layer's input (and the arguments the model
  passes its layers), so every layer can then be run alone on its true dense input;
- per layer, the magnitudes of each thresholded input give a table of thresholds for the shares
  1, 1 - step, ..., step (quantiles, as `calibrate_thresholds` sets them);
- starting from everything kept, each round lowers one input's share by `step`: the one whose step adds
  the least squared error in the layer's output per weight byte saved (measured lazily: see
  `_greedy_path`), until the layer reads at most the lowest target asked for. The path gives the shares
  for any target above that.

Every layer gets the same budget (as in TEAL); only the split inside a layer is searched. The hooks that
mask and record live in `_LayerProbe`; the search itself is plain arithmetic on its results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from dejavu.errors import DejavuError
from dejavu.runtime.thresholds import Thresholds, magnitude_quantiles

# The thresholded inputs of a layer: q/k/v's input (attention), o's input, gate/up's input, down's input.
INPUTS = ("attn_x", "attn_o", "x", "h")


def input_weights(adapter) -> dict[str, int]:
    """Weight elements each input gates: a dropped entry of it skips one row of these matrices."""
    s = adapter.shape()
    d, n, hd = s.hidden_size, s.intermediate_size, s.head_dim
    return {"attn_x": (s.num_heads + 2 * s.num_kv_heads) * hd * d, "attn_o": s.num_heads * hd * d,
            "x": (2 if adapter.gated else 1) * n * d, "h": n * d}


@dataclass
class LayerPath:
    """The greedy path of one layer: shares kept per input at each round, and the layer's bytes share."""

    shares: list[dict[str, float]]
    bytes_share: list[float]

    def at(self, target: float) -> dict[str, float]:
        """The first point of the path that reads at most `target` of the layer's weight bytes."""
        for shares, share in zip(self.shares, self.bytes_share, strict=True):
            if share <= target + 1e-9:
                return shares
        raise DejavuError(f"the greedy path stops at {self.bytes_share[-1]:.3f} of the layer's bytes; "
                          f"{target} asks for less")


@dataclass
class Allocation:
    """Per layer: thresholds for every share on the grid, and the greedy path over them."""

    grid: list[float]  # shares kept, 1.0 first
    tables: list[dict[str, list[float]]]  # per layer and input: threshold for each grid share
    paths: list[LayerPath]

    def thresholds(self, target: float) -> Thresholds:
        """Thresholds that keep `target` of every layer's weight bytes, split as the greedy path found."""
        chosen = [path.at(target) for path in self.paths]
        per_input = {name: [self.tables[i][name][self.grid.index(c[name])] for i, c in enumerate(chosen)]
                     for name in INPUTS}
        shares = {name: [c[name] for c in chosen] for name in INPUTS}
        return Thresholds(x=per_input["x"], h=per_input["h"], attn_x=per_input["attn_x"],
                          attn_o=per_input["attn_o"], keep_x=_mean(shares["x"]), keep_h=_mean(shares["h"]),
                          keep_attn=_mean(shares["attn_x"]), layer_shares=shares, layer_bytes=target)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class _LayerMasks:
    """Forward hooks on one decoder layer that drop the entries of each thresholded input at or below its
    threshold (while `thresholds` is set)."""

    def __init__(self, adapter, layer):
        self.modules = {"attn_x": [adapter.attention_module(layer)], "attn_o": [adapter.o_proj(layer)],
                        "x": adapter.mlp_input_projections(layer),
                        "h": [adapter.down_proj(layer)]}
        self.thresholds: dict[str, float] | None = None
        self.handles = [module.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                        for name, modules in self.modules.items() for module in modules]

    def _hook(self, name: str):
        def transform(x: torch.Tensor) -> torch.Tensor:
            if self.thresholds is None:
                return x
            return x * (x.abs() > self.thresholds[name]).to(x.dtype)

        def hook(module, args, kwargs):
            if args:
                return (transform(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": transform(kwargs["hidden_states"])}

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _layer_output(layer, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _record_layer_calls(model, layers, tokens: torch.Tensor, window: int) -> tuple[list, list]:
    """Each layer's dense input [windows, window, d] and the other arguments the model passed it."""
    usable = tokens.numel() // window * window
    if usable == 0:
        raise DejavuError(f"greedy allocation needs at least one window of {window} calibration tokens, "
                          f"got {tokens.numel()}")
    batch = tokens[:usable].view(-1, window)
    inputs: list = [None] * len(layers)
    calls: list = [None] * len(layers)

    def capture(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = tuple(args[1:]) if args else ()
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            inputs[i], calls[i] = hidden.detach().clone(), (rest, kw)
        return hook

    handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(batch.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return inputs, calls


@torch.no_grad()
def greedy_allocation(model, adapter, tokens: torch.Tensor, lowest_target: float, window: int = 1024,
                      step: float = 0.05, search_tokens: int = 1024, search_window: int = 512) -> Allocation:
    """The greedy split of each layer's byte budget, down to `lowest_target` of its weight bytes.
    Thresholds are quantiles over all of `tokens` (1-D, in windows of `window`), as calibrate_thresholds
    sets them; the search measures the layers' output error on the first `search_tokens` of them, in
    windows of `search_window` (each layer runs once per candidate step, so this is the cost)."""
    if not 0.0 < lowest_target <= 1.0:
        raise DejavuError(f"the layer bytes target must be in (0, 1], got {lowest_target}")
    if not 0.0 < step < 1.0:
        raise DejavuError(f"the greedy step must be in (0, 1), got {step}")
    grid = [1.0]
    while grid[-1] - step > 1e-9:
        grid.append(round(grid[-1] - step, 6))
    weights = input_weights(adapter)
    total = sum(weights.values())
    layers = adapter.decoder_layers()
    tables = magnitude_quantiles(model, adapter, tokens, {name: grid for name in INPUTS}, window)
    tables = [{name: tables[name][i] for name in INPUTS} for i in range(len(layers))]
    window = min(search_window, search_tokens, tokens.numel())
    inputs, calls = _record_layer_calls(model, layers, tokens[:max(search_tokens, window)], window)
    paths = []
    for i in tqdm(range(len(layers)), desc="greedy allocation", unit="layer", leave=False):
        masks = _LayerMasks(adapter, layers[i])
        try:
            error = _output_error(layers[i], inputs[i], calls[i], tables[i], masks)
            paths.append(_greedy_path(error, weights, total, grid, step, lowest_target))
        finally:
            masks.remove()
    return Allocation(grid=grid, tables=tables, paths=paths)


def _output_error(layer, hidden: torch.Tensor, call, table: dict[str, list[float]], masks: _LayerMasks):
    """error(position): the squared error of the layer's output with each input at its grid position."""
    dense = _layer_output(layer, hidden, call).float()

    def error(position: dict[str, int]) -> float:
        masks.thresholds = {name: table[name][position[name]] for name in INPUTS}
        try:
            out = _layer_output(layer, hidden, call).float()
        finally:
            masks.thresholds = None
        return float(((out - dense) ** 2).sum(dtype=torch.float64))

    return error


def _greedy_path(error, weights: dict[str, int], total: int, grid: list[float], step: float,
                 lowest_target: float) -> LayerPath:
    """From everything kept, lower one input's share a step at a time: the step that adds the least error per
    weight byte saved, until the layer reads at most `lowest_target` of its bytes or nothing is left to lower.

    Lazily: a step's cost rarely falls as the layer gets sparser, so each input keeps the cost last
    measured for it, and only the cheapest one is measured again at the current point. It is taken if it
    is still the cheapest; otherwise the next cheapest is measured. About 1-2 layer runs a step instead
    of one per input."""
    position = {name: 0 for name in INPUTS}
    current, share = 0.0, 1.0
    path = LayerPath(shares=[{name: 1.0 for name in INPUTS}], bytes_share=[1.0])
    known: dict[str, float] = {}  # last measured cost per input (a lower bound on its cost now)
    while share > lowest_target + 1e-9:
        open_inputs = [name for name in INPUTS if position[name] + 1 < len(grid)]
        if not open_inputs:
            break
        fresh: dict[str, float] = {}  # measured at this point: input -> error after its step
        while True:
            name = min(open_inputs, key=lambda n: known.get(n, float("-inf")))
            if name in fresh:
                break  # the cheapest is measured at this point: take it
            fresh[name] = error({**position, name: position[name] + 1})
            known[name] = (fresh[name] - current) / (weights[name] * step)
        position = {**position, name: position[name] + 1}
        current = fresh[name]
        share -= weights[name] * step / total
        path.shares.append({n: grid[position[n]] for n in INPUTS})
        path.bytes_share.append(share)
    return path
