"""The reference sparse runtime: a PredictorSet applied to a loaded Hugging Face model through its adapter.

Plain PyTorch hooks, so every family the adapters know works on CPU and GPU alike:
- a forward pre-hook on each decoder layer captures its block input, and (selection "predictor")
  runs that layer's predictors on it, or on layer l-1's input for "lookahead" pairing (layer 0 its own);
- MLP: the input of the down projection is the per-neuron activation, so zeroing the unselected
  neurons there ("mask" mode) is exactly computing only the selected ones; "gather" mode really
  computes only them: rows of up/gate and columns of down for the union of the batch's selections,
  then each token keeps only its own (so gather == mask exactly);
- attention: the input of the output projection is the heads' outputs side by side; zeroing an
  unselected head's columns is exactly dropping its contribution. k/v of every head are still computed
  in this path (the head-skipping decode loop lives in runtime/decode.py); `skippable_kv_groups`
  reports which KV groups a real kernel could skip (all their query heads unselected).

Why a masked parallel forward equals sparse decoding: every token's own MLP/attention output is
masked with its own selection, and earlier tokens' K/V come from their (sparse) hidden states, which
is what a token-by-token sparse decode with a KV cache computes. `token_mask` ([batch, seq] bool)
restricts sparsity to some tokens (dense prefill); `enabled = False` runs the model dense.

Two-stage MLP selection (opt-in, `mlp_candidate_density`): the predictor picks candidates at the
candidate density; gate/up run for the candidates only (their activations are needed anyway), and
the final set is the top-`mlp_density` share of all n neurons among the candidates by the exact
|down input|; only the final set's down columns are read. It trades extra gate/up reads for fewer
predictor misses. MLP weight bytes read: up_share * candidates + (1 - up_share) * final, where
up_share is 2/3 for gated MLPs (gate + up + down) and 1/2 for plain ones (up + down).

Exact-up MLP selection (opt-in, `mlp_up_weight` A, mask mode): |act| = |act(gate)| * |up|, and a
linear predictor can follow the gate but not |up| (symmetric in up's sign). The up projection is
computed for every neuron, each neuron scored log|up| + A * predictor logit, and gate and down run
for the top `mlp_density`. MLP weight bytes read: up_share / 2 + (1 - up_share / 2) * density.
Measured best per byte on SmolLM2 (BENCHMARKS.md, "up-pred"); runtime/decode.py runs the same rule.

MLP thresholds (opt-in, `thresholds`, mask mode; runtime/thresholds.py): no predictor for the MLP.
Each token drops its MLP-input entries at or below the layer's threshold (gate/up read only the kept
columns) and its down-input entries at or below a second threshold (down reads only the kept rows).
MLP weight bytes read: up_share * input kept + (1 - up_share) * down input kept. Heads follow the
selection as usual.

Score thresholds (opt-in, `mlp_score_thresholds`, predictor selection): instead of each token's top-k of
the MLP predictor's scores, each token keeps the neurons scored above its layer's threshold. The
thresholds are set (runtime/score_thresholds.py) so that a layer keeps its density on average over
calibration text, run sparse: a token whose scores are confident keeps fewer neurons, an uncertain one
more. On SmolLM2 this gave lower perplexity than top-k at the same mean MLP bytes (BENCHMARKS.md). With
`mlp_score_thresholds="batch"` each sequence sets every layer's threshold from its own scores (the
quantile that keeps the layer's density over its sparse tokens), their mean recorded in
`batch_score_thresholds`: calibration and tuning use that.

Score-threshold candidates, then down thresholds (opt-in: `mlp_score_thresholds` with
`mlp_candidate_density` C and `mlp_down_thresholds`): the score thresholds, set to keep C, choose which
neurons' gate/up run; of those, down reads the rows whose |down input| is above a second per-layer
threshold, set to keep the MLP density of all neurons (runtime/score_thresholds.py sets both in one sparse
pass). Two-stage selection with no selection step on the critical path: the down kernel skips a row as it
reads (BENCHMARKS.md: better per byte than both plain score thresholds and the exact top-k among the
candidates). MLP weight bytes read: as two-stage.

Straight-through selection (`straight_through` S, predictor selection in mask mode, for tuning the
predictors end to end, train/tune.py): the forward keeps the hard top-k, and the gradient reaches the
scores through sigmoid(S * (score - the token's k-th largest score)), as the bce+output loss does.

Selection "oracle" takes the true top-k of the same forward (|down input| per neuron, L2 norm per
head output) to separate predictor error from sparsity error; "dense" computes everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dejavu.errors import DejavuError
from dejavu.models.adapters import Adapter, _linear_weight
from dejavu.predictor import PredictorSet, topk_mask, units_for_density
from dejavu.quantized_predictor import MLP_INPUT
from dejavu.runtime.reference import exact_up_scores
from dejavu.runtime.thresholds import Thresholds

SELECTIONS = ("predictor", "oracle", "dense")
MODES = ("mask", "gather")


def topk_among(scores: torch.Tensor, candidates: torch.Tensor, density: float) -> torch.Tensor:
    """Top-k of `scores` restricted to `candidates` (k from the density over the whole last dimension);
    never picks a non-candidate, so when fewer than k are candidates it keeps just them."""
    n = scores.shape[-1]
    k = units_for_density(density, n)
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    idx = masked.topk(min(k, n), dim=-1).indices
    return torch.zeros_like(candidates).scatter_(-1, idx, True) & candidates


def skippable_kv_groups(head_mask: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[..., num_kv_heads] bool: True where no query head of the group is selected (GQA grouping:
    query head h uses KV head h // (num_heads / num_kv_heads), as in HF's repeat_kv)."""
    heads = head_mask.shape[-1]
    if heads % num_kv_heads:
        raise DejavuError(f"{heads} query heads do not split into {num_kv_heads} KV groups")
    grouped = head_mask.reshape(*head_mask.shape[:-1], num_kv_heads, heads // num_kv_heads)
    return ~grouped.any(dim=-1)


@dataclass
class SelectionStats:
    """Running means of what was actually computed (sparse tokens only), per kind of hook: "mlp" (the
    neurons through down), "attn" (heads), "mlp_candidates" (two-stage: gate/up rows read),
    "mlp_input" (MLP thresholds: gate/up columns read), "attn_input" / "attn_o" (attention thresholds:
    q/k/v columns and o rows read), and "kv_groups_skippable" (added with "attn")."""

    up_in_full: bool = False  # exact-up selection reads every up row
    # Share of the MLP weight bytes in gate + up (2/3 gated, 1/2 plain); set by the runtime.
    up_share: float = 2 / 3
    means: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def add(self, kind: str, kept: float, skippable: float = 0.0, n: int = 1) -> None:
        self._add(kind, kept, n)
        if kind == "attn":
            self._add("kv_groups_skippable", skippable, n)

    def _add(self, kind: str, value: float, n: int) -> None:
        c = self.counts.get(kind, 0)
        self.means[kind] = (self.means.get(kind, 0.0) * c + value * n) / (c + n)
        self.counts[kind] = c + n

    def kept(self, kind: str, unseen: float = 1.0) -> float:
        """The running mean of `kind`; `unseen` when its hook never ran (computed in full)."""
        return self.means[kind] if self.counts.get(kind) else unseen

    @property
    def mlp_kept(self) -> float:
        return self.kept("mlp", 0.0)

    @property
    def head_kept(self) -> float:
        return self.kept("attn", 0.0)

    @property
    def kv_groups_skippable(self) -> float:
        return self.kept("kv_groups_skippable", 0.0)

    def summary(self) -> dict:
        """Shares computed; a kind whose hook never ran (density 1.0) was computed in full."""
        mlp = self.kept("mlp")
        candidates = self.kept("mlp_candidates", mlp)
        if self.counts.get("mlp_input"):  # thresholds: gate/up columns of the kept inputs
            candidates = self.kept("mlp_input")
            share = self.up_share * candidates + (1 - self.up_share) * mlp
        elif self.up_in_full:  # all of up, gate and down for the chosen neurons
            share = self.up_share / 2 + (1 - self.up_share / 2) * mlp
        else:  # gate/up rows for the candidates, down columns for the final set (== mlp_kept without
            # two-stage); the oracle still needs the dense activation to choose.
            share = self.up_share * candidates + (1 - self.up_share) * mlp
        out = {"mlp_kept": mlp,
               "mlp_candidates_kept": candidates,
               "mlp_weight_share": share,
               "head_kept": self.kept("attn"),
               "kv_groups_skippable": self.kv_groups_skippable}
        if self.counts.get("attn_input"):
            out.update(attn_input_kept=self.kept("attn_input"), attn_o_kept=self.kept("attn_o"))
        return out


class SparseRuntime:
    """Hooks a model for sparse inference; use as a context manager or call `remove()`."""

    def __init__(self, model: nn.Module, adapter: Adapter, predictors: PredictorSet | None = None, *,
                 selection: str = "predictor", mlp_density: float | list[float] | None = None,
                 head_density: float | list[float] | None = None,
                 mode: str = "mask", record: bool = False, mlp_candidate_density: float | None = None,
                 mlp_up_weight: float | None = None, thresholds: Thresholds | None = None,
                 straight_through: float | None = None,
                 mlp_score_thresholds: list[float | None] | str | None = None,
                 mlp_down_thresholds: list[float | None] | str | None = None,
                 mlp_compensation=None):
        if selection not in SELECTIONS:
            raise DejavuError(f"selection must be one of {', '.join(SELECTIONS)}; got {selection!r}")
        if mode not in MODES:
            raise DejavuError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if selection == "predictor" and predictors is None:
            raise DejavuError("selection 'predictor' needs a bundle (or use selection oracle/dense)")
        if mode == "gather" and selection == "oracle":
            raise DejavuError("the gather path needs the selection before the MLP runs: use mask mode for the oracle")
        self.model, self.adapter, self.predictors = model, adapter, predictors
        self.selection, self.mode, self.record = selection, mode, record
        self.layers = adapter.decoder_layers()
        self.shape = adapter.shape()
        n = len(self.layers)
        if predictors is not None and len(predictors.layers) != n:
            raise DejavuError(f"the predictors cover {len(predictors.layers)} layers, the model has {n}")
        self.thresholds = thresholds
        if thresholds is not None:
            if mode != "mask" or mlp_candidate_density is not None or mlp_up_weight is not None:
                raise DejavuError("MLP thresholds run in mask mode, as the only MLP rule")
            if len(thresholds.x) != n:
                raise DejavuError(f"MLP thresholds cover {len(thresholds.x)} layers, the model has {n}")
            lowest_head = min(head_density, default=1.0) if isinstance(head_density, (list, tuple)) else head_density
            if thresholds.attention and lowest_head is not None and lowest_head < 1.0:
                raise DejavuError("attention thresholds and head selection are two rules for the same "
                                  "projections: use one (head density 1.0 with attention thresholds)")
        # with thresholds no top-k selects neurons: the MLP's own hooks do the work
        self.mlp_density = [1.0 if thresholds is not None else self._density(l, "mlp", mlp_density)
                            for l in range(n)]  # noqa: E741
        self.head_density = [self._density(l, "attn", head_density) for l in range(n)]  # noqa: E741
        # the layers left at 1.0 of a kind that is sparse elsewhere: _note_full_layer counts them computed
        # in full (thresholds count their own MLP inputs in every layer)
        self._full_mlp = {l for l, d in enumerate(self.mlp_density)  # noqa: E741
                          if d >= 1.0 and thresholds is None and min(self.mlp_density, default=1.0) < 1.0}
        self._full_heads = {l for l, d in enumerate(self.head_density)  # noqa: E741
                            if d >= 1.0 and min(self.head_density, default=1.0) < 1.0}
        if predictors is not None and predictors.mlp_pairing == MLP_INPUT and (
                mlp_candidate_density is not None or mlp_up_weight is not None or mlp_compensation is not None):
            raise DejavuError("quantized-weight MLP predictors score every neuron from gate and up already: not with "
                              "two-stage selection, exact-up selection or an MLP compensation")
        self.mlp_candidate_density = self._check_candidates(mlp_candidate_density)
        self.mlp_up_weight = self._check_up_weight(mlp_up_weight)
        self.mlp_down_thresholds = self._check_thresholds(mlp_down_thresholds, n, "down")
        self.mlp_score_thresholds = self._check_score_thresholds(mlp_score_thresholds, n)
        calibrated = None if predictors is None else predictors.mlp_candidate_density
        if (calibrated is not None and mlp_down_thresholds is predictors.mlp_down_thresholds
                and self.mlp_candidate_density != calibrated):
            raise DejavuError(f"mlp_candidate_density {self.mlp_candidate_density} is not the {calibrated:g} these "
                              "predictors' down thresholds were calibrated at: pass that, or calibrate again "
                              "(runtime/score_thresholds.py calibrate_two_stage)")
        if self.mlp_down_thresholds is not None and self.mlp_score_thresholds is None:
            raise DejavuError("down thresholds (mlp_down_thresholds) are the second stage of score-threshold "
                              "candidates: they take mlp_score_thresholds and mlp_candidate_density")
        # "batch" mode: per layer, 0-d tensors (read them with float()/int(): no host sync while tuning)
        self.batch_score_thresholds: dict[int, torch.Tensor] = {}
        self.batch_score_tokens: dict[int, torch.Tensor] = {}
        self.batch_down_thresholds: dict[int, torch.Tensor] = {}
        if straight_through is not None and (selection != "predictor" or mode != "mask"
                                             or (self.two_stage and self.mlp_down_thresholds is None)
                                             or self.exact_up or thresholds is not None):
            raise DejavuError("straight-through selection tunes the predictors: selection 'predictor', mask mode, "
                              "one-stage top-k or score thresholds (with or without down thresholds)")
        self.straight_through = straight_through
        if mlp_compensation is not None:
            if selection != "predictor" or thresholds is not None or mlp_up_weight is not None:
                raise DejavuError("MLP compensation corrects the predictors' selection: selection 'predictor', "
                                  "not magnitude thresholds or exact-up selection")
            mlp_compensation.check([d < 1.0 for d in self.mlp_density])
        self.mlp_compensation = mlp_compensation
        self._mlp_x: dict[int, torch.Tensor] = {}
        if predictors is not None:
            device = next(model.parameters()).device
            predictors.to(device=device)
        self.enabled = True
        self.token_mask: torch.Tensor | None = None
        self.stats = SelectionStats()
        first = self.layers[0] if self.layers else None
        if first is not None and not adapter.gated:
            self.stats.up_share = 1 / 2
        self.stats.up_in_full = self.exact_up
        self.masks: dict[tuple[str, int], torch.Tensor] = {}  # recorded selections (record=True)
        self._inputs: dict[int, torch.Tensor] = {}
        self._mlp_sel: dict[int, torch.Tensor] = {}
        self._mlp_logits: dict[int, torch.Tensor] = {}  # exact-up selection: predictor scores per layer
        self._head_sel: dict[int, torch.Tensor] = {}
        self._gather: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list = []
        self._patched: list[nn.Module] = []
        self._install()

    # --- configuration ------------------------------------------------------------------------
    def _density(self, l: int, kind: str, override: float | list[float] | None) -> float:  # noqa: E741
        if self.selection == "dense":
            return 1.0
        if isinstance(override, (list, tuple)):  # one per layer (the oracle at a bundle's densities)
            if len(override) != len(self.layers):
                raise DejavuError(f"{len(override)} per-layer {kind} densities for a model of {len(self.layers)} layers")
            return float(override[l])
        if self.selection == "predictor":
            lp = self.predictors.layers[l]
            if (lp.mlp if kind == "mlp" else lp.attn) is None:
                return 1.0  # no predictor for this layer: it runs dense
            if override is not None:
                return override
            return lp.mlp_density if kind == "mlp" else lp.head_density
        return 1.0 if override is None else override

    def _check_candidates(self, density: float | None) -> float | None:
        if density is None:
            return None
        if self.selection != "predictor":
            raise DejavuError("mlp_candidate_density (two-stage MLP selection) needs selection 'predictor'")
        if not 0.0 < density <= 1.0:
            raise DejavuError(f"mlp_candidate_density must be in (0, 1], got {density}")
        low = [l for l, d in enumerate(self.mlp_density) if d < 1.0 and density < d]  # noqa: E741
        if low:
            raise DejavuError(f"mlp_candidate_density {density} is below the final MLP density "
                              f"{self.mlp_density[low[0]]} (layers {low[:5]}); candidates must cover the final set")
        return density

    def _check_up_weight(self, weight: float | None) -> float | None:
        if weight is None:
            return None
        if self.selection != "predictor":
            raise DejavuError("mlp_up_weight (exact-up MLP selection) needs selection 'predictor'")
        if self.mlp_candidate_density is not None:
            raise DejavuError("choose one MLP rule: mlp_up_weight (exact up) or mlp_candidate_density (two-stage)")
        if self.mode != "mask":
            raise DejavuError("mlp_up_weight (exact-up MLP selection) runs in mask mode only")
        if not (weight >= 0.0 and weight < float("inf")):
            raise DejavuError(f"mlp_up_weight must be a finite number >= 0, got {weight}")
        if self.layers and not self.adapter.gated:
            raise DejavuError("mlp_up_weight needs a gated MLP (gate and up projections); this model has none")
        return weight

    def _check_score_thresholds(self, given, n: int):
        if given is None:
            return None
        if self.selection != "predictor":
            raise DejavuError("MLP score thresholds apply to the predictors' scores: selection 'predictor'")
        if self.exact_up or self.thresholds is not None:
            raise DejavuError("MLP score thresholds are their own MLP rule: not with exact-up or magnitude thresholds")
        if self.two_stage != (self.mlp_down_thresholds is not None):
            raise DejavuError("score-threshold candidates (mlp_candidate_density with score thresholds) take down "
                              "thresholds (mlp_down_thresholds) as their second stage, and down thresholds need them")
        return self._check_thresholds(given, n, "score")

    def _check_thresholds(self, given, n: int, kind: str):
        """Per-layer values (finite wherever the MLP runs sparse) or "batch"; None stays None."""
        if given is None:
            return None
        if isinstance(given, str):
            if given != "batch":
                raise DejavuError(f"mlp_{kind}_thresholds must be a list of per-layer values or 'batch', got {given!r}")
            return given
        values = list(given)
        if len(values) != n:
            raise DejavuError(f"MLP {kind} thresholds cover {len(values)} layers, the model has {n}")
        for l, value in enumerate(values):  # noqa: E741
            if self.mlp_density[l] < 1.0 and (value is None or value != value):
                raise DejavuError(f"layer {l} runs a sparse MLP but has no {kind} threshold (NaN or missing)")
        return values

    @property
    def exact_up(self) -> bool:
        return self.mlp_up_weight is not None

    @property
    def two_stage(self) -> bool:
        return self.mlp_candidate_density is not None

    def sparse_tokens(self, like: torch.Tensor) -> torch.Tensor | None:
        """[batch, seq, 1] bool of the tokens to sparsify, or None for all."""
        if self.token_mask is None:
            return None
        tm = self.token_mask.to(like.device)
        if tm.numel() != like[..., 0].numel():
            raise DejavuError(f"token_mask has shape {tuple(tm.shape)}, the forward has {tuple(like.shape[:-1])}")
        # Some families (OPT) flatten [batch, seq] into one dimension around the MLP.
        return tm.reshape(*like.shape[:-1], 1)

    # --- hooks --------------------------------------------------------------------------------
    def _install(self) -> None:
        for l, layer in enumerate(self.layers):  # noqa: E741
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(l), with_kwargs=True))
            if self.mlp_density[l] < 1.0:
                if self._mlp_reads_its_input and self.selection == "predictor":
                    self._handles.append(self.adapter.mlp_input_projections(layer)[0].register_forward_pre_hook(
                        self._mlp_select_hook(l)))
                if self.mlp_compensation is not None:
                    self._handles.append(self.adapter.mlp_input_projections(layer)[0].register_forward_pre_hook(
                        self._mlp_input_hook(l)))
                    self._handles.append(self.adapter.down_proj(layer).register_forward_hook(
                        self._compensation_hook(l)))
                if self.exact_up:
                    self._handles.append(self.adapter.up_proj(layer).register_forward_hook(self._up_hook(l)))
                if self.mode == "mask":
                    self._handles.append(self.adapter.down_proj(layer).register_forward_pre_hook(self._down_hook(l)))
                else:
                    self._patch_gather(l, layer)
            if self.head_density[l] < 1.0:
                self._handles.append(self.adapter.o_proj(layer).register_forward_pre_hook(self._o_hook(l)))
            if self.thresholds is not None:
                t = self.thresholds
                for j, proj in enumerate(self.adapter.mlp_input_projections(layer)):
                    # one input read by gate and up: counted once
                    self._handles.append(proj.register_forward_pre_hook(
                        self._threshold_hook(l, t.x[l], "mlp_input" if j == 0 else None)))
                self._handles.append(self.adapter.down_proj(layer).register_forward_pre_hook(
                    self._threshold_hook(l, t.h[l], "mlp")))
                if t.attention:
                    self._handles.append(self.adapter.attention_module(layer).register_forward_pre_hook(
                        self._threshold_hook(l, t.attn_x[l], "attn_input"), with_kwargs=True))
                    self._handles.append(self.adapter.o_proj(layer).register_forward_pre_hook(
                        self._threshold_hook(l, t.attn_o[l], "attn_o")))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for module in self._patched:
            del module.forward  # back to the class's forward
        self._handles, self._patched = [], []
        self._inputs.clear()
        self._mlp_x.clear()

    def __enter__(self) -> SparseRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _layer_hook(self, l: int):  # noqa: E741
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._inputs[l] = hidden
            self._inputs.pop(l - 2, None)  # lookahead needs only the previous layer's input
            if self.enabled:
                self._note_full_layer(l, hidden)
            if not self.enabled or self.selection != "predictor":
                return None
            if self.mlp_density[l] < 1.0 and not self._mlp_reads_its_input:
                self._select_mlp(l, self._paired_input(l, self.predictors.mlp_pairing))
            if self.head_density[l] < 1.0:
                x = self._paired_input(l, self.predictors.head_pairing)
                self._head_sel[l] = self._select(self.predictors.layers[l].attn(x), self.head_density[l])
            return None

        return hook

    @property
    def _mlp_reads_its_input(self) -> bool:
        """The MLP predictors read the MLP's own input (quantized_predictor.py): they select in a pre-hook on the
        MLP's first input projection, after attention, not in the layer's."""
        return self.predictors is not None and self.predictors.mlp_pairing == MLP_INPUT

    def _select_mlp(self, l: int, x: torch.Tensor) -> None:  # noqa: E741
        predictor = self.predictors.layers[l].mlp
        first = self.mlp_candidate_density if self.two_stage else self.mlp_density[l]
        if self.exact_up:  # chosen once up's output is known (_up_hook)
            self._mlp_logits[l] = predictor(x)
        elif self.mlp_score_thresholds is not None:
            self._mlp_sel[l] = self._select_above(l, predictor(x))
        else:
            self._mlp_sel[l] = self._select(predictor(x), first)
        if self.mode == "gather":
            self._prepare_gather(l)

    def _mlp_select_hook(self, l: int):  # noqa: E741
        def hook(module, args):
            if self.enabled and self.selection == "predictor":
                self._select_mlp(l, args[0])

        return hook

    def _select(self, scores: torch.Tensor, density: float) -> torch.Tensor:
        """The predictor's top-k as a bool mask; straight-through: a float mask equal to it whose gradient
        is the sigmoid's (a mask the hooks multiply in like the bool one)."""
        hard = topk_mask(scores, density)
        if not self._tuning:
            return hard
        n = scores.shape[-1]
        threshold = scores.detach().kthvalue(n - units_for_density(density, n) + 1, dim=-1, keepdim=True).values
        return self._straight_through(hard, scores, threshold)

    @property
    def _tuning(self) -> bool:
        return self.straight_through is not None and torch.is_grad_enabled()

    def _straight_through(self, hard: torch.Tensor, scores: torch.Tensor, threshold) -> torch.Tensor:
        """A float mask equal to `hard` whose gradient is that of sigmoid(S * (score - threshold))."""
        soft = torch.sigmoid((scores - threshold) * self.straight_through)
        return hard.to(soft.dtype) + (soft - soft.detach())

    def _select_above(self, l: int, scores: torch.Tensor) -> torch.Tensor:  # noqa: E741
        """The units scored above layer l's threshold (fixed, or each sequence's own quantile); straight-through
        as `_select`, around that threshold."""
        if self.mlp_score_thresholds == "batch":
            density = self.mlp_candidate_density if self.two_stage else self.mlp_density[l]
            threshold = self._sequence_thresholds(l, scores, density, self.batch_score_thresholds)
        else:
            threshold = float(self.mlp_score_thresholds[l])
        hard = scores > threshold
        return self._straight_through(hard, scores, threshold) if self._tuning else hard

    def _sequence_thresholds(self, l: int, scores: torch.Tensor, density: float,  # noqa: E741
                             record: dict[int, torch.Tensor]) -> torch.Tensor:
        """Per sequence, the score above which `density` of its sparse tokens' scores lie ([B, 1, ..., 1]).
        Per sequence, not per forward, so that how a batch is split (processes under torchrun) changes
        nothing. Records the mean over the sequences, weighted by their sparse tokens, in
        record[l] and those tokens in batch_score_tokens[l]."""
        detached = scores.detach().float()
        rows = detached.reshape(detached.shape[0], -1, detached.shape[-1]) if detached.dim() > 2 else detached[None]
        tm = self.sparse_tokens(detached)
        if tm is None:  # every token sparse (tuning, calibration): all sequences in one call, no host sync
            counts = torch.full((rows.shape[0],), rows.shape[1], device=rows.device)
            values = _score_quantile(rows.reshape(rows.shape[0], -1), density)
        else:
            sparse = tm.reshape(rows.shape[0], -1)
            counts = sparse.sum(-1)
            values = torch.stack([_score_quantile(rows[b][sparse[b]].reshape(-1), density)
                                  for b in range(rows.shape[0])])
        tokens = counts.sum()
        weighted = torch.where(counts > 0, values, 0.0).double() * counts  # double: sums of many sequences
        record[l] = torch.where(tokens > 0, weighted.sum() / tokens.clamp_min(1), float("-inf"))
        self.batch_score_tokens[l] = tokens
        shape = (rows.shape[0],) + (1,) * (scores.dim() - 1) if scores.dim() > 2 else (1, 1)
        return values.to(scores.dtype).reshape(shape)

    def _note_full_layer(self, l: int, hidden: torch.Tensor) -> None:  # noqa: E741
        """A layer left at density 1.0 installs no hook for that kind yet computes all of it: count it, or
        the shares reported would describe the sparse layers only."""
        if l not in self._full_mlp and l not in self._full_heads:
            return
        tm = self.sparse_tokens(hidden)
        n = hidden[..., 0].numel() if tm is None else int(tm.sum())
        if n == 0:
            return
        if l in self._full_mlp:
            self.stats.add("mlp", 1.0, n=n)
            if self.two_stage:
                self.stats.add("mlp_candidates", 1.0, n=n)
        if l in self._full_heads:
            self.stats.add("attn", 1.0, 0.0, n=n)

    def _paired_input(self, l: int, pairing: str) -> torch.Tensor:  # noqa: E741
        if pairing == "lookahead" and l > 0:
            return self._inputs[l - 1]
        return self._inputs[l]

    def _mlp_mask(self, l: int, act: torch.Tensor) -> torch.Tensor:  # noqa: E741
        if self.selection == "oracle":
            return topk_mask(act.abs(), self.mlp_density[l])
        if self.two_stage:
            candidates = self._mlp_sel[l].reshape(act.shape)
            self._note("mlp_candidates", l, candidates)
            return self._final_among(l, act, candidates)
        return self._mlp_sel[l]

    def _final_among(self, l: int, act: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:  # noqa: E741
        """Two-stage: the neurons of `candidates` (whose gate/up ran) that down reads. The top `mlp_density` of all
        by |act|, or with down thresholds those whose |act| is above layer l's (fixed, or each sequence's quantile
        keeping the MLP density of all its neurons, the non-candidates counted as 0)."""
        if self.mlp_down_thresholds is None:
            return topk_among(act.abs(), candidates, self.mlp_density[l])
        magnitude = act.detach().abs()
        if self.mlp_down_thresholds == "batch":
            kept = magnitude * (candidates.detach() > 0)
            threshold = self._sequence_thresholds(l, kept, self.mlp_density[l], self.batch_down_thresholds)
            # a quantile that falls among the zeros keeps every candidate (0 is not above 0)
            threshold = threshold.clamp_min(0.0)
        else:
            threshold = float(self.mlp_down_thresholds[l])
        return candidates * (magnitude > threshold)

    def _apply_token_mask(self, mask: torch.Tensor) -> torch.Tensor:
        tm = self.sparse_tokens(mask)
        if tm is None:
            return mask
        return mask | ~tm if mask.dtype == torch.bool else torch.where(tm, mask, torch.ones_like(mask))

    def _note(self, kind: str, l: int, mask: torch.Tensor) -> None:  # noqa: E741
        if mask.dtype != torch.bool:  # a straight-through mask: its values are the hard selection's
            mask = mask.detach() > 0.5
        tm = self.sparse_tokens(mask)
        rows = mask.reshape(-1, mask.shape[-1]) if tm is None else mask[tm.squeeze(-1)]
        if rows.numel() == 0:
            return
        if kind in ("mlp", "mlp_candidates", "mlp_input", "attn_input", "attn_o"):
            self.stats.add(kind, rows.float().mean().item(), n=rows.shape[0])
        else:
            skip = skippable_kv_groups(rows, self.shape.num_kv_heads).float().mean().item()
            self.stats.add("attn", rows.float().mean().item(), skip, n=rows.shape[0])
        if self.record:
            self.masks[(kind, l)] = mask.detach().clone()

    def _down_hook(self, l: int):  # noqa: E741
        def hook(module, args):
            if not self.enabled:
                return None
            act = args[0]
            mask = self._mlp_mask(l, act).reshape(act.shape)
            self._note("mlp", l, mask)
            mask = self._apply_token_mask(mask)
            return (act * mask.to(act.dtype),) + tuple(args[1:])

        return hook

    def _mlp_input_hook(self, l: int):  # noqa: E741
        def hook(module, args):
            self._mlp_x[l] = args[0]

        return hook

    def _compensation_hook(self, l: int):  # noqa: E741
        """Adds layer l's compensation term to down's output, on the tokens whose MLP ran sparse."""
        def hook(module, args, out):
            x = self._mlp_x.pop(l, None)
            if not self.enabled or x is None:
                return None
            term = self.mlp_compensation.term(l, x).reshape(out.shape)
            tm = self.sparse_tokens(out)
            return out + (term if tm is None else term * tm.to(term.dtype))

        return hook

    def _threshold_hook(self, l: int, threshold: float, kind: str | None):  # noqa: E741
        def sparse(x: torch.Tensor) -> torch.Tensor:
            keep = x.abs() > threshold
            if kind is not None:
                self._note(kind, l, keep)
            return x * self._apply_token_mask(keep).to(x.dtype)

        def hook(module, args, kwargs=None):
            if not self.enabled:
                return None
            if kwargs is None:  # a projection: its input is positional
                return (sparse(args[0]),) + tuple(args[1:])
            if args:  # an attention module (with_kwargs=True): hidden_states either way
                return (sparse(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": sparse(kwargs["hidden_states"])}

        return hook

    def _up_hook(self, l: int):  # noqa: E741
        def hook(module, args, out):
            if not self.enabled:
                return None
            up = self.adapter.up_output(out)
            logits = self._mlp_logits.pop(l).reshape(up.shape)
            self._mlp_sel[l] = topk_mask(exact_up_scores(up, logits, self.mlp_up_weight), self.mlp_density[l])
            return None

        return hook

    def _o_hook(self, l: int):  # noqa: E741
        hd = self.shape.head_dim
        heads = self.shape.num_heads

        def hook(module, args):
            if not self.enabled:
                return None
            x = args[0]
            per_head = x.reshape(*x.shape[:-1], heads, hd)
            if self.selection == "oracle":
                mask = topk_mask(per_head.float().norm(dim=-1), self.head_density[l])
            else:
                mask = self._head_sel[l].reshape(per_head.shape[:-1])
            self._note("attn", l, mask)
            mask = self._apply_token_mask(mask)
            x = (per_head * mask.unsqueeze(-1).to(x.dtype)).reshape(x.shape)
            return (x,) + tuple(args[1:])

        return hook

    # --- gather path (MLP computes only the selected neurons) ---------------------------------
    def _prepare_gather(self, l: int) -> None:  # noqa: E741
        """Union of the batch's selected neurons (all of them for dense tokens), once per forward;
        with two-stage these are the candidates (the final set is known only after gate/up)."""
        mask = self._mlp_sel[l]
        self._note("mlp_candidates" if self.two_stage else "mlp", l, mask)
        rows = self._apply_token_mask(mask)
        union = rows.reshape(-1, rows.shape[-1]).any(dim=0).nonzero().squeeze(-1)
        self._gather[l] = (rows, union)

    def _patch_gather(self, l: int, layer: nn.Module) -> None:  # noqa: E741
        up, gate, down = self.adapter.up_proj(layer), self.adapter.gate_proj(layer), self.adapter.down_proj(layer)

        fused = self.adapter.fused_gate_up

        def rows_of(module: nn.Module):
            def forward(x: torch.Tensor) -> torch.Tensor:
                w, b = _linear_weight(module), getattr(module, "bias", None)
                if not self.enabled:
                    return nn.functional.linear(x, w, b)
                union = self._gather[l][1]
                if fused:  # [gate | up]: the same neurons' rows in both halves
                    union = torch.cat([union, union + w.shape[0] // 2])
                y = nn.functional.linear(x, w[union], b[union] if b is not None else None)
                # Full width keeps the model's own activation code working; unselected entries stay
                # zero and are never read: down takes only the union's columns.
                out = x.new_zeros(*x.shape[:-1], w.shape[0])
                out[..., union] = y
                return out

            return forward

        def down_forward(x: torch.Tensor) -> torch.Tensor:
            w, b = _linear_weight(down), getattr(down, "bias", None)
            if not self.enabled:
                return nn.functional.linear(x, w, b)
            rows, union = self._gather[l]
            rows = rows.reshape(x.shape)
            if self.two_stage:
                # x is zero outside the candidates' union; the final set is each token's own among its
                # candidates, and down reads only the union of the final sets.
                final = self._final_among(l, x, self._mlp_sel[l].reshape(x.shape))
                self._note("mlp", l, final)
                rows = self._apply_token_mask(final)
                union = rows.reshape(-1, rows.shape[-1]).any(dim=0).nonzero().squeeze(-1)
            # Each token keeps only its own selection, so gather == mask exactly.
            h = (x * rows.to(x.dtype))[..., union]
            return nn.functional.linear(h, w[:, union], b)

        if fused:
            gate = None  # the same module as up: patched once
        for module, fn in ((up, rows_of(up)), (gate, rows_of(gate)), (down, down_forward)):
            if module is not None:
                module.forward = fn
                self._patched.append(module)


def _score_quantile(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Along the last dimension, the score above which `density` of the scores lie (-inf keeps all)."""
    m = scores.shape[-1]
    keep = int(round(density * m))
    if m == 0 or keep >= m:
        return torch.full(scores.shape[:-1], float("-inf"), device=scores.device)
    # kthvalue's k is 1-based: the value with m - keep values at or below it
    return scores.kthvalue(max(1, m - keep), dim=-1).values


def apply_sparsity(model: nn.Module, adapter: Adapter, predictors: PredictorSet | None = None, **kwargs) -> SparseRuntime:
    """Hook `model` for sparse inference (see SparseRuntime); returns the runtime (call .remove() to undo)."""
    return SparseRuntime(model, adapter, predictors, **kwargs)
