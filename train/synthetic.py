"""A synthetic `RUN/collect/` in the exact on-disk format of docs/FORMATS.md, for tests and benches.

The labels follow a planted rule a low-rank linear predictor can represent exactly: a neuron's
|activation| is exp(x @ W.T) with W of low rank, so its top-k set is the top-k of a linear score.
Block inputs drift slowly from layer to layer (like a residual stream), so lookahead pairing works too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dejavu.artifacts import file_entry, save_tensors, write_manifest
from dejavu.bits import pack_bits
from dejavu.collect.collect import DOWN_WEIGHTS
from dejavu.config import RunConfig
from dejavu.fp8 import quantize_rows
from dejavu.predictor import topk_mask


def synthetic_identity(num_layers: int, hidden: int, neurons: int, heads: int) -> dict:
    return {
        "name": "synthetic", "family": "llama", "model_type": "llama", "num_layers": num_layers,
        "hidden_size": hidden, "intermediate_size": neurons, "num_heads": heads, "num_kv_heads": heads,
        "head_dim": max(1, hidden // heads), "gated_mlp": True, "activation": "silu", "fingerprint": [],
    }


def write_synthetic_collect(
    run: str | Path,
    *,
    num_layers: int = 2,
    hidden: int = 32,
    neurons: int = 64,
    heads: int = 4,
    train_tokens: int = 2048,
    eval_tokens: int = 512,
    shard_tokens: int = 512,
    rule_rank: int = 4,
    densities: tuple[float, ...] = (0.5,),
    seed: int = 0,
    config: RunConfig | None = None,
    down_inputs: bool = False,
) -> dict:
    """Write RUN/collect/ (shards + manifest) and return the manifest. down_inputs: also the MLP's down
    inputs (signed: each neuron's sign fixed at random) and a random down projection, as collect's
    record_down_input writes them."""
    gen = torch.Generator().manual_seed(seed)
    out = Path(run) / "collect"
    (out / "shards").mkdir(parents=True, exist_ok=True)
    # Non-zero means and uneven scales, so the predictor's input standardisation matters.
    offset = torch.randn(hidden, generator=gen) * 3
    scale = torch.rand(hidden, generator=gen) * 4 + 0.25
    drift = [torch.randn(hidden, hidden, generator=gen) * 0.02 for _ in range(num_layers)]
    # Neurons come in opposite pairs (w, -w): exactly one of each pair has a positive score, so the
    # top-half set is the set of positive scores, a rule with a margin a linear predictor can learn.
    half = [torch.randn(neurons // 2, rule_rank, generator=gen) @ torch.randn(rule_rank, hidden, generator=gen)
            / (rule_rank * hidden) ** 0.5 for _ in range(num_layers)]
    mlp_rules = [torch.cat([w, -w]) for w in half]
    head_rules = [torch.randn(heads, hidden, generator=gen) / hidden**0.5 for _ in range(num_layers)]
    signs = torch.randint(0, 2, (neurons,), generator=gen).float() * 2 - 1
    downs = {f"down.{layer}": (torch.randn(hidden, neurons, generator=gen) / neurons**0.5).to(torch.float16)
             for layer in range(num_layers)}

    shards, files = [], []
    for split, total in (("train", train_tokens), ("eval", eval_tokens)):
        for index, start in enumerate(range(0, total, shard_tokens)):
            t = min(shard_tokens, total - start)
            z = torch.randn(t, hidden, generator=gen)
            tensors: dict[str, torch.Tensor] = {}
            for layer in range(num_layers):
                if layer:
                    z = z + z @ drift[layer]
                x = z * scale + offset
                act = torch.exp((z @ mlp_rules[layer].T).clamp(max=10))
                tensors[f"input.{layer}"] = x.to(torch.float16)
                for d in densities:
                    tensors[f"mlp_labels.{layer}@{format(d, 'g')}"] = pack_bits(topk_mask(act, d))
                tensors[f"head_norms.{layer}"] = torch.exp(z @ head_rules[layer].T).to(torch.float16)
                if split == "eval":
                    tensors[f"mlp_act.{layer}"] = act.to(torch.float16)
                if down_inputs:
                    q, row_scale = quantize_rows(act * signs)
                    tensors[f"mlp_down_input.{layer}"], tensors[f"mlp_down_scale.{layer}"] = q, row_scale
            path = out / "shards" / f"{split}-r00-{index:05d}.safetensors"
            digest = save_tensors(path, tensors)
            entry = file_entry(path, out, digest)
            files.append(entry)
            shards.append({**entry, "split": split, "rank": 0, "index": index, "tokens": t})

    if down_inputs:
        files.append(file_entry(out / DOWN_WEIGHTS, out, save_tensors(out / DOWN_WEIGHTS, downs)))
    cfg = config or RunConfig()
    cfg.collect.mlp_label_densities = list(densities)
    cfg.collect.record_down_input = down_inputs
    return write_manifest(
        out, "dejavu.collect", cfg.to_dict(), files,
        model=synthetic_identity(num_layers, hidden, neurons, heads),
        tokens=train_tokens + eval_tokens, train_tokens=train_tokens, eval_tokens=eval_tokens,
        seq_len=cfg.data.seq_len, world_size=1, mlp_label_rule="topk",
        mlp_label_tags=[format(d, "g") for d in densities], input_dtype="float16", shards=shards,
        down_inputs=down_inputs, down_weights=DOWN_WEIGHTS if down_inputs else None,
        stats={str(layer): {} for layer in range(num_layers)},
    )
