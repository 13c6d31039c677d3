"""What a predictor keeps against what it costs: held-out recall and |activation| mass kept per rank
(and loss), with the predictor's bytes as a share of the layer's weight bytes. Picks the default rank.

    python bench/predictor_rank.py --run runs/smol65k --layers 1,15,29 --ranks 16,32,64,128 \
        --losses bce,bce+rank,bce+output --json rank.json

Where the collect run kept the MLP's down inputs it also reports the output error (the share of the
MLP's output the predicted set leaves out) and can train with bce+output; `--set train.output_weight=W`.

Reads RUN/collect/ like `dejavu train-predictors` and trains only the MLP predictor (the one that
matters at the default head density 1.0); `--heads` adds the head predictor.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dejavu.train.data import CollectRun
from dejavu.train.metrics import output_metrics, selection_metrics
from dejavu.train.train import (
    fit_predictor,
    head_targets,
    predict,
    predictor_cost,
    resolve_config,
    resolve_loss,
)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--layers", type=_ints, default=[1, 15, 29])
    ap.add_argument("--ranks", type=_ints, default=[16, 32, 48, 64, 128])
    ap.add_argument("--losses", default="bce")
    ap.add_argument("--pairing", default="current")
    ap.add_argument("--density", type=float, default=None, help="MLP top-k density (default: the config's)")
    ap.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE", help="config overrides")
    ap.add_argument("--heads", action="store_true", help="also train and score the head predictor")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    collect = CollectRun(args.run)
    overrides = dict(item.split("=", 1) for item in args.set)
    overrides["train.mlp_density"] = args.density
    base = resolve_config(collect.manifest.get("config") or {}, None, overrides)
    tag = collect.label_tag(base.train.mlp_density)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for layer in args.layers:
        down = collect.down_inputs  # the output-error loss and metric, where the run kept the down inputs
        train = collect.load_layer(layer, "train", args.pairing, args.pairing, tag, down=down)
        held_out = collect.load_layer(layer, "eval", args.pairing, args.pairing, tag, down=down)
        w_down = collect.down_weight(layer) if down else None
        for loss in args.losses.split(","):
            loss, _ = resolve_loss(loss, collect)
            for rank in args.ranks:
                cfg = resolve_config(base.to_dict(), None, {"train.rank": rank, "train.loss": loss})
                started = time.perf_counter()
                pred = fit_predictor(train.x_mlp, train.mlp_labels, cfg=cfg, density=cfg.train.mlp_density,
                                     seed=cfg.train.seed + layer, device=device, desc=f"l{layer} r{rank} {loss}",
                                     show=False, down=(train.down_input, train.down_scale, w_down) if down else None)
                seconds = time.perf_counter() - started
                scores = predict(pred, held_out.x_mlp, device)
                m = selection_metrics(scores, held_out.mlp_labels, held_out.mlp_act, cfg.train.mlp_density)
                if down:
                    m.update(output_metrics(scores, held_out.down_input.to(device), held_out.down_scale.to(device),
                                            w_down.to(device), cfg.train.mlp_density))
                row = {"layer": layer, "rank": rank, "loss": loss, "pairing": args.pairing,
                       "train_tokens": train.tokens, "seconds": round(seconds, 2),
                       **{f"mlp_{k}": v for k, v in m.items()}, **predictor_cost(collect.model, rank, cfg.train.hidden_activation)}
                if args.heads:
                    attn = fit_predictor(train.x_attn, head_targets(train.head_norms, cfg.train.head_density),
                                         cfg=cfg, density=cfg.train.head_density, seed=cfg.train.seed + layer,
                                         device=device, desc="attn", show=False,
                                         loss_kind="bce" if loss == "bce+output" else None)
                    h = selection_metrics(predict(attn, held_out.x_attn, device),
                                          head_targets(held_out.head_norms, cfg.train.head_density),
                                          held_out.head_norms, cfg.train.head_density)
                    row.update({f"attn_{k}": v for k, v in h.items()})
                rows.append(row)
                print(f"layer {layer:2d} rank {rank:4d} {loss:9s} recall {m['recall']:.3f} "
                      f"mass kept {m['mass_kept']:.3f} output error {m.get('output_error', float('nan')):.4f}  "
                      f"mlp predictor {row['mlp_fraction']:.2%} "
                      f"(+attn {row['total_fraction']:.2%}) of layer bytes  {seconds:.1f}s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
