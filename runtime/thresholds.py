"""Per-layer magnitude thresholds for TEAL-style sparsity (no predictor, no selection step).

MLP: each decode step drops, per sequence, the entries of the MLP's input x whose |x| is at or below the
layer's x threshold (gate and up then read only the kept columns) and the entries of down's input at or
below its h threshold (down reads only the kept rows).
Attention (optional, `keep_attn`): the same for the q/k/v projections' input (they read only the kept
columns; every head is still computed, from the kept entries) and for o's input (o reads only the rows
of the kept entries). This is TEAL's whole-model rule.

The thresholds are quantiles of those magnitudes over calibration text, set so that the given shares
are kept on average there; the shares kept on other text differ a little (the runtime's stats report
them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from dejavu.errors import DejavuError


@dataclass
class Thresholds:
    x: list[float]  # per layer: |MLP input| above this is kept (gate/up columns read)
    h: list[float]  # per layer: |down input| above this is kept (down rows read)
    keep_x: float  # the shares they were calibrated to keep
    keep_h: float
    attn_x: list[float] | None = None  # per layer: |q/k/v input| above this is kept; None: attention dense
    attn_o: list[float] | None = None  # per layer: |o input| above this is kept
    keep_attn: float = 1.0
    # Set by a greedy allocation (runtime/allocation.py): per input ("x", "h", "attn_x", "attn_o"), the
    # share each layer keeps, and the share of each layer's weight bytes they were chosen to read. Then
    # keep_x / keep_h / keep_attn are means over the layers (keep_attn: of q/k/v's input).
    layer_shares: dict[str, list[float]] | None = None
    layer_bytes: float | None = None

    @property
    def attention(self) -> bool:
        return self.attn_x is not None

    def share(self, name: str, layer: int) -> float:
        """The share of input `name` that layer `layer` was calibrated to keep."""
        if self.layer_shares is not None:
            return self.layer_shares[name][layer]
        return {"x": self.keep_x, "h": self.keep_h, "attn_x": self.keep_attn, "attn_o": self.keep_attn}[name]

    def describe(self) -> dict:
        out = {"keep_input": self.keep_x, "keep_down_input": self.keep_h,
               "keep_attn_input": self.keep_attn if self.attention else None}
        if self.layer_shares is not None:
            out["allocation"] = {"rule": "greedy", "layer_bytes": self.layer_bytes,
                                 "layer_shares": self.layer_shares}
        return out


@torch.no_grad()
def magnitude_quantiles(model, adapter, tokens: torch.Tensor, shares: dict[str, list[float]],
                        window: int = 1024) -> dict[str, list[list[float]]]:
    """From a dense forward over `tokens` (1-D) in windows of `window`: per input named in `shares` ("x": the
    MLP's input, "h": down's input, "attn_x": attention's input, "attn_o": o's input) and per layer, the
    threshold that keeps each share of that input's entries (|value| above it). Share 1.0 gives -1: zeros
    are kept too."""
    layers = adapter.decoder_layers()
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}

    def record(key):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(key, []).append(x.detach().abs().float().flatten().cpu())
        return hook

    modules = {"x": lambda layer: adapter.mlp_input_projections(layer)[0],
               "h": adapter.down_proj, "attn_x": adapter.attention_module, "attn_o": adapter.o_proj}
    handles = [modules[name](layer).register_forward_pre_hook(record((name, i)), with_kwargs=True)
               for i, layer in enumerate(layers) for name in shares]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, tokens.numel(), window), desc="calibrating thresholds", unit="window",
                          leave=False):
            model(tokens[start:start + window][None].to(device))
    finally:
        for h in handles:
            h.remove()

    out: dict[str, list[list[float]]] = {name: [] for name in shares}
    for i in range(len(layers)):
        for name, keeps in shares.items():
            ordered = torch.cat(seen.pop((name, i))).sort().values
            n = ordered.numel()
            out[name].append([-1.0 if keep >= 1.0 else float(ordered[min(n, max(1, round((1 - keep) * n))) - 1])
                              for keep in keeps])
    return out


def calibrate_thresholds(model, adapter, tokens: torch.Tensor, keep_x: float, keep_h: float,
                         window: int = 1024, keep_attn: float | None = None) -> Thresholds:
    """Quantiles per layer of |x| (the MLP input) and of the dense |down input| over `tokens` (1-D);
    with keep_attn also of |attention input| and of |o input|."""
    attn = keep_attn is not None
    shares = {"x": [keep_x], "h": [keep_h], **({"attn_x": [keep_attn], "attn_o": [keep_attn]} if attn else {})}
    table = magnitude_quantiles(model, adapter, tokens, shares, window)

    def quantiles(name: str) -> list[float]:
        return [per_layer[0] for per_layer in table[name]]

    return Thresholds(x=quantiles("x"), h=quantiles("h"), keep_x=keep_x, keep_h=keep_h,
                      attn_x=quantiles("attn_x") if attn else None,
                      attn_o=quantiles("attn_o") if attn else None,
                      keep_attn=keep_attn if attn else 1.0)


def calibrate(model, adapter, ids: torch.Tensor, keep_x: float | None, keep_h: float, keep_attn: float | None,
              layer_bytes: float | None, window: int) -> Thresholds:
    """Uniform shares (keep_x, keep_h, keep_attn), or with `layer_bytes` the greedy split of that share of
    every layer's weight bytes (runtime/allocation.py)."""
    if layer_bytes is not None:
        from dejavu.runtime.allocation import greedy_allocation

        return greedy_allocation(model, adapter, ids, layer_bytes, window=window).thresholds(layer_bytes)
    return calibrate_thresholds(model, adapter, ids, keep_x, keep_h, window=window, keep_attn=keep_attn)


RANDOM_CALIBRATION_TOKENS = 256  # what synthetic (random-weight) models calibrate any thresholds on


def random_calibration_ids(model, tokens: int = RANDOM_CALIBRATION_TOKENS) -> torch.Tensor:
    """Random token ids (seeded) for random-weight (synthetic) models, which no corpus fits: thresholds then
    come from their own activations over these."""
    return torch.randint(1, model.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))


def calibrate_on_random_tokens(model, adapter, keep_x: float | None, keep_h: float,
                               tokens: int = RANDOM_CALIBRATION_TOKENS, keep_attn: float | None = None,
                               layer_bytes: float | None = None) -> Thresholds:
    """For random-weight (synthetic) models, which have no corpus: their own activations over random tokens."""
    return calibrate(model, adapter, random_calibration_ids(model, tokens), keep_x, keep_h, keep_attn, layer_bytes,
                     window=tokens)


def calibration_ids(tokenizer, data, tokens: int) -> torch.Tensor:
    """The first `tokens` token ids of the calibration corpus `data.dataset` (a DataConfig: dataset, split,
    text_field), with errors that name the flag setting it."""
    from dejavu.corpus import load_texts, tokenize_stream

    try:
        texts = load_texts(data.dataset, split=data.split, text_field=data.text_field)
    except DejavuError as exc:  # the flag the user gave (or its default) is what to name
        raise DejavuError(f"calibration corpus (--calibration, else data.dataset): {exc}") from None
    ids = tokenize_stream(texts, tokenizer, f"calibration corpus {data.dataset}")[:tokens]
    if ids.numel() == 0:
        raise DejavuError(f"the calibration corpus {data.dataset} gave no tokens")
    return ids


def calibrate_on_corpus(model, adapter, tokenizer, data, tokens: int, keep_x: float | None, keep_h: float,
                        keep_attn: float | None, max_window: int, layer_bytes: float | None = None) -> Thresholds:
    """Thresholds from a dense forward over the first `tokens` tokens of `data.dataset` (a DataConfig:
    dataset, split, text_field) in windows of the model's context or `max_window`, whichever is
    shorter, as `dejavu export` and `dejavu bench` calibrate them."""
    from dejavu.runtime.quality import model_context

    ids = calibration_ids(tokenizer, data, tokens)
    print(f"  calibrating thresholds on {ids.numel()} tokens of {data.dataset}", flush=True)
    return calibrate(model, adapter, ids, keep_x, keep_h, keep_attn, layer_bytes,
                     window=min(model_context(model), max_window))


# In a bundle (export/bundle.py): one fp32 tensor [num_layers] per kind, under these names
TENSOR_NAMES = {"x": "thresholds.mlp_input", "h": "thresholds.down_input", "attn_x": "thresholds.attn_input",
                "attn_o": "thresholds.o_input"}


def thresholds_to_tensors(t: Thresholds) -> dict[str, torch.Tensor]:
    out = {}
    for field_name, key in TENSOR_NAMES.items():
        values = getattr(t, field_name)
        if values is not None:
            out[key] = torch.tensor(values, dtype=torch.float32)
    return out


def thresholds_from_tensors(tensors: dict[str, torch.Tensor], description: dict, num_layers: int,
                            where: str) -> Thresholds:
    """The inverse of thresholds_to_tensors, checked: every list is there, one finite value a layer."""
    def share(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value <= 1.0

    allocation = description.get("allocation") if isinstance(description, dict) else None
    if (not isinstance(description, dict) or not share(description.get("keep_input"))
            or not share(description.get("keep_down_input"))
            or not (description.get("keep_attn_input") is None or share(description["keep_attn_input"]))
            or not (allocation is None or (isinstance(allocation, dict) and share(allocation.get("layer_bytes"))))):
        raise DejavuError(f"{where}: the manifest's thresholds must give keep_input and keep_down_input (shares in "
                          f"(0, 1]), keep_attn_input and allocation or null, got {description!r} (edited manifest?)")
    attention = description.get("keep_attn_input") is not None
    values = {}
    for field_name, key in TENSOR_NAMES.items():
        if field_name.startswith("attn") and not attention:
            values[field_name] = None
            continue
        if key not in tensors:
            raise DejavuError(f"{where}: the manifest lists thresholds but the file lacks {key}")
        v = tensors[key]
        if v.shape != (num_layers,) or not torch.isfinite(v).all():
            raise DejavuError(f"{where}: {key} must hold one finite value per layer ({num_layers}), "
                              f"got shape {tuple(v.shape)}")
        values[field_name] = [float(a) for a in v]
    layer_shares = layer_bytes = None
    if allocation is not None:  # a greedy allocation: the shares each layer keeps
        layer_shares = allocation.get("layer_shares") or {}
        for name in TENSOR_NAMES:
            shares = layer_shares.get(name)
            if (not isinstance(shares, list) or len(shares) != num_layers
                    or not all(isinstance(v, (int, float)) and 0.0 < v <= 1.0 for v in shares)):
                raise DejavuError(f"{where}: thresholds.allocation.layer_shares[{name!r}] must hold one share in "
                                  f"(0, 1] per layer ({num_layers})")
        layer_shares = {name: [float(v) for v in layer_shares[name]] for name in TENSOR_NAMES}
        layer_bytes = float(allocation["layer_bytes"])
    return Thresholds(keep_x=float(description["keep_input"]), keep_h=float(description["keep_down_input"]),
                      keep_attn=float(description["keep_attn_input"]) if attention else 1.0,
                      layer_shares=layer_shares, layer_bytes=layer_bytes, **values)
