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

    @property
    def attention(self) -> bool:
        return self.attn_x is not None

    def describe(self) -> dict:
        return {"keep_input": self.keep_x, "keep_down_input": self.keep_h,
                "keep_attn_input": self.keep_attn if self.attention else None}


@torch.no_grad()
def calibrate_thresholds(model, adapter, tokens: torch.Tensor, keep_x: float, keep_h: float,
                         window: int = 1024, keep_attn: float | None = None) -> Thresholds:
    """Quantiles per layer of |x| (the MLP input) and of the dense |down input| over `tokens` (1-D);
    with keep_attn also of |attention input| and of |o input|."""
    layers = adapter.decoder_layers()
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}

    def record(key):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(key, []).append(x.detach().abs().float().flatten().cpu())
        return hook

    handles = []
    for i, layer in enumerate(layers):
        watched = [("x", adapter.gate_proj(layer) or adapter.up_proj(layer)), ("h", adapter.down_proj(layer))]
        if keep_attn is not None:
            watched += [("attn_x", adapter.attention_module(layer)), ("attn_o", adapter.o_proj(layer))]
        for name, module in watched:
            handles.append(module.register_forward_pre_hook(record((name, i)), with_kwargs=True))
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, tokens.numel(), window), desc="calibrating thresholds", unit="window",
                          leave=False):
            model(tokens[start:start + window][None].to(device))
    finally:
        for h in handles:
            h.remove()

    def quantiles(name: str, keep: float) -> list[float]:
        out = []
        for i in range(len(layers)):
            if keep >= 1.0:
                out.append(-1.0)  # keeps everything, zeros included
                continue
            flat = torch.cat(seen[(name, i)])
            out.append(float(flat.kthvalue(min(flat.numel(), max(1, round((1 - keep) * flat.numel())))).values))
        return out

    attn = keep_attn is not None
    return Thresholds(x=quantiles("x", keep_x), h=quantiles("h", keep_h), keep_x=keep_x, keep_h=keep_h,
                      attn_x=quantiles("attn_x", keep_attn) if attn else None,
                      attn_o=quantiles("attn_o", keep_attn) if attn else None,
                      keep_attn=keep_attn if attn else 1.0)


def calibrate_on_random_tokens(model, adapter, keep_x: float, keep_h: float, tokens: int = 256,
                               keep_attn: float | None = None) -> Thresholds:
    """For random-weight (synthetic) models, which have no corpus: their own activations over random tokens."""
    ids = torch.randint(1, model.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
    return calibrate_thresholds(model, adapter, ids, keep_x, keep_h, window=tokens, keep_attn=keep_attn)


def calibrate_on_corpus(model, adapter, tokenizer, data, tokens: int, keep_x: float, keep_h: float,
                        keep_attn: float | None, max_window: int) -> Thresholds:
    """Thresholds from a dense forward over the first `tokens` tokens of `data.dataset` (a DataConfig:
    dataset, split, text_field) in windows of the model's context or `max_window`, whichever is
    shorter, as `dejavu export` and `dejavu bench` calibrate them."""
    from dejavu.corpus import load_texts, tokenize_stream
    from dejavu.runtime.quality import model_context

    ids = tokenize_stream(load_texts(data.dataset, split=data.split, text_field=data.text_field), tokenizer)[:tokens]
    if ids.numel() == 0:
        raise DejavuError(f"the calibration corpus {data.dataset} gave no tokens")
    print(f"  calibrating thresholds on {ids.numel()} tokens of {data.dataset}", flush=True)
    return calibrate_thresholds(model, adapter, ids, keep_x, keep_h, window=min(model_context(model), max_window),
                                keep_attn=keep_attn)


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
    return Thresholds(keep_x=float(description["keep_input"]), keep_h=float(description["keep_down_input"]),
                      keep_attn=float(description["keep_attn_input"]) if attention else 1.0, **values)
