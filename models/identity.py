"""Model identity: what a bundle records so the runtime can refuse a model it was not made for.

The fingerprint is a list of weight-row norms. Norms (not a byte hash) survive the dtype casts users
make (a bundle trained on fp32 runs on bf16), yet two different checkpoints of the same architecture
differ in them by far more than rounding. Its first values are the first rows of the first and last
layers' up, down, q and o (all that identities recorded before November 2026 hold, and comparisons
stop at the shorter list, so those still match); then rows from the middle of every projection of every
layer and of the embeddings, so a model changed only in its middle layers, its gate, k, v or embeddings
is told apart too.
"""

from __future__ import annotations

import math

import torch

from dejavu.errors import DejavuError
from dejavu.models.adapters import Adapter

FINGERPRINT_ROWS = 4
FINGERPRINT_RTOL = 2e-2


def _row_norms(weight: torch.Tensor, rows) -> list[float]:
    return [round(float(v), 6) for v in weight[rows].float().norm(dim=1)]


@torch.no_grad()
def fingerprint(adapter: Adapter) -> list[float]:
    layers = adapter.decoder_layers()
    values: list[float] = []
    for layer in (layers[0], layers[len(layers) - 1]):
        mlp = adapter.mlp_weights(layer)
        attn = adapter.attention_weights(layer)
        for weight in (mlp.up, mlp.down, attn.q, attn.o):
            values.extend(_row_norms(weight, slice(0, FINGERPRINT_ROWS)))
    for layer in layers:
        mlp = adapter.mlp_weights(layer)
        attn = adapter.attention_weights(layer)
        for weight in (mlp.gate, mlp.up, mlp.down, attn.q, attn.k, attn.v, attn.o):
            if weight is not None:  # (a plain MLP has no gate)
                values.extend(_row_norms(weight, [weight.shape[0] // 3, 2 * weight.shape[0] // 3]))
    try:
        embeddings = adapter.model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # a model class without the accessor: its layers still count
        embeddings = None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        rows = embeddings.weight.shape[0]
        values.extend(_row_norms(embeddings.weight, [rows // 3, 2 * rows // 3]))
    return values


def model_identity(adapter: Adapter, display_name: str) -> dict:
    return {"name": display_name, **adapter.describe(), "fingerprint": fingerprint(adapter)}


IDENTITY_KEYS = ("family", "num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim")


def identity_difference(expected: dict, actual: dict) -> str | None:
    """The first way `actual` (a model_identity) is not the model `expected` describes, or None."""
    for key in IDENTITY_KEYS:
        if key in expected and key in actual and expected[key] != actual[key]:
            return (f"a model with {key}={expected[key]} ({expected.get('name', '?')}), "
                    f"but the loaded model has {key}={actual[key]}")
    want, got = expected.get("fingerprint"), actual.get("fingerprint")
    if want and not (isinstance(want, list) and all(isinstance(v, (int, float)) for v in want)):
        return f"a model whose recorded fingerprint is unreadable ({str(want)[:40]!r}: edited?)"
    if want and got:
        for i, (a, b) in enumerate(zip(want, got, strict=False)):
            if not math.isclose(a, b, rel_tol=FINGERPRINT_RTOL, abs_tol=1e-6):
                return (f"other weights than the loaded model's (fingerprint value {i}: {a:.4g} vs {b:.4g}); "
                        f"was it made for {expected.get('name', '?')}?")
    return None


def check_identity(expected: dict, adapter: Adapter, what: str = "bundle") -> None:
    """Raise a DejavuError naming the first difference between `expected` and the loaded model."""
    actual = adapter.describe()
    if expected.get("fingerprint"):
        actual["fingerprint"] = fingerprint(adapter)
    difference = identity_difference(expected, actual)
    if difference:
        raise DejavuError(f"{what} was made for {difference}")
