"""Read one layer's training data out of RUN/collect/ (format: docs/FORMATS.md).

Shards hold every layer; `safe_open` maps a file and reads only the tensors asked for, so memory
stays bounded by one layer's tokens, whatever the number of layers or shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dejavu.artifacts import parent_ref, read_manifest
from dejavu.bits import unpack_bits
from dejavu.errors import DejavuError
from dejavu.fp8 import non_finite_rows

PAIRINGS = ("current", "lookahead")


def source_layer(layer: int, pairing: str) -> int:
    """Which block input feeds layer `layer`'s predictor: its own, or the previous layer's (layer 0: own)."""
    if pairing not in PAIRINGS:
        raise DejavuError(f"unknown pairing {pairing!r} (known: {', '.join(PAIRINGS)})")
    return max(0, layer - 1) if pairing == "lookahead" else layer


@dataclass
class LayerData:
    """One layer's tokens of one split. Inputs stay in their stored dtype until a batch is taken."""

    x_mlp: torch.Tensor  # [T, hidden]
    x_attn: torch.Tensor  # [T, hidden]; the same tensor when both pairings agree
    mlp_labels: torch.Tensor  # [T, neurons] bool
    head_norms: torch.Tensor  # [T, heads]
    mlp_act: torch.Tensor | None  # [T, neurons] |act|, eval shards only
    # the MLP's down-projection input, row-scaled fp8 ([T, neurons], [T]; dejavu.fp8), when read
    down_input: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.x_mlp.shape[0]

    def to(self, device: torch.device | str) -> LayerData:
        x_mlp = self.x_mlp.to(device)
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LayerData(x_mlp=x_mlp, x_attn=x_mlp if self.x_attn is self.x_mlp else self.x_attn.to(device),
                         mlp_labels=self.mlp_labels.to(device), head_norms=self.head_norms.to(device),
                         mlp_act=move(self.mlp_act), down_input=move(self.down_input), down_scale=move(self.down_scale))


@dataclass
class StoredLayer:
    """One layer's tokens of one split, checked but with the MLP labels still bit-packed: the form to
    read ahead on the CPU and to move to a GPU (8x fewer label bytes to copy), unpacking them there."""

    x_mlp: torch.Tensor
    x_attn: torch.Tensor  # the same tensor as x_mlp when both pairings agree
    packed_labels: torch.Tensor  # [T, ceil(neurons / 8)] uint8
    neurons: int
    head_norms: torch.Tensor
    mlp_act: torch.Tensor | None
    down_input: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StoredLayer:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pinned(self) -> StoredLayer:
        """A page-locked copy: its move to a GPU runs at full PCIe speed (pageable memory measured
        ~0.9 s per layer of 196K tokens at Llama-2-7B width on the H200s, most of each layer's wait)."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> StoredLayer:
        x_mlp = fn(self.x_mlp)
        optional = lambda t: None if t is None else fn(t)  # noqa: E731
        return StoredLayer(
            x_mlp=x_mlp, x_attn=x_mlp if self.x_attn is self.x_mlp else fn(self.x_attn),
            packed_labels=fn(self.packed_labels), neurons=self.neurons,
            head_norms=fn(self.head_norms), mlp_act=optional(self.mlp_act), down_input=optional(self.down_input),
            down_scale=optional(self.down_scale))

    def unpacked(self) -> LayerData:
        return LayerData(x_mlp=self.x_mlp, x_attn=self.x_attn, mlp_labels=unpack_bits(self.packed_labels, self.neurons),
                         head_norms=self.head_norms, mlp_act=self.mlp_act, down_input=self.down_input,
                         down_scale=self.down_scale)


class CollectRun:
    """A finished `dejavu collect` directory: its manifest (verified) and per-layer readers."""

    def __init__(self, run: str | Path, verify: bool = True, hash_share: tuple[int, int] | None = (0, 1)):
        self.dir = Path(run) / "collect"
        if not self.dir.is_dir():
            from dejavu.artifacts import stage_around

            around = stage_around(self.dir)  # run itself or a folder above it: a bundle or a stage, not a run
            if around is not None:
                raise DejavuError(f"{run} is inside a dejavu artifact ({around[0]}, a {around[1]} directory), not a "
                                  "run: pass the run directory that `dejavu collect --out RUN` wrote")
            raise DejavuError(f"{self.dir} does not exist: run `dejavu collect --out {run}` first")
        self.manifest = read_manifest(self.dir, "dejavu.collect", verify=verify, hash_share=hash_share)
        self.parent = parent_ref(self.dir, self.manifest)
        try:
            self.model = self.manifest["model"]
            self.num_layers = int(self.model["num_layers"])
            self.hidden = int(self.model["hidden_size"])
            self.neurons = int(self.model["intermediate_size"])
            self.heads = int(self.model["num_heads"])
            shards = self.manifest["shards"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DejavuError(f"{self.dir}/manifest.json lacks the field {exc} (written by another version?)") from None
        # collected with collect.record_down_input: the MLP's down inputs and a copy of each down projection
        self.down_inputs = bool(self.manifest.get("down_inputs"))
        self.down_weights = self.manifest.get("down_weights")
        self.shards = {split: [s for s in shards if s.get("split") == split] for split in ("train", "eval")}
        self._check_counts()
        if not self.shards["train"]:
            raise DejavuError(f"{self.dir} has no train shards: collect more tokens")
        if not self.shards["eval"]:
            raise DejavuError(f"{self.dir} has no eval shards (collect.eval_tokens = 0?): held-out metrics need them")

    def _check_counts(self) -> None:
        """The manifest's token counts against its own shard list (the hashes cover the shards, not it)."""
        try:
            held = {split: sum(int(s.get("tokens", 0)) for s in self.shards[split]) for split in ("train", "eval")}
        except (TypeError, ValueError):
            raise DejavuError(f"{self.dir}/manifest.json: a shard's token count is not a number (an edited "
                              "manifest?): collect again") from None
        for field, want in (("tokens", held["train"] + held["eval"]), ("train_tokens", held["train"]),
                            ("eval_tokens", held["eval"])):
            if field in self.manifest and self.manifest[field] != want:
                raise DejavuError(f"{self.dir}/manifest.json says {field} = {self.manifest[field]}, but its shards hold "
                                  f"{want} (an edited manifest?): collect again")

    def label_tag(self, density: float) -> str:
        """The stored MLP label set to train on for `density`."""
        tags = [str(t) for t in self.manifest.get("mlp_label_tags", [])]
        tag = format(density, "g")
        if tag in tags:
            return tag
        # ReLU models are labelled by sign, which holds for every top-k density.
        if "positive" in tags:
            return "positive"
        raise DejavuError(
            f"{self.dir} has MLP labels for densities {', '.join(tags) or 'none'}, not {tag}: "
            f"train for one of those (--mlp-density), or collect again into a new --out with "
            f"--mlp-label-densities {tag} (with --overwrite in place, which discards the collected data and so "
            "every predictor trained on it)"
        )

    def load_layer(self, layer: int, split: str, mlp_pairing: str, head_pairing: str, tag: str,
                   device: torch.device | str = "cpu", down: bool = False) -> LayerData:
        """One layer's tensors of one split, on `device`. The checks and the label unpacking run there:
        on a GPU host they are what otherwise keeps each process's CPU busy between layers."""
        return self.read_layer(layer, split, mlp_pairing, head_pairing, tag, device, down).unpacked()

    def read_layer(self, layer: int, split: str, mlp_pairing: str, head_pairing: str, tag: str,
                   device: torch.device | str = "cpu", down: bool = False) -> StoredLayer:
        """One layer's tensors of one split as stored (labels still bit-packed), on `device` and checked;
        down: with the MLP's down inputs (the run must have them)."""
        if not 0 <= layer < self.num_layers:
            raise DejavuError(f"layer {layer} does not exist (the model has {self.num_layers})")
        src_mlp, src_attn = source_layer(layer, mlp_pairing), source_layer(layer, head_pairing)
        names = {"x_mlp": f"input.{src_mlp}", "labels": f"mlp_labels.{layer}@{tag}", "heads": f"head_norms.{layer}"}
        if src_attn != src_mlp:
            names["x_attn"] = f"input.{src_attn}"
        if split == "eval":
            names["act"] = f"mlp_act.{layer}"
        if down:
            if not self.down_inputs:
                raise DejavuError(f"{self.dir} has no MLP down inputs (collected with collect.record_down_input "
                                  "false, or by an older version): collect again, or train with --loss bce")
            names["down"], names["down_scale"] = f"mlp_down_input.{layer}", f"mlp_down_scale.{layer}"
        parts: dict[str, list[torch.Tensor]] = {key: [] for key in names}
        key_of = {name: key for key, name in names.items()}
        for shard in self.shards[split]:
            for name, tensor in self._read(shard, sorted(names.values())).items():
                parts[key_of[name]].append(tensor)
        cat = {key: torch.cat(chunks).to(device) for key, chunks in parts.items()}
        for key in ("x_mlp", "x_attn", "heads", "act", "down_scale"):
            if key in cat and not torch.isfinite(cat[key]).all():
                raise DejavuError(f"layer {layer}: {names[key]} in the {split} shards contains NaN or infinite values")
        if "down" in cat and non_finite_rows(cat["down"]).any():
            raise DejavuError(f"layer {layer}: {names['down']} in the {split} shards contains NaN values")
        return StoredLayer(x_mlp=cat["x_mlp"], x_attn=cat.get("x_attn", cat["x_mlp"]), packed_labels=cat["labels"],
                           neurons=self.neurons, head_norms=cat["heads"], mlp_act=cat.get("act"),
                           down_input=cat.get("down"), down_scale=cat.get("down_scale"))

    def down_weight(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s down projection [hidden, neurons] as collect copied it."""
        if not self.down_weights:
            raise DejavuError(f"{self.dir} has no copy of the down projections (collect.record_down_input false, "
                              "or collected by an older version): collect again, or train with --loss bce")
        path = self.dir / self.down_weights
        name = f"down.{layer}"
        try:
            with safe_open(str(path), framework="pt") as fh:
                if name not in set(fh.keys()):
                    raise DejavuError(f"{path} lacks {name}: the collect data is incomplete")
                weight = fh.get_tensor(name)
        except SafetensorError as exc:
            raise DejavuError(f"{path} is not a readable safetensors file ({exc}): collect again") from None
        except FileNotFoundError:
            raise DejavuError(f"{path} is missing: collect again") from None
        if tuple(weight.shape) != (self.hidden, self.neurons) or not torch.isfinite(weight).all():
            raise DejavuError(f"{path}: {name} has shape {tuple(weight.shape)} or non-finite values, expected a finite "
                              f"{(self.hidden, self.neurons)}")
        return weight

    def _read(self, shard: dict, names: list[str]) -> dict[str, torch.Tensor]:
        path = self.dir / shard["path"]
        widths = {"input": self.hidden, "mlp_labels": (self.neurons + 7) // 8, "head_norms": self.heads,
                  "mlp_act": self.neurons, "mlp_down_input": self.neurons, "mlp_down_scale": None}
        try:
            with safe_open(str(path), framework="pt") as fh:
                keys = set(fh.keys())
                missing = [n for n in names if n not in keys]
                if missing:
                    raise DejavuError(f"{path} lacks tensors {missing[:4]}: the collect data is incomplete")
                out = {n: fh.get_tensor(n) for n in names}
        except SafetensorError as exc:
            raise DejavuError(f"{path} is not a readable safetensors file ({exc}): collect again") from None
        except FileNotFoundError:
            raise DejavuError(f"{path} is missing: collect again") from None
        for name, tensor in out.items():
            width = widths[name.split(".")[0]]
            want = (int(shard["tokens"]),) if width is None else (int(shard["tokens"]), width)
            if tuple(tensor.shape) != want:
                raise DejavuError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {want}")
        return out
