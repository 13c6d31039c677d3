"""Closed-form predictors: reduced-rank regression of the MLP's gate and up pre-activations.

A neuron's |act| is |silu(gate)| x |up|; a linear predictor of the top-k label cannot model |up| (it is
symmetric in up's sign). This fits, with no training loop, the best rank-r linear map (least squares,
then the top-r directions of its fitted values) from a layer's block input to [gate; up] computed
from the MLP's own input, scores each neuron by |silu(g^) u^| and reports the held-out mass kept at
density 0.5, next to the exact gate and exact up alone (what CATS-style and up-only rules see).

A low-bit copy of gate and up is a closed-form predictor too (full rank, few bits): `--quant-bits 2,3,4`
adds |silu(h Q(Wg)^T) * (h Q(Wu)^T)| from the MLP's own input h (so the copy is read after attention, on
the critical path), quantised as `bench/selection_rules.py`'s quant-clip rule.

Usage: python bench/lowrank_regression.py [--layers 1,15,29] [--train-tokens 65536] [--ranks 32,64,128,256]
       [--input block|mlp] [--quant-bits 2,3,4]
The last 8,192 of the collected tokens are held out.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from selection_rules import fake_quantize_clipped  # bench/ is on the path when run as a script

from dejavu.models.loading import load_model, load_tokenizer


def keep_largest_inputs(h: torch.Tensor, keep: float) -> torch.Tensor:
    """Each row with all but its largest-|x| share `keep` of channels zeroed: what a copy reads when it
    skips the columns of small inputs."""
    m = max(1, round(keep * h.shape[1]))
    idx = h.abs().topk(m, dim=1).indices
    return torch.zeros_like(h).scatter_(1, idx, h.gather(1, idx))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="../shared/data/wikitext-2/valid.txt")
    ap.add_argument("--layers", default="1,15,29")
    ap.add_argument("--train-tokens", type=int, default=65536)
    ap.add_argument("--held-out", type=int, default=8192)
    ap.add_argument("--ranks", default="32,64,128,256")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--input", default="block", choices=["block", "mlp"],
                    help="what the map reads: the layer's block input (what the predictors read) or the MLP's "
                         "own input (after attention: exact at full rank, but only known once attention ran)")
    ap.add_argument("--quant-bits", default="",
                    help="comma-separated bit widths of a low-bit copy of gate/up scored on the MLP's input")
    ap.add_argument("--input-keep", default="",
                    help="comma list of shares of the MLP input's channels (largest |x| per token) the low-bit "
                         "copies read, e.g. 0.25,0.5: the predictor's own input sparsity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = [int(v) for v in args.layers.split(",")]
    model = load_model(args.model, device="cpu", dtype="float32")[0]
    tok = load_tokenizer(args.model)
    ids = tok(open(args.text).read(), return_tensors="pt").input_ids[0]
    seq = 512
    nseq = (args.train_tokens + args.held_out) // seq
    ids = ids[: nseq * seq].view(nseq, seq)
    hidden = model.config.hidden_size
    block_in = {layer: [] for layer in layers}
    mlp_in = {layer: [] for layer in layers}
    hooks = []
    for layer in layers:
        block = model.model.layers[layer]
        hooks.append(block.register_forward_pre_hook(
            lambda m, a, kw, layer=layer: block_in[layer].append(kw.get("hidden_states", a[0] if a else None)
                                                                 .reshape(-1, hidden).clone()), with_kwargs=True))
        hooks.append(block.mlp.register_forward_pre_hook(
            lambda m, a, layer=layer: mlp_in[layer].append(a[0].reshape(-1, hidden).clone())))
    started = time.time()
    with torch.no_grad():
        for i in range(0, nseq, 8):
            model(ids[i:i + 8])
    print(f"forward over {nseq * seq} tokens: {time.time() - started:.0f} s", flush=True)
    ranks = [int(v) for v in args.ranks.split(",")]
    results = {}
    tr, ev = slice(0, args.train_tokens), slice(args.train_tokens, None)
    for layer in layers:
        x, h = torch.cat(block_in[layer]).double(), torch.cat(mlp_in[layer]).double()
        mlp = model.model.layers[layer].mlp
        gate, up = h @ mlp.gate_proj.weight.double().T, h @ mlp.up_proj.weight.double().T
        n = gate.shape[1]
        k = max(1, round(args.density * n))
        act = (F.silu(gate) * up).abs()
        oracle = act[ev].topk(k, dim=1).values.sum(1)

        def mass(score: torch.Tensor, act_ev=act[ev], oracle=oracle, k=k) -> float:
            """Held-out |act| mass of the top-k by score over the oracle top-k's, averaged over tokens."""
            chosen = score.topk(k, dim=1).indices
            return (act_ev.gather(1, chosen).sum(1) / oracle).mean().item()

        src = x if args.input == "block" else h
        z = torch.cat([src, torch.ones(len(src), 1, dtype=src.dtype)], 1)  # the input and a bias column
        y = torch.cat([gate, up], 1)
        gram = z[tr].T @ z[tr]
        ridge = 1e-3 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        coef = torch.linalg.solve(gram + ridge, z[tr].T @ y[tr])
        fitted = z[tr] @ coef
        _, _, vh = torch.linalg.svd(fitted - fitted.mean(0), full_matrices=False)
        row = {"exact_gate": mass(F.silu(gate[ev]).abs()), "exact_up": mass(up[ev].abs())}
        for r in [*ranks, None]:  # None: full rank (the plain least-squares map)
            c = coef if r is None else coef @ (vh[:r].T @ vh[:r])
            pred = z[ev] @ c
            row[f"rank_{r or 'full'}"] = mass((F.silu(pred[:, :n]) * pred[:, n:]).abs())
        for bits in [int(b) for b in args.quant_bits.split(",") if b]:
            qg, qu = (fake_quantize_clipped(w.weight.double(), bits) for w in (mlp.gate_proj, mlp.up_proj))
            row[f"quant_{bits}bit"] = mass((F.silu(h[ev] @ qg.T) * (h[ev] @ qu.T)).abs())
            for keep in [float(v) for v in args.input_keep.split(",") if v]:
                hs = keep_largest_inputs(h[ev], keep)
                row[f"quant_{bits}bit_in{keep:g}"] = mass((F.silu(hs @ qg.T) * (hs @ qu.T)).abs())
        for keep in [float(v) for v in args.input_keep.split(",") if v]:
            hs = keep_largest_inputs(h[ev], keep)
            row[f"exact_in{keep:g}"] = mass((F.silu(hs @ mlp.gate_proj.weight.double().T)
                                             * (hs @ mlp.up_proj.weight.double().T)).abs())
        results[str(layer)] = row
        print(f"layer {layer}: " + " ".join(f"{key} {value:.3f}" for key, value in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "mass_kept": results}, fh, indent=1)


if __name__ == "__main__":
    main()
