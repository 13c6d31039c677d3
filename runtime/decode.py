"""A gpt-fast-style decode loop for the Llama family (Llama, Mistral, Qwen2/3, Phi-3, SmolLM, Granite,
OLMo 1-2, Gemma 1-3), OPT, GPT-2 and GPT-NeoX (Pythia). What the families do differently comes from their
adapters (models/adapters.py): RMSNorm or LayerNorm, norms before and/or after each block, per-head or
whole q/k norms, sliding windows, rotary tables per layer (or learned positions; or rotary over part of
each head), score and logit caps, biases, gated or plain MLPs, attention and MLP in sequence or side by
side, and scalar multipliers (folded into the weights where they are constant).

Weights are copied once from a loaded HF model into the layout the kernels read row by row:
qkv fused as [(H+2KV)*hd, d] (q = its first H*hd rows), o and down transposed ([H*hd, d], [n, d]),
gate and up stacked as [2, n, d]. Dense and sparse steps share everything else: the static KV cache,
the fused residual+RMSNorm, RoPE+cache write and attention kernels, and CUDA-graph capture, so their
timings compare like with like. Prefill is dense and eager (PyTorch SDPA).

Sparse step, per layer: the predictors whose input is this layer's block input run first (the MLP's
own, "current" pairing; the next layer's head predictor, "lookahead" pairing), each scoring [B, n]
then taking a fixed top-k of the batch's per-unit maximum score (a unit any sequence wants is kept),
so k is fixed per layer and the step has no host synchronisation. Predictors reading the same block
input form a group: one GEMV for their concatenated first layers, then per predictor one pass of the
wide top-k kernels that computes the second layer's scores and selects without writing them. Attention computes q and o for the
selected heads only and k/v for every KV head (the cache stays exact for later tokens).

Two-stage MLP (opt-in, mlp_candidate_density, as runtime/apply.py): the predictor selects
k_c = units_for_density(candidate density, n) candidates; gate/up (and act*up) run over them, then
the top k_f = units_for_density(mlp density, n) candidates by the batch's per-unit max |act*up| are
kept and down^T reads only their rows. Both sizes are fixed, so the step stays graph-capturable.

Two-stage score thresholds (mlp_candidate_density with the predictors' score and down thresholds, as
runtime/apply.py): at batch 1 the predictor keeps the candidates scored above the layer's threshold (a
count on the device), and the MLP kernel reads a candidate's down^T row only when |act*up| is above the
layer's down threshold, as it reads: no selection step between gate/up and down. In a batch the predictor
runs the top-k at the candidate density and the down kernel reads a row when any sequence keeps it. A tally
on the device sums the down rows read, as the predictor's does the candidates.

Exact-up MLP (opt-in, mlp_up_weight A, as runtime/apply.py): the MLP predictor writes its logits
instead of a selection; the layer computes up for every neuron (one dense GEMV, issued before it waits
for the predictor), one pass forms log|up| + A * logit in fp32 with the batch max and the top-k digits
of its fp16 rounding (scores never written), then the gate rows of the top k with the activation, and
down^T over the same rows with each activation multiplied by its up on the way in. Bytes: all of up,
k rows of gate and down^T.

Quantized-weight MLP predictors (quantized_predictor.py, pairing "mlp_input"): after attention, every neuron is
scored from the 4- or 8-bit copies of gate and up on the MLP's normalised input (4 bits: PyTorch's int4 matmul
on [gate; up], CUDA in bf16 and the CPU, then act(g) * u; otherwise a Triton kernel writing fp32 [B, n]), the
wide top-k keeps the batch's k largest (fp16 keys of their logs), then the one-launch MLP kernel runs as for any
top-k. Bytes: the copies and their scales, then k rows of gate, up and down^T.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dejavu.errors import DejavuError
from dejavu.predictor import LayerPredictors, LowRankPredictor, PredictorSet, units_for_density
from dejavu.quantized_predictor import MLP_INPUT
from dejavu.runtime import reference
from dejavu.runtime.kernels import ops
from dejavu.runtime.thresholds import Thresholds

# gemma3: Gemma3ForConditionalGeneration (4B and up), decoded as text
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "ministral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text",
                         "gemma3", "granite", "olmo2", "opt", "gpt2", "gpt_neox", "olmo")
SELECT_IMPLS = ("fused", "fused-cublas", "classic", "static", "static-sync")
JOIN_ORDERS = ("consumption", "heads-first")


def _rotary_order(hd: int, r: int) -> torch.Tensor:
    """New slot -> old dim of a head whose first r dims rotate in pairs (i, i + r/2), as HF's partial rotary
    does: the pairs move to (j, j + hd/2), which the loop's whole-head rope kernel rotates, and the dims
    that do not rotate fill the slots between. q and k get the same order, so q.k is unchanged."""
    rh, keep = r // 2, (hd - r) // 2
    first = list(range(rh)) + list(range(r, r + keep))
    second = list(range(rh, r)) + list(range(r + keep, hd))
    return torch.tensor(first + second)


def _spread_rotary(table: torch.Tensor, hd: int, fill: float) -> torch.Tensor:
    """[T, r] partial cos or sin table -> [T, hd] for dims in _rotary_order (fill: 1 for cos, 0 for sin, a
    rotation by nothing); a whole-head table is returned as it is."""
    r = table.shape[-1]
    if r == hd:
        return table
    out = torch.full((table.shape[0], hd), fill, dtype=table.dtype, device=table.device)
    out[:, :r // 2] = table[:, :r // 2]
    out[:, hd // 2:hd // 2 + r // 2] = table[:, r // 2:]
    return out


def _topk_workspace(n: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Buffers of the wide top-k kernels (triton_kernels.TopkWorkspace): keys [n], histograms of the
    key's 8-bit digits (2 levels for 16-bit floats, 4 for fp32; zeroed), resolved prefixes."""
    levels = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    return (torch.empty(n, dtype=torch.int32, device=device), torch.zeros(levels * 256, dtype=torch.int32, device=device),
            torch.zeros(2 * levels, dtype=torch.int64, device=device))


@dataclass
class FoldedPredictor:
    """A LowRankPredictor with its input normalisation folded into the first layer:
    (x - m) * s @ w1.T + b1 == x @ (w1 * s).T + (b1 - (w1 * s) @ m)."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    relu: bool
    k: int
    source_layer: int  # whose block input it reads
    out: torch.Tensor  # [k] int64: static buffer the selection is written to (graph-safe across streams)
    workspace: tuple = ()  # the fused selection's buffers (_topk_workspace)
    # exact-up MLP: the predictor only scores; the layer selects once up is known (logits [B, n])
    scores_only: bool = False
    logits: torch.Tensor | None = None
    # score thresholds (runtime/score_thresholds.py): at batch 1 the units scored above this threshold, however
    # many; then out has room for every unit, count [1] int32 says how many lead it (the kernels read it on
    # the device) and tally [2] int64 sums (count, calls) so a timing knows the rows it really read. In a
    # batch the union of the sequences' sets is nearly every unit (0.97 of SmolLM2's MLP at batch 8), so
    # there the batch's top-k of its max scores runs into out_k [k], as for top-k predictors
    score_threshold: float | None = None
    count: torch.Tensor | None = None
    tally: torch.Tensor | None = None
    out_k: torch.Tensor | None = None

    @classmethod
    def fold(cls, pred: LowRankPredictor, k: int, source_layer: int, device, dtype,
             score_threshold: float | None = None, tally: torch.Tensor | None = None) -> FoldedPredictor:
        w1 = pred.w1.detach().double() * pred.input_scale.detach().double()[None, :]
        b1 = pred.b1.detach().double() - w1 @ pred.input_mean.detach().double()
        cast = dict(device=device, dtype=dtype)
        n = pred.w2.shape[0]
        # a valid selection from the start (random units, ascending): the "static" mode reads it
        order = torch.randperm(n, generator=torch.Generator().manual_seed(k))
        out = order[:k].sort().values
        count = out_k = None
        if score_threshold is not None:  # room for every unit; the first k hold the starting selection
            out_k = out.clone().to(device)  # the batch top-k's own buffer, so it never reads a threshold's leftovers
            out = torch.cat([out, order[k:].sort().values])
            count = torch.tensor([k], dtype=torch.int32, device=device)
            tally = tally if tally is not None else torch.zeros(2, dtype=torch.int64, device=device)
        return cls(w1.to(**cast).contiguous(), b1.to(**cast), pred.w2.detach().to(**cast).contiguous(),
                   pred.b2.detach().to(**cast), pred.activation == "relu", k, source_layer, out.to(device),
                   _topk_workspace(n, dtype, device), score_threshold=score_threshold, count=count, tally=tally,
                   out_k=out_k)

    @property
    def topk_out(self) -> torch.Tensor:
        """Where a top-k selection writes: out, or with score thresholds the [k] buffer of batches."""
        return self.out if self.out_k is None else self.out_k

    def thresholds_apply(self, batch: int) -> bool:
        """Whether a step of `batch` sequences selects by score threshold (batch 1) rather than top-k."""
        return self.score_threshold is not None and batch == 1

    def selection_for(self, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(indices, count) the layer reads after a selection for `batch` sequences: the count buffer with score
        thresholds at batch 1, else None and the k indices of the top-k (the fixed-k kernels' launch)."""
        if self.thresholds_apply(batch):
            return self.out, self.count
        return self.topk_out, None

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """The unfused path: two matmuls (scores in memory), then the single-program top-k."""
        h = torch.addmm(self.b1, x, self.w1.T)
        if self.scores_only:
            return self.select_from_hidden(h)
        if self.relu:
            h = torch.relu(h)
        scores = torch.addmm(self.b2, h, self.w2.T)
        if self.thresholds_apply(x.shape[0]):
            ops.select_above(scores, self.score_threshold, self.out, self.count, self.tally, self.workspace[0])
            return self.out
        ops.select_topk(scores, self.topk_out)
        return self.topk_out

    def select_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Second layer + top-k in the wide kernels (scores never written); h = x @ w1.T + b1, pre-relu.
        Scores-only predictors write their logits instead."""
        if self.scores_only:
            self.logits = torch.addmm(self.b2, torch.relu(h) if self.relu else h, self.w2.T)
            return self.out
        if self.thresholds_apply(h.shape[0]):
            ops.predict_above(h, self.w2, self.b2, self.relu, self.score_threshold, self.out, self.count, self.tally,
                              self.workspace[0])
            return self.out
        ops.predict_select(h, self.w2, self.b2, self.relu, self.topk_out, *self.workspace)
        return self.topk_out

    def rows_read(self) -> float:
        """Units a step computes: k, or with score thresholds the mean count since the tally was last zeroed
        (k before any call). Reads the tally on the host."""
        if self.score_threshold is None:
            return self.k
        kept, calls = self.tally.tolist()
        return kept / calls if calls else self.k

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w1, self.b1, self.w2, self.b2))


@dataclass
class QuantizedSelector:
    """A quantized-weight MLP predictor (quantized_predictor.py) in the loop: it scores every neuron from the
    4- or 8-bit copies of gate and up on the MLP's own input, so it runs after attention on the main stream (not
    on the predictors' side stream), then the batch's top-k (of the per-neuron max score) runs into `out`."""

    predictor: object  # the QuantizedMLPPredictor (on the device when it scores itself)
    k: int
    out: torch.Tensor  # [k] int64
    workspace: tuple  # the wide top-k's buffers at fp16 key width: the selection is on the critical path
    itemsize: int  # of the loop's dtype, which the CPU's dequantized copies take
    # 4 bits (CUDA: in bf16): the int4 matmul op, [gate; up] packed for it (tinygemm, as gpt-fast's int4 path), its
    # scales and zeros [G, 2n, 2], the group, a plain MLP's bias: a 7B-shaped step ran 2.2x faster with it than with
    # the Triton scores kernel (BENCHMARKS.md, session 25)
    int4: tuple | None = None
    # CUDA without int4: (up_codes, up_scales, up_bias, gate_codes, gate_scales) in the Triton kernel's tiles, None
    # where absent. Neither (the CPU, 8 bits): the predictor's own forward on its dequantized copies
    tiles: tuple | None = None

    @classmethod
    def build(cls, pred, k: int, device, dtype: torch.dtype | None = None) -> QuantizedSelector:
        from dejavu.quantized_predictor import tile_rows

        int4 = _int4_matmul(pred, device, dtype)
        tiles = None
        # groups under 32 bits (bundles written before groups of at least 8) score through the dequantized copies
        if int4 is None and torch.device(device).type == "cuda" and pred.group * pred.bits >= 32:
            t = {name: value.to(device) for name, value in pred.tensors().items()}
            for part in pred.parts:
                t[f"{part}_codes"], t[f"{part}_scales"] = tile_rows(t[f"{part}_codes"], t[f"{part}_scales"])
            tiles = tuple(t.get(name) for name in ("up_codes", "up_scales", "up_bias", "gate_codes", "gate_scales"))
        elif int4 is None:  # the CPU scores through the predictor itself (only the codes' metadata is read otherwise)
            pred = pred.to(device)
        out = torch.arange(k, device=device)  # a valid selection before the first step
        itemsize = torch.empty((), dtype=dtype or torch.float32).element_size()
        return cls(pred, k, out, _topk_workspace(pred.n_out, torch.float16, device), itemsize, int4, tiles)

    def select(self, x: torch.Tensor, act: int) -> torch.Tensor:
        if self.int4 is not None:
            matmul, packed, scales_zeros, group, bias = self.int4
            out = matmul(x.to(torch.bfloat16), packed, group, scales_zeros)
            # log|act(g) * u| ranks as the score: act_mul's product goes to the top-k as it is
            if self.predictor.gated:  # out is [gate | up]
                scores = ops.act_mul(out, act)
            else:
                scores = reference.apply_activation(out.float() + (0.0 if bias is None else bias), act)
        elif self.tiles is not None:
            scores = torch.empty(x.shape[0], self.predictor.n_out, dtype=torch.float32, device=x.device)
            ops.quant_scores(x, *self.tiles, self.predictor.bits, act, scores)
        else:
            scores = self.predictor(x)
        # the top-k of log(score), keyed in fp16 (two fewer passes than fp32 keys), as exact-up's selection
        ops.select_exact_up(scores, None, 0.0, self.out, *self.workspace)
        return self.out

    @property
    def nbytes(self) -> int:
        """Bytes a selection reads: the int4 matmul's packed codes and its scales-and-zeros, else the codes and
        scales the Triton kernel reads, else the CPU's dequantized copies (with a plain MLP's bias each time)."""
        if self.int4 is not None:
            read = self.int4[1:3] + (self.int4[4],)
        elif self.tiles is not None:
            read = self.tiles
        else:
            p = self.predictor
            return (len(p.parts) * p.n_out * p.d_in + (p.n_out if p.up_bias is not None else 0)) * self.itemsize
        return sum(t.numel() * t.element_size() for t in read if t is not None)


def _int4_matmul(pred, device, dtype) -> tuple | None:
    """QuantizedSelector.int4 for a 4-bit predictor where PyTorch's int4 matmul takes its shape: on CUDA in bf16
    (else the Triton scores kernel runs), and on the CPU, where it reads an eighth of the dequantized fp32 copies'
    bytes (8x faster at 7B shapes on 2 cores; x rounded to bf16 first). None elsewhere. The codes are the same
    integers: tinygemm computes (q - 8) s + z, and the zero points z are 0 for these symmetric copies."""
    cuda = torch.device(device).type == "cuda"
    op = "_weight_int4pack_mm" if cuda else "_weight_int4pack_mm_for_cpu"
    if (pred.bits != 4 or (cuda and dtype != torch.bfloat16) or pred.group not in (32, 64, 128, 256)
            or not hasattr(torch.ops.aten, op)):
        return None
    tiles = next((t for t in (8, 4, 2) if pred.d_in % (16 * t) == 0), None)
    if tiles is None or (len(pred.parts) * pred.n_out) % 8:
        return None
    parts = ("gate", "up") if pred.gated else ("up",)
    codes = torch.cat([getattr(pred, f"{p}_codes") for p in parts]).to(device)
    scales = torch.cat([getattr(pred, f"{p}_scales") for p in parts]).to(device)
    try:
        if cuda:  # torch's CUDA packing takes the even input in the high nibble; the bundle keeps it in the low one
            swapped = (((codes & 0xF) << 4) | (codes >> 4)).contiguous()
            packed = torch.ops.aten._convert_weight_to_int4pack(swapped, tiles)
        else:  # the CPU's takes one integer a weight
            unpacked = torch.stack([codes & 0xF, codes >> 4], -1).reshape(codes.shape[0], -1).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpacked, tiles)
    except (RuntimeError, TypeError):  # an older torch's packing takes another layout: the other paths run
        return None
    scales_zeros = torch.stack([scales.t().to(torch.bfloat16), torch.zeros_like(scales.t(), dtype=torch.bfloat16)],
                               -1).contiguous()
    bias = None if pred.gated or pred.up_bias is None else pred.up_bias.to(device, torch.float32)
    return getattr(torch.ops.aten, op), packed, scales_zeros, pred.group, bias


@dataclass
class TwoStageMLP:
    """The second MLP stage: of the candidates whose gate/up ran, keep the k with the largest batch
    max |act*up| (a neuron any sequence needs is kept, as for the predictors' batch selection)."""

    k: int
    pos: torch.Tensor  # [k] int64: ascending positions into the candidate list (static buffer)
    idx: torch.Tensor  # [k] int64: the neurons at those positions (ascending, candidates are)
    workspace: tuple  # the wide top-k's buffers over the k_c candidates

    @classmethod
    def build(cls, k: int, candidates: int, device, dtype) -> TwoStageMLP:
        return cls(k, torch.arange(k, device=device), torch.arange(k, device=device),
                   _topk_workspace(candidates, dtype, device))

    def select(self, act: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """act [B, k_c] over `candidates` [k_c] -> (act of the kept neurons [B, k], their ids [k])."""
        ops.select_topk_wide(act.abs(), self.pos, *self.workspace)
        torch.index_select(candidates, 0, self.pos, out=self.idx)
        return act.index_select(1, self.pos), self.idx


@dataclass
class PredictorGroup:
    """The predictors reading one block input (this layer's MLP, "current"; the next layer's heads,
    "lookahead"): their first layers concatenated, so one GEMV reads the input for all of them."""

    w1: torch.Tensor  # [sum of ranks, d]; each member's w1/b1 are row views of these
    b1: torch.Tensor
    members: list  # (kind "mlp" | "heads", layer it selects for, FoldedPredictor, first row, end row)
    no_rows: torch.Tensor  # an empty selection: gather_matvec then reads every row as its "tail"
    workspace: torch.Tensor | None  # its own split scratch: the side stream runs alongside the main one

    @classmethod
    def build(cls, members: list, heads_first: bool = False) -> PredictorGroup:
        # In the order the decode step consumes them (a layer's heads before its MLP, layer by layer), so
        # the side stream finishes each selection as early as it can be needed; heads_first puts the
        # next layer's heads ahead of this layer's MLP, so the MLP's join covers both (one join a layer)
        members = sorted(members, key=lambda m: (m[0] != "heads", m[1]) if heads_first else (m[1], m[0] != "heads"))
        w1 = torch.cat([p.w1 for _, _, p in members]).contiguous()
        b1 = torch.cat([p.b1 for _, _, p in members]).contiguous()
        rows, start = [], 0
        for kind, j, p in members:
            end = start + p.w1.shape[0]
            p.w1, p.b1 = w1[start:end], b1[start:end]
            rows.append((kind, j, p, start, end))
            start = end
        return cls(w1, b1, rows, torch.zeros(0, dtype=torch.long, device=w1.device),
                   ops.split_workspace(w1.device, w1.shape[0]))

    def run(self, x: torch.Tensor, impl: str) -> None:
        for _ in self.run_each(x, impl):
            pass

    def run_each(self, x: torch.Tensor, impl: str):
        """Enqueue the members' selections one by one, yielding each member once its work is enqueued
        (so a caller can mark when each selection, not only the last, is ready)."""
        if impl in ("static", "static-sync"):  # no predictor work: the selections stay as they are
            yield from self.members
            return
        if impl == "classic":
            for member in self.members:
                member[2].select(x)
                yield member
            return
        if impl == "fused" and x.is_cuda:
            # in the Triton GEMV, launched like the step's other kernels (with PDL): with one join a layer,
            # cuBLAS's GEMV delayed the MLP's selection (measured at MLP 0.5 / heads 0.5 on the H100:
            # 3.761 against 3.526 ms a step; about equal with two joins a layer)
            h = ops.gather_matvec(x, self.w1, self.no_rows, 1, None, 0, self.w1.shape[0], self.b1, self.workspace)
        else:
            h = torch.addmm(self.b1, x, self.w1.T)
        for member in self.members:
            _, _, p, start, end = member
            p.select_from_hidden(h[:, start:end])
            yield member


@dataclass
class PendingSelection:
    """A selection the side stream computes, and the event that marks it done. Waiting for one also
    covers every selection the side stream queued before it from the same input: each join of the main
    stream to the side stream is a graph edge that costs ~1.8 us of launch overlap (measured on the
    H100 with PDL: 0.115 ms a step over 64 joins), so a join already implied is skipped."""

    idx: torch.Tensor
    event: torch.cuda.Event | None
    chain: list  # the group's PendingSelections, in side-stream order
    position: int
    joined: bool = False
    count: torch.Tensor | None = None  # score thresholds: how many entries of idx are the selection

    def join(self) -> None:
        if self.event is None or self.joined:
            return
        torch.cuda.current_stream().wait_event(self.event)
        for earlier in self.chain[:self.position + 1]:
            earlier.joined = True


@dataclass
class LayerWeights:
    ln1: torch.Tensor | None  # RMSNorm weights of attention's and the MLP's inputs (OLMo 2: None, no norm)
    ln2: torch.Tensor | None
    wqkv: torch.Tensor  # [(H + 2KV) * hd, d]
    bqkv: torch.Tensor | None
    wo_t: torch.Tensor  # [H * hd, d]
    gate_up: torch.Tensor | None  # [2, n, d]; None with MLP thresholds, which read gate_up_t
    down_t: torch.Tensor  # [n, d]
    mlp_pred: FoldedPredictor | None = None  # two-stage: it selects the candidates
    head_pred: FoldedPredictor | None = None
    mlp_final: TwoStageMLP | None = None  # set only with two-stage MLP selection (top-k)
    mlp_quant: QuantizedSelector | None = None  # set only with quantized-weight MLP predictors
    # two-stage score thresholds: |act*up| at or below this skips the neuron's down^T row (rounded to the model
    # dtype, as the reference runtime compares), and down_tally [2] int64 sums (rows read, calls)
    down_cut: float | None = None
    down_tally: torch.Tensor | None = None
    # MLP compensation (runtime/compensation.py): (a [R, d], b^T [R, d], bias [d]) in the model dtype, b and the
    # bias scaled as down is, added to a sparse MLP's output
    compensation: tuple | None = None
    up_workspace: tuple | None = None  # set only with exact-up MLP selection: its top-k buffers (fp16 keys)
    gate_up_t: torch.Tensor | None = None  # [d, 2n] = [gate^T | up^T], set only with MLP thresholds
    wqkv_t: torch.Tensor | None = None  # [d, (H + 2KV) * hd], set only with attention thresholds
    # [hd] each: Qwen3 and Gemma 3 RMS-normalise every q and k head before rope (else None)
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    # ([H * hd], [KV * hd]): OLMo 2 normalises q and k over all heads at once, so every q head is computed
    qk_norm_whole: tuple[torch.Tensor, torch.Tensor] | None = None
    # RMSNorm weights of attention's and the MLP's outputs before the residual add (Gemma 2/3, OLMo 2)
    attn_out_norm: torch.Tensor | None = None
    mlp_out_norm: torch.Tensor | None = None
    cos: torch.Tensor | None = None  # [max_len, hd] rotary tables (Gemma 3's local and global layers differ)
    sin: torch.Tensor | None = None
    window: int = 0  # positions attended to, the newest included (0: all)
    # OPT: LayerNorm biases, o's and down's biases (added to the block's output), and a plain MLP's up
    # [n, d] with its bias (gate_up is then None)
    ln1_b: torch.Tensor | None = None
    ln2_b: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    up: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None


@dataclass
class DecodeState:
    """Static buffers of one batch: everything a captured step reads or writes."""

    tokens: torch.Tensor  # [B] int64, next input token (the step writes its argmax here)
    pos: torch.Tensor  # [1] int64, cache position of that token (the step increments it)
    hs: list[torch.Tensor]  # L+1 x [B, d]: block inputs of each layer (never overwritten within a step, so
    # predictors may read them on a side stream while the layer runs), the last one the final residual
    hmid: torch.Tensor  # [B, d] residual stream between attention and MLP
    xn: torch.Tensor  # [B, d] normalised input of the next block
    acc: torch.Tensor  # [B, d] fp32 accumulator of sparse down/o outputs, kept zeroed between uses
    cache: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [B, KV, T, hd] k and v
    # skip_kv only (else None): per layer [B, T, d] attention inputs, from which a KV group skipped at
    # some positions is computed when one of its heads is next selected; and [L, 2, KV] int32, per layer
    # and group the last position whose k/v are in the cache (two rows: see reference.lazy_kv_fill)
    xcache: list[torch.Tensor] | None = None
    kv_last: torch.Tensor | None = None
    # MLP thresholds only: the fp32 [gate | up] accumulator [B, 2n] (kept zeroed between uses) and down's
    # input [B, n]
    acc_gate_up: torch.Tensor | None = None
    h_mlp: torch.Tensor | None = None
    # attention thresholds only: the fp32 q/k/v accumulator [B, (H + 2KV) * hd] (kept zeroed between
    # uses) and q/k/v in the model's dtype
    acc_qkv: torch.Tensor | None = None
    qkv: torch.Tensor | None = None
    # new_state(padded=True) only: [B] int64, each sequence's first cache position when a batch of prompts
    # of unequal lengths is prefilled left-padded (the attention ignores the positions before it)
    start: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]


class DecodeModel:
    def __init__(self, model, adapter, predictors: PredictorSet | None, device, dtype, max_len: int,
                 dense_impl: str = "cublas", overlap_predictors: bool = True, select_impl: str = "fused",
                 predictor_priority: int = -1, mlp_candidate_density: float | None = None,
                 mlp_up_weight: float | None = None, skip_kv: bool = False, join_order: str = "heads-first",
                 thresholds: Thresholds | None = None):
        cfg = model.config
        model_type = getattr(cfg, "model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise DejavuError(f"the decode runtime supports {', '.join(SUPPORTED_MODEL_TYPES)} models, not "
                              f"{model_type!r}; use the reference runtime for other families")
        s = adapter.shape()
        self.d, self.n, self.H, self.KV, self.hd = (s.hidden_size, s.intermediate_size, s.num_heads,
                                                    s.num_kv_heads, s.head_dim)
        if getattr(adapter.text_config(), "use_bidirectional_attention", False):
            raise DejavuError(f"this {model_type} model attends in both directions; the decode loop is causal")
        self.group = self.H // self.KV
        self.device, self.dtype, self.max_len = torch.device(device), dtype, max_len
        fc = adapter.forward_constants()
        self.eps, self.norm_offset, self.embed_scale = fc.norm_eps, fc.norm_offset, fc.embed_scale
        self.residual_scale = fc.residual_scale
        self.scale = fc.attention_scale if fc.attention_scale is not None else 1.0 / math.sqrt(self.hd)
        self.attention_softcap, self.logit_softcap = fc.attention_softcap, fc.logit_softcap
        try:
            self.act = reference.activation_code(adapter.activation_name())
        except ValueError as exc:  # a DejavuError, so `auto` engines fall back to the hooks
            raise DejavuError(f"{exc}: the decode loop's kernels lack it; use the hooks engine") from None
        cast = dict(device=self.device, dtype=dtype)
        self.embed = model.get_input_embeddings().weight.detach().to(**cast)
        lm_head = model.get_output_embeddings().weight.detach()
        if fc.logit_scale != 1.0:  # folded into the weights: Granite divides its logits by a constant
            lm_head = lm_head.to(self.device, torch.float32) * fc.logit_scale
        self.lm_head = lm_head.to(**cast)
        self.final_norm = adapter.final_norm().detach().to(**cast)
        final_bias = adapter.final_norm_bias()
        self.final_norm_b = None if final_bias is None else final_bias.detach().to(**cast)
        self.centered = fc.layer_norm  # LayerNorm (OPT) rather than RMSNorm
        positions = adapter.position_embeddings()  # a learned table added to the embeddings (OPT)
        if positions is not None and max_len > positions.shape[0]:
            raise DejavuError(f"this {model_type} model has learned embeddings for {positions.shape[0]} positions; "
                              f"the cache asked for {max_len}")
        self.pos_embed = None if positions is None else positions.detach().to(**cast)
        # MLP beside attention on the block input (GPT-NeoX): the residual kernel after attention then
        # normalises the block input, not the sum
        self.parallel = adapter.parallel_residual()
        # partial rotary: each head's q/k dims reordered so the rotating pairs sit where the whole-head rope
        # kernel pairs dims (set by _rope_tables; None when whole heads rotate)
        self.rotary_order: torch.Tensor | None = None
        rope = self._rope_tables(adapter, max_len)
        self.qkv_rows = None if self.rotary_order is None else self._qkv_row_order()
        self.all_heads = torch.arange(self.H, device=self.device)
        self.all_neurons = torch.arange(self.n, device=self.device)
        self.all_qkv_rows = torch.arange((self.H + 2 * self.KV) * self.hd, device=self.device)
        if dense_impl not in ("cublas", "triton"):
            raise ValueError(f"dense_impl must be cublas or triton, not {dense_impl!r}")
        # "triton": the dense step runs the same gather kernels over every row (no predictor)
        self.dense_impl = dense_impl
        if select_impl not in SELECT_IMPLS:
            raise ValueError(f"select_impl must be one of {', '.join(SELECT_IMPLS)}, not {select_impl!r}")
        # "fused": one GEMV for the first layers of the predictors sharing an input, then per predictor
        # the wide kernels (second layer + top-k, scores never written); "classic": matmul, matmul, and
        # the single-program top-k per predictor (kept for comparison); "static": no predictor runs and
        # each layer keeps a fixed random selection (a speed ceiling for measurements, not a model);
        # "static-sync": the same, joined to the main stream through the side stream's events as the
        # predictors are (what the joins alone cost); "fused-cublas": "fused" with the first layers'
        # GEMV in cuBLAS (the earlier path, kept for comparison)
        self.select_impl = select_impl
        # Predictors run on a side stream, overlapping the layer they do not feed (CUDA only). High
        # priority (-1): their few small programs are scheduled ahead of the layer's waiting ones, so the
        # selection is ready sooner; graphs keep node priorities (PyTorch instantiates with UseNodePriority).
        self.pred_stream = (torch.cuda.Stream(self.device, priority=predictor_priority)
                            if overlap_predictors and self.device.type == "cuda" else None)
        self.pred_groups: dict[int, PredictorGroup] = {}
        if join_order not in JOIN_ORDERS:
            raise ValueError(f"join_order must be one of {', '.join(JOIN_ORDERS)}, not {join_order!r}")
        # the side stream's order within one input's predictors (PredictorGroup.build; attach reads it)
        self.join_order = join_order
        # TEAL-style sparsity: sparse steps drop each sequence's small MLP inputs and down inputs by
        # per-layer magnitude thresholds; MLP predictors are then not used (heads' still are, unless the
        # thresholds cover attention too: q/k/v's and o's inputs, every head computed)
        self.thresholds = thresholds
        if thresholds is not None:
            if mlp_candidate_density is not None or mlp_up_weight is not None:
                raise DejavuError("choose one MLP rule: thresholds, exact up or two-stage")
            if len(thresholds.x) != len(adapter.decoder_layers()):
                raise DejavuError(f"MLP thresholds cover {len(thresholds.x)} layers, the model has "
                                  f"{len(adapter.decoder_layers())}")
        if not adapter.gated and (thresholds is not None or mlp_candidate_density is not None
                                  or mlp_up_weight is not None):
            raise DejavuError(f"thresholds, two-stage and exact-up selection in the decode loop need a gated MLP, "
                              f"which {model_type} models do not have: use the hooks engine")
        # per layer: how many positions a token attends to (None = all; Mistral, Phi-3, Gemma 2/3 windows)
        windows = adapter.attention_windows()
        self.layers = [self._layer(adapter, layer, cast, rope[i], windows[i] or 0)
                       for i, layer in enumerate(adapter.decoder_layers())]
        # the lazy k/v kernel splits a head's dimensions over programs, so it cannot normalise a head
        if skip_kv and (self.layers[0].q_norm is not None or self.layers[0].qk_norm_whole is not None):
            raise DejavuError(f"skip_kv is not supported for {model_type} models (q/k normalised per head); "
                              "compute k/v for every head instead")
        self.predictors = None
        self.mlp_tally = None  # [layers, 2]: score thresholds' (rows kept, calls), set by attach_predictors
        self.down_tally = None  # [layers, 2]: down thresholds' (rows read, calls), likewise
        # None: one-stage; else the predictors' candidate density (attach_predictors reads it)
        self.mlp_candidate_density = mlp_candidate_density
        # None: the predictor selects; else exact-up selection with this weight (attach_predictors reads it)
        self.mlp_up_weight = mlp_up_weight
        # k/v only for the KV groups the selected heads read; a group's skipped positions are computed
        # when it is next read (Deja Vu's lazy KV cache), so every head still attends to exact k/v
        self.skip_kv = skip_kv
        if predictors is not None:
            self.attach_predictors(predictors)

    # --- construction ---------------------------------------------------------------------------
    def _layer(self, adapter, layer, cast, rope: tuple[torch.Tensor, torch.Tensor], window: int) -> LayerWeights:
        a, m, norms = adapter.attention_weights(layer), adapter.mlp_weights(layer), adapter.block_norms(layer)
        if m.gate is not None and (m.gate_bias is not None or m.up_bias is not None):
            raise DejavuError("the decode runtime's gated MLP kernels take no gate/up biases; use the hooks engine")
        bqkv = None
        if a.q_bias is not None:
            bqkv = torch.cat([a.q_bias, a.k_bias, a.v_bias]).detach().to(**cast)
        gate, up = (None if m.gate is None else m.gate.detach().to(**cast)), m.up.detach().to(**cast)
        transposed = self.thresholds is not None  # one layout only: rows of gate^T/up^T are x's columns
        wqkv = torch.cat([a.q, a.k, a.v], 0).detach().to(**cast)
        if self.rotary_order is not None:
            rows = self.qkv_rows
            wqkv = wqkv[rows]
            bqkv = None if bqkv is None else bqkv[rows]
        head_norms = adapter.head_norms(layer)
        if head_norms is not None and self.rotary_order is not None:
            head_norms = tuple(w.detach().view(-1, self.hd)[:, self.rotary_order.to(w.device)].reshape(-1)
                               for w in head_norms)
        per_head = whole = None
        if head_norms is not None:
            shapes = [tuple(w.shape) for w in head_norms]
            weights = tuple(w.detach().to(**cast).contiguous() for w in head_norms)
            if shapes == [(self.hd,), (self.hd,)]:
                per_head = weights
            elif shapes == [(self.H * self.hd,), (self.KV * self.hd,)]:
                whole = weights
            else:
                raise DejavuError(f"the decode runtime normalises q and k per head ({self.hd} dims) or over all "
                                  f"heads; this model's q/k norms have shapes {shapes}")

        def block_output(w: torch.Tensor) -> torch.Tensor:
            # Granite scales each block's output before the residual add: folded into o and down
            w = w.detach().t()
            if self.residual_scale != 1.0:
                w = w.to(self.device, torch.float32) * self.residual_scale
            return w.to(**cast).contiguous()

        def norm(w: torch.Tensor | None) -> torch.Tensor | None:
            return None if w is None else w.detach().to(**cast)

        def block_bias(b: torch.Tensor | None) -> torch.Tensor | None:
            # Granite's scale multiplies the projection's bias as well as its product
            return norm(b if b is None or self.residual_scale == 1.0 else b.float() * self.residual_scale)

        return LayerWeights(
            ln1=norm(norms.attention_input),
            ln2=norm(norms.mlp_input),
            attn_out_norm=norm(norms.attention_output),
            mlp_out_norm=norm(norms.mlp_output),
            wqkv=wqkv.contiguous(),  # the dense step's layout (both kept with attention thresholds)
            wqkv_t=wqkv.t().contiguous() if transposed and self.thresholds.attention else None,
            bqkv=bqkv,
            wo_t=block_output(a.o),
            gate_up=None if transposed or gate is None else torch.stack([gate, up]).contiguous(),
            gate_up_t=torch.cat([gate.t(), up.t()], 1).contiguous() if transposed else None,
            up=up.contiguous() if gate is None else None,
            up_bias=norm(m.up_bias) if gate is None else None,
            o_bias=block_bias(a.o_bias),
            down_bias=block_bias(m.down_bias),
            ln1_b=norm(norms.attention_input_bias),
            ln2_b=norm(norms.mlp_input_bias),
            down_t=block_output(m.down),
            q_norm=None if per_head is None else per_head[0],
            k_norm=None if per_head is None else per_head[1],
            qk_norm_whole=whole,
            cos=rope[0],
            sin=rope[1],
            window=window,
        )

    def _dense_gate_up(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        """[..., 2n] = x @ [gate | up]^T, from whichever layout the layer keeps."""
        return x @ (lw.gate_up_t if lw.gate_up is None else lw.gate_up.view(2 * self.n, self.d).T)

    def _rope_tables(self, adapter, max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (cos, sin) [max_len, hd] on the device; layers with the same table share it. A model
        rotating only the first r dims of each head (GPT-NeoX) gets tables over whole heads that rotate
        nothing outside its pairs, and self.rotary_order, the dim order that puts those pairs where the
        kernels pair dims."""
        positions = torch.arange(max_len, device=next(adapter.model.parameters()).device)
        on_device: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        tables = []
        for cos, sin in adapter.rotary_tables(positions):
            r = cos.shape[-1]
            if r != self.hd:
                if r > self.hd or r % 2 or self.hd % 2:
                    raise DejavuError(f"this model rotates {r} dims of {self.hd}-dim heads, which the decode loop "
                                      "cannot pair: use the hooks engine")
                order = _rotary_order(self.hd, r)
                if self.rotary_order is not None and not torch.equal(order, self.rotary_order):
                    raise DejavuError("this model's layers rotate different parts of their heads: use the hooks "
                                      "engine")
                self.rotary_order = order
            if id(cos) not in on_device:
                on_device[id(cos)] = tuple(_spread_rotary(t.to(self.device, torch.float32), self.hd, fill).contiguous()
                                           for t, fill in ((cos, 1.0), (sin, 0.0)))
            tables.append(on_device[id(cos)])
        return tables

    def _qkv_row_order(self) -> torch.Tensor:
        """Rows of [q | k | v] with each q and k head's dims in self.rotary_order (v as it is)."""
        hd, order = self.hd, self.rotary_order
        heads = torch.arange(self.H + self.KV)[:, None] * hd
        qk = (heads + order[None]).reshape(-1)
        v = torch.arange((self.H + self.KV) * hd, (self.H + 2 * self.KV) * hd)
        return torch.cat([qk, v]).to(self.device)

    def attach_predictors(self, predictors: PredictorSet | None) -> None:
        """(Re)fold predictors at their current densities and MLP rule (self.mlp_candidate_density or
        self.mlp_up_weight); None leaves the model dense."""
        self.predictors = predictors
        self.pred_groups = {}
        for lw in self.layers:
            lw.mlp_pred = lw.head_pred = lw.mlp_final = lw.up_workspace = lw.down_cut = lw.down_tally = None
            lw.mlp_quant = None
            lw.compensation = None
        if predictors is None:
            return
        if len(predictors.layers) != len(self.layers):
            raise DejavuError(f"predictors cover {len(predictors.layers)} layers, the model has {len(self.layers)}")
        cand, up_weight = self.mlp_candidate_density, self.mlp_up_weight
        score_thresholds, down_thresholds = predictors.mlp_score_thresholds, predictors.mlp_down_thresholds
        if score_thresholds is not None:
            if up_weight is not None or self.thresholds is not None:
                raise DejavuError("MLP score thresholds are an MLP rule of their own: not with mlp_up_weight (exact up) "
                                  "or magnitude thresholds")
            if cand is not None and down_thresholds is None:
                raise DejavuError("score-threshold candidates (mlp_candidate_density) take down thresholds as their "
                                  "second stage: calibrate both (runtime/score_thresholds.py calibrate_two_stage)")
            calibrated = predictors.mlp_candidate_density
            if cand is None and down_thresholds is not None:
                at = "" if calibrated is None else f" ({calibrated:g})"
                raise DejavuError("these predictors carry down thresholds (two-stage score thresholds): pass the "
                                  f"mlp_candidate_density their score thresholds were calibrated at{at}")
            if down_thresholds is not None and calibrated is not None and cand != calibrated:
                raise DejavuError(f"mlp_candidate_density {cand:g} is not the {calibrated:g} these predictors' score and "
                                  "down thresholds were calibrated at: pass that, or calibrate again at "
                                  f"{cand:g} (runtime/score_thresholds.py calibrate_two_stage)")
            for what, values in (("score", score_thresholds), ("down", down_thresholds or score_thresholds)):
                if len(values) != len(self.layers):
                    raise DejavuError(f"{len(values)} MLP {what} thresholds for {len(self.layers)} layers")
        elif down_thresholds is not None:
            raise DejavuError("down thresholds are the second stage of score-threshold candidates: the predictors "
                              "carry no score thresholds")
        self.mlp_tally = torch.zeros(len(self.layers), 2, dtype=torch.int64, device=self.device)
        self.down_tally = torch.zeros(len(self.layers), 2, dtype=torch.int64, device=self.device)
        if cand is not None and not 0.0 < cand <= 1.0:
            raise DejavuError(f"mlp_candidate_density must be in (0, 1], got {cand}")
        if up_weight is not None:
            if cand is not None:
                raise DejavuError("choose one MLP rule: mlp_up_weight (exact up) or mlp_candidate_density (two-stage)")
            if not (math.isfinite(up_weight) and up_weight >= 0):
                raise DejavuError(f"mlp_up_weight must be a finite number >= 0, got {up_weight}")
        quantized = predictors.mlp_pairing == MLP_INPUT
        if quantized and (cand is not None or up_weight is not None or score_thresholds is not None
                          or predictors.mlp_compensation is not None):
            raise DejavuError("quantized-weight MLP predictors run with a top-k only: not with two-stage, exact-up, "
                              "score thresholds or an MLP compensation")
        for i, (lw, lp) in enumerate(zip(self.layers, predictors.layers, strict=True)):
            k_mlp = units_for_density(lp.mlp_density, self.n)
            k_heads = units_for_density(lp.head_density, self.H)
            if quantized:  # (magnitude thresholds rule the MLP when given, as in the hooks)
                if lp.mlp is not None and k_mlp < self.n and self.thresholds is None:
                    lw.mlp_quant = QuantizedSelector.build(lp.mlp, k_mlp, self.device, self.dtype)
                lp = LayerPredictors(None, lp.attn, 1.0, lp.head_density)  # the heads as usual below
            # with score thresholds any density below 1 selects (the count follows the scores, not k), as the
            # reference runtime decides
            scored = score_thresholds is not None and lp.mlp_density < 1.0
            if lp.mlp is not None and (k_mlp < self.n or scored) and self.thresholds is None:
                k_first = k_mlp
                if cand is not None:
                    if cand < lp.mlp_density:
                        raise DejavuError(f"mlp_candidate_density {cand} is below layer {i}'s MLP density "
                                          f"{lp.mlp_density}; candidates must cover the final set")
                    k_first = units_for_density(cand, self.n)
                    if down_thresholds is not None:
                        cut = down_thresholds[i]
                        if cut is None or not math.isfinite(cut):
                            raise DejavuError(f"layer {i} runs a sparse MLP (density {lp.mlp_density:g}) but its "
                                              f"down threshold is {cut}: calibrate at these densities")
                        # from float64 straight to the model dtype, as PyTorch rounds a Python float compared with a tensor
                        lw.down_cut = torch.tensor(float(cut), dtype=torch.float64).to(self.dtype).item()
                        lw.down_tally = self.down_tally[i]
                    else:
                        lw.mlp_final = TwoStageMLP.build(k_mlp, k_first, self.device, self.dtype)
                if k_first < self.n or scored:  # all candidates (density 1): no predictor, exact top-k of all
                    src = i if predictors.mlp_pairing == "current" else max(i - 1, 0)
                    threshold = None
                    if score_thresholds is not None:
                        threshold = score_thresholds[i]
                        if threshold is None or not math.isfinite(threshold):
                            raise DejavuError(f"layer {i} runs a sparse MLP (density {lp.mlp_density:g}) but its "
                                              f"score threshold is {threshold}: calibrate at these densities")
                    lw.mlp_pred = FoldedPredictor.fold(lp.mlp, k_first, src, self.device, self.dtype,
                                                       score_threshold=threshold, tally=self.mlp_tally[i])
                    if up_weight is not None:
                        lw.mlp_pred.scores_only = True
                        # fp16 keys: two fewer top-k passes between up and gate (the critical path)
                        lw.up_workspace = _topk_workspace(self.n, torch.float16, self.device)
            if lp.attn is not None and k_heads < self.H and not (self.thresholds and self.thresholds.attention):
                src = i if predictors.head_pairing == "current" else max(i - 1, 0)
                lw.head_pred = FoldedPredictor.fold(lp.attn, k_heads, src, self.device, self.dtype)
        self._attach_compensation(predictors.mlp_compensation)
        by_source: dict[int, list] = {}
        for j, lw in enumerate(self.layers):
            for kind, pred in (("mlp", lw.mlp_pred), ("heads", lw.head_pred)):
                if pred is not None:
                    by_source.setdefault(pred.source_layer, []).append((kind, j, pred))
        self.pred_groups = {src: PredictorGroup.build(members, self.join_order == "heads-first")
                            for src, members in by_source.items()}

    def _attach_compensation(self, compensation) -> None:
        if compensation is None:
            return
        if self.thresholds is not None or self.mlp_up_weight is not None:
            raise DejavuError("MLP compensation corrects a predicted top-k or score-threshold selection: not with "
                              "magnitude thresholds or exact-up selection")
        sparse = [lw.mlp_pred is not None or lw.mlp_final is not None for lw in self.layers]
        compensation.check(sparse)
        for lw, parts, sparse_mlp in zip(self.layers, compensation.layers, sparse, strict=True):
            if sparse_mlp:
                a, b, bias = (t.detach().to(self.device, torch.float32) for t in parts)
                # b transposed once: the MLP kernel reads its columns as rows, like down^T's; scaled as down is
                # (Granite's residual multiplier is folded into down, and the hooks add the term before it)
                lw.compensation = tuple(t.to(self.dtype).contiguous()
                                        for t in (a, b.T * self.residual_scale, bias * self.residual_scale))

    def _compensate(self, st: DecodeState, lw: LayerWeights, acc: torch.Tensor, sparse: bool) -> torch.Tensor:
        """acc plus the layer's compensation term when its MLP ran sparse (fp32, as acc)."""
        if sparse and lw.compensation is not None:
            ops.lowrank_acc(st.xn, *lw.compensation, acc)
        return acc

    # --- buffers ----------------------------------------------------------------------------------
    def new_state(self, batch: int, dense_only: bool = False, padded: bool = False) -> DecodeState:
        """Buffers for `batch` sequences; dense_only: the state is never stepped sparse, so with skip_kv it
        need not keep the attention inputs; padded: its prompts may differ in length (prefill's lengths)."""
        dev, dt = self.device, self.dtype
        shape = (batch, self.KV, self.max_len, self.hd)
        lazy = self.skip_kv and not dense_only
        attn_thresholds = self.thresholds is not None and self.thresholds.attention
        qkv_width = (self.H + 2 * self.KV) * self.hd
        return DecodeState(
            tokens=torch.zeros(batch, dtype=torch.long, device=dev),
            pos=torch.zeros(1, dtype=torch.long, device=dev),
            hs=[torch.zeros(batch, self.d, dtype=dt, device=dev) for _ in range(len(self.layers) + 1)],
            hmid=torch.zeros(batch, self.d, dtype=dt, device=dev),
            xn=torch.zeros(batch, self.d, dtype=dt, device=dev),
            acc=torch.zeros(batch, self.d, dtype=torch.float32, device=dev),
            cache=[(torch.zeros(shape, dtype=dt, device=dev), torch.zeros(shape, dtype=dt, device=dev))
                   for _ in self.layers],
            xcache=[torch.zeros(batch, self.max_len, self.d, dtype=dt, device=dev) for _ in self.layers]
            if lazy else None,
            kv_last=torch.full((len(self.layers), 2, self.KV), -1, dtype=torch.int32, device=dev) if lazy else None,
            acc_gate_up=torch.zeros(batch, 2 * self.n, dtype=torch.float32, device=dev)
            if self.thresholds is not None else None,
            h_mlp=torch.zeros(batch, self.n, dtype=dt, device=dev) if self.thresholds is not None else None,
            acc_qkv=torch.zeros(batch, qkv_width, dtype=torch.float32, device=dev) if attn_thresholds else None,
            qkv=torch.zeros(batch, qkv_width, dtype=dt, device=dev) if attn_thresholds else None,
            start=torch.zeros(batch, dtype=torch.long, device=dev) if padded else None,
        )

    # --- dense prefill (eager) -----------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, st: DecodeState, prompt: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt [B, P] densely, fill the cache, set st.tokens to the greedy next token and
        st.pos to P; returns the last position's logits [B, V].

        lengths [B]: prompts of unequal lengths, each left-padded to P (a state made with padded=True).
        Sequence b then starts at cache position P - lengths[b]: its positions are shifted, which rotary
        embeddings do not see (they depend on distances only), and nothing reads its padding."""
        batch, plen = prompt.shape
        if plen >= self.max_len:
            raise DejavuError(f"prompt of {plen} tokens does not fit the cache of {self.max_len}")
        at = torch.arange(plen, device=self.device)
        causal = at[:, None] >= at[None, :]
        mask = None
        if st.start is not None:
            lengths = torch.full((batch,), plen) if lengths is None else lengths.to("cpu", torch.long)
            if lengths.shape != (batch,) or int(lengths.min()) < 1 or int(lengths.max()) > plen:
                raise DejavuError(f"prompt lengths {lengths.tolist()} do not fit a padded prompt of {plen} tokens")
            start = (plen - lengths).to(self.device)
            st.start.copy_(start)
            # causal, and never a key before the sequence's start; a padding query sees itself (no empty row)
            mask = ((at[None, :, None] >= at[None, None, :]) & (at[None, None, :] >= start[:, None, None])) | (
                at[:, None] == at[None, :])
            mask = mask[:, None]
        elif lengths is not None:
            raise DejavuError("prompts of unequal lengths need a state made with new_state(batch, padded=True)")
        x = F.embedding(prompt.to(self.device), self.embed)
        if self.embed_scale != 1.0:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        if self.pos_embed is not None:
            offsets = at[None] if st.start is None else (at[None] - st.start[:, None]).clamp_min(0)
            x = x + F.embedding(offsets, self.pos_embed)
        H, KV, hd = self.H, self.KV, self.hd
        for lw, (kc, vc) in zip(self.layers, st.cache, strict=True):
            xn = self._norm(x, lw.ln1, lw.ln1_b)
            qkv = F.linear(xn, lw.wqkv, lw.bqkv)
            q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
            if lw.qk_norm_whole is not None:
                q, k = (reference.rms_norm(t, w, self.eps) for t, w in zip((q, k), lw.qk_norm_whole, strict=True))
            q, k = q.reshape(batch, plen, H, hd), k.reshape(batch, plen, KV, hd)
            if lw.q_norm is not None:
                q, k = reference.rms_norm(q, lw.q_norm, self.eps), reference.rms_norm(k, lw.k_norm, self.eps)
            cos, sin = lw.cos[:plen][None, :, None], lw.sin[:plen][None, :, None]
            q, k = reference._rotate(q, cos, sin), reference._rotate(k, cos, sin)
            v = v.view(batch, plen, KV, hd)
            kc[:, :, :plen] = k.transpose(1, 2)
            vc[:, :, :plen] = v.transpose(1, 2)
            layer_mask = mask
            if lw.window:  # a key at most window - 1 positions back
                near = causal & (at[:, None] - at[None, :] < lw.window)
                layer_mask = near[None, None] if mask is None else mask & (near | (at[:, None] == at[None, :]))
            att = self._prefill_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layer_mask)
            out = att.transpose(1, 2).reshape(batch, plen, H * hd) @ lw.wo_t
            block_input = x
            x = x + self._post_norm(out if lw.o_bias is None else out + lw.o_bias, lw.attn_out_norm)
            xn = self._norm(block_input if self.parallel else x, lw.ln2, lw.ln2_b)
            if lw.up is not None:  # a plain MLP (OPT)
                a = reference.apply_activation(F.linear(xn, lw.up, lw.up_bias).float(), self.act)
            else:
                gu = self._dense_gate_up(lw, xn)
                a = reference.apply_activation(gu[..., :self.n].float(), self.act) * gu[..., self.n:].float()
            out = a.to(x.dtype) @ lw.down_t
            x = x + self._post_norm(out if lw.down_bias is None else out + lw.down_bias, lw.mlp_out_norm)
        logits = self._logits(self._norm(x[:, -1], self.final_norm, self.final_norm_b))
        st.tokens.copy_(logits.argmax(-1))
        st.pos.fill_(plen)
        if st.kv_last is not None:
            st.kv_last.fill_(plen - 1)
        return logits

    def _norm(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The family's input norm (RMSNorm, or LayerNorm for OPT), or x itself where it has none (OLMo 2)."""
        if weight is None:
            return x
        if self.centered:
            return reference.layer_norm(x, weight, bias, self.eps)
        return reference.rms_norm(x, weight, self.eps, self.norm_offset)

    def _post_norm(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """A block output's RMSNorm before the residual add (Gemma 2/3, OLMo 2), or x itself."""
        return x if weight is None else reference.rms_norm(x, weight, self.eps, self.norm_offset)

    def _prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None) -> torch.Tensor:
        """[B, H, P, hd] causal attention (mask: which keys each query sees, else causal)."""
        if self.attention_softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                                  enable_gqa=self.group > 1)
        # Gemma 2 caps the scores, which SDPA cannot: the attention written out, as HF's eager one
        k, v = k.repeat_interleave(self.group, 1), v.repeat_interleave(self.group, 1)
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.attention_softcap) * self.attention_softcap
        plen = q.shape[2]
        if mask is None:
            mask = torch.ones(plen, plen, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(-1) @ v.float()).to(q.dtype)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.lm_head)
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    # --- one decode step (eager on CPU; captured in a CUDA graph on GPU) -------------------------------
    def select(self, x: torch.Tensor, layer: int, heads: dict, mlp: dict) -> None:
        """Run the predictors whose input is layer `layer`'s block input x; on CUDA on the side stream,
        storing (indices, event) so the consumer waits only when it needs them."""
        group = self.pred_groups.get(layer)
        if group is None:
            return
        side = self.pred_stream is not None and x.is_cuda and self.select_impl != "static"
        if side:
            self.pred_stream.wait_stream(torch.cuda.current_stream())
        chain: list[PendingSelection] = []
        with torch.cuda.stream(self.pred_stream) if side else contextlib.nullcontext():
            for kind, j, pred, _, _ in group.run_each(x, self.select_impl):
                # one event per selection, so a consumer waits only for the side stream's work up to its
                # own selection (one event for the whole group cost ~0.5 ms a step at heads 0.5); in
                # heads-first order that work includes the next layer's heads, which saves their join
                done = None
                if side:
                    done = torch.cuda.Event()
                    done.record(self.pred_stream)
                idx, count = pred.selection_for(x.shape[0])
                chain.append(PendingSelection(idx, done, chain, len(chain), count=count))
                (mlp if kind == "mlp" else heads)[j] = chain[-1]

    @staticmethod
    def _take(table: dict, layer: int) -> torch.Tensor | None:
        entry = table.get(layer)
        if entry is None:
            return None
        entry.join()
        return entry.idx

    @staticmethod
    def _count(table: dict, layer: int) -> torch.Tensor | None:
        """The count of a taken selection (score thresholds), or None for a fixed k."""
        entry = table.get(layer)
        return None if entry is None else entry.count

    @torch.no_grad()
    def step(self, st: DecodeState, sparse: bool) -> torch.Tensor:
        hs, xn, eps, off = st.hs, st.xn, self.eps, self.norm_offset
        if st.tokens.device.type == "cpu" and int(st.pos) >= self.max_len:  # (a graph on CUDA: no host check)
            raise DejavuError(f"the cache holds {self.max_len} positions and all are used: make the DecodeModel "
                              "with a larger max_len")
        if sparse and self.skip_kv and st.xcache is None:
            raise DejavuError("this decode state was made dense_only: a sparse step with skip_kv needs one "
                              "made by new_state(batch)")
        torch.index_select(self.embed, 0, st.tokens, out=hs[0])
        if self.embed_scale != 1.0:
            hs[0].mul_(torch.tensor(self.embed_scale, dtype=hs[0].dtype))
        if self.pos_embed is not None:  # a left-padded sequence's positions count from its own start
            hs[0].add_(self.pos_embed.index_select(0, st.pos if st.start is None else st.pos - st.start))
        ops.residual_rmsnorm(hs[0], None, self.layers[0].ln1, xn, eps, off, False, st.hmid,
                             norm_bias=self.layers[0].ln1_b, centered=self.centered)
        heads_sel: dict[int, tuple] = {}
        mlp_sel: dict[int, tuple] = {}
        for i, lw in enumerate(self.layers):
            if sparse:
                self.select(hs[i], i, heads_sel, mlp_sel)
            if sparse and lw.wqkv_t is not None:  # set only with attention thresholds
                self._threshold_attention(st, i, lw)
            else:
                self._attention(st, i, lw, self._take(heads_sel, i))
            self._mlp(st, i, lw, mlp_sel, sparse)
        logits = self._logits(xn)
        st.tokens.copy_(logits.argmax(-1))
        st.pos.add_(1)
        return logits

    def _attention(self, st: DecodeState, i: int, lw: LayerWeights, hidx: torch.Tensor | None) -> None:
        """q for the selected heads (all without a selection); k/v for every KV group, or with skip_kv
        only for the groups those heads read, at this position and at every earlier one a group skipped
        (from the stored inputs), so the attention reads exact k/v either way."""
        batch, H, KV, hd = st.batch, self.H, self.KV, self.hd
        xn, acc = st.xn, st.acc
        kc, vc = st.cache[i]
        triton_dense = self.dense_impl == "triton"
        heads = hidx if hidx is not None else self.all_heads
        if st.xcache is not None:
            q = ops.gather_matvec(xn, lw.wqkv, heads, hd, None, 0, bias=lw.bqkv)
            ops.lazy_kv_fill(xn, st.xcache[i], lw.wqkv, lw.bqkv, heads, self.group, kc, vc, st.kv_last[i],
                             lw.cos, lw.sin, st.pos)
            q3 = q.view(batch, -1, hd)
            k = v = q3[:, :0]  # the cache holds this position's k/v already: rope rotates q only
        elif lw.qk_norm_whole is not None:
            # q normalised over all heads needs every head's q: computed, normalised, then the selected kept
            qkv = F.linear(xn, lw.wqkv, lw.bqkv)
            self._normalise_whole_qk(qkv, lw)
            q3 = qkv[:, :H * hd].view(batch, H, hd)
            if hidx is not None:
                q3 = q3.index_select(1, hidx)
            k, v = qkv[:, H * hd:(H + KV) * hd].view(batch, KV, hd), qkv[:, (H + KV) * hd:].view(batch, KV, hd)
        else:
            if hidx is not None:
                # one launch: the selected heads' q rows, then every k and v row
                qkv = ops.gather_matvec(xn, lw.wqkv, hidx, hd, None, 0, 2 * KV * hd, bias=lw.bqkv)
            elif triton_dense:
                qkv = ops.gather_matvec(xn, lw.wqkv, self.all_qkv_rows, 1, None, 0, bias=lw.bqkv)
            else:
                qkv = F.linear(xn, lw.wqkv, lw.bqkv)
            q3 = qkv[:, :heads.numel() * hd].view(batch, -1, hd)
            kv = qkv[:, heads.numel() * hd:]
            k, v = kv[:, :KV * hd].view(batch, KV, hd), kv[:, KV * hd:].view(batch, KV, hd)
        ops.rope_cache_write(q3, k, v, kc, vc, lw.cos, lw.sin, st.pos, lw.q_norm, lw.k_norm, self.eps)
        att = self._cache_attention(q3, st, i, lw, heads).view(batch, -1)
        if hidx is not None or triton_dense or st.xcache is not None:
            ops.gather_vecmat_acc(att, lw.wo_t, heads, hd, acc)
            self._after_attention(st, i, lw, acc, True)
        else:
            self._after_attention(st, i, lw, att @ lw.wo_t, False)

    def _after_attention(self, st: DecodeState, i: int, lw: LayerWeights, out: torch.Tensor, zero: bool) -> None:
        """hmid = block input + attention's output (its bias and norm applied); xn = the MLP's normalised input:
        hmid normalised, or with a parallel residual the block input normalised."""
        ops.residual_rmsnorm(st.hs[i], out, lw.ln2, st.xn, self.eps, self.norm_offset, zero, st.hmid,
                             lw.attn_out_norm, lw.o_bias, lw.ln2_b, self.centered, self.parallel)

    def _after_mlp(self, st: DecodeState, i: int, lw: LayerWeights, out: torch.Tensor, zero: bool) -> None:
        """The next block input = hmid + the MLP's output; xn = it normalised by the next layer's attention
        norm (the final norm after the last layer)."""
        last = i + 1 == len(self.layers)
        norm, bias = (self.final_norm, self.final_norm_b) if last else (self.layers[i + 1].ln1, self.layers[i + 1].ln1_b)
        ops.residual_rmsnorm(st.hmid, out, norm, st.xn, self.eps, self.norm_offset, zero, st.hs[i + 1],
                             lw.mlp_out_norm, lw.down_bias, bias, self.centered)

    def _normalise_whole_qk(self, qkv: torch.Tensor, lw: LayerWeights) -> None:
        """OLMo 2: RMS-normalise q over all heads and k over all KV heads, in place in qkv [B, (H + 2KV) * hd]
        (one norm launch each on CUDA, where the PyTorch ops took ~25 us a layer at 7B shapes)."""
        q, k = qkv[:, :self.H * self.hd], qkv[:, self.H * self.hd:(self.H + self.KV) * self.hd]
        for x, w in zip((q, k), lw.qk_norm_whole, strict=True):
            ops.residual_rmsnorm(x, None, w, x, self.eps, 0.0, False, x)

    def _cache_attention(self, q3: torch.Tensor, st: DecodeState, i: int, lw: LayerWeights,
                         heads: torch.Tensor) -> torch.Tensor:
        kc, vc = st.cache[i]
        return ops.decode_attention(q3, kc, vc, heads, self.group, st.pos, self.scale, st.start, lw.window,
                                    self.attention_softcap or 0.0)

    def _threshold_attention(self, st: DecodeState, i: int, lw: LayerWeights) -> None:
        """Every head, from the q/k/v input entries above the layer's threshold (the kernel reads only
        their rows of W_qkv^T) and o from its input entries above a second one (rows of W_o^T)."""
        batch, KV, hd, t = st.batch, self.KV, self.hd, self.thresholds
        kc, vc = st.cache[i]
        ops.threshold_vecmat_acc(st.xn, lw.wqkv_t, t.attn_x[i], st.acc_qkv)
        q3 = st.qkv[:, :self.H * hd].view(batch, self.H, hd)
        if lw.bqkv is None and lw.qk_norm_whole is None:
            # one launch: q/k/v out of the accumulator, rotated, cached, acc zeroed
            ops.rope_cache_write_acc(st.acc_qkv, q3, kc, vc, lw.cos, lw.sin, st.pos, lw.q_norm, lw.k_norm,
                                     self.eps)
        else:
            ops.drain_acc(st.acc_qkv, st.qkv)
            qkv = st.qkv if lw.bqkv is None else st.qkv + lw.bqkv
            if lw.qk_norm_whole is not None:
                self._normalise_whole_qk(qkv, lw)
            q3 = qkv[:, :self.H * hd].view(batch, self.H, hd)
            k = qkv[:, self.H * hd:(self.H + KV) * hd].view(batch, KV, hd)
            v = qkv[:, (self.H + KV) * hd:].view(batch, KV, hd)
            ops.rope_cache_write(q3, k, v, kc, vc, lw.cos, lw.sin, st.pos, lw.q_norm, lw.k_norm, self.eps)
        att = self._cache_attention(q3, st, i, lw, self.all_heads).view(batch, -1)
        ops.threshold_vecmat_acc(att, lw.wo_t, t.attn_o[i], st.acc)
        self._after_attention(st, i, lw, st.acc, True)

    def _mlp(self, st: DecodeState, i: int, lw: LayerWeights, mlp_sel: dict, sparse: bool) -> None:
        """The selected neurons' rows of gate, up and down^T only (all rows without a selection)."""
        xn, acc = st.xn, st.acc
        count = self._count(mlp_sel, i) if sparse else None  # score thresholds: idx[:count] selected
        # the compensation's (a, b^T, bias), for the paths whose kernels add it
        comp = lw.compensation if sparse and lw.compensation is not None else (None, None, None)
        if sparse and lw.mlp_quant is not None:  # scored here, on the MLP's input: no selection waits elsewhere
            midx = lw.mlp_quant.select(xn, self.act)
            if lw.up is not None:
                ops.plain_mlp_acc(xn, lw.up, lw.up_bias, lw.down_t, midx, self.act, acc, None)
            else:
                ops.sparse_mlp_acc(xn, lw.gate_up[0], lw.gate_up[1], lw.down_t, midx, self.act, acc, None)
            self._after_mlp(st, i, lw, acc, True)
            return
        if lw.up is not None:  # a plain MLP (OPT): act(up x + b) for the selected rows, then down^T over them
            midx = self._take(mlp_sel, i)
            if midx is None and self.dense_impl == "triton":  # dense through the sparse kernels, all rows
                midx = self.all_neurons
            if midx is None:
                a = reference.apply_activation(F.linear(xn, lw.up, lw.up_bias).float(), self.act).to(xn.dtype)
                self._after_mlp(st, i, lw, a @ lw.down_t, False)
                return
            ops.plain_mlp_acc(xn, lw.up, lw.up_bias, lw.down_t, midx, self.act, acc, count, *comp)
            self._after_mlp(st, i, lw, acc, True)  # the compensation went in with the MLP
            return
        if sparse and self.thresholds is not None:
            # no selection: the kernels skip the rows whose input is at or below the layer's threshold
            t = self.thresholds
            ops.threshold_vecmat_acc(xn, lw.gate_up_t, t.x[i], st.acc_gate_up)
            ops.act_mul_acc(st.acc_gate_up, self.act, st.h_mlp)
            ops.threshold_vecmat_acc(st.h_mlp, lw.down_t, t.h[i], acc)
            self._after_mlp(st, i, lw, acc, True)  # (no compensation with thresholds)
            return
        if sparse and lw.up_workspace is not None:
            up = F.linear(xn, lw.gate_up[1])  # every neuron's up, while the predictor may still run
            self._take(mlp_sel, i)  # waits for the predictor's logits, not a selection
            pred = lw.mlp_pred
            ops.select_exact_up(up, pred.logits, self.mlp_up_weight, pred.out, *lw.up_workspace)
            a = ops.gather_matvec(xn, lw.gate_up[0], pred.out, 1, None, self.act)
            ops.gather_vecmat_acc(a, lw.down_t, pred.out, 1, acc, up)  # act(gate) x up, as down reads it
            self._after_mlp(st, i, lw, acc, True)  # (no compensation with exact-up)
            return
        midx = self._take(mlp_sel, i)
        two_stage = lw.mlp_final if sparse else None
        if two_stage is not None:
            # gate/up for the candidates, down^T for the top k_f of them by |act*up|
            cand = midx if midx is not None else self.all_neurons
            h, final = two_stage.select(ops.gather_matvec(xn, lw.gate_up[1], cand, 1, lw.gate_up[0], self.act),
                                        cand)
            ops.gather_vecmat_acc(h, lw.down_t, final, 1, acc)
            self._after_mlp(st, i, lw, self._compensate(st, lw, acc, sparse), True)
            return
        if midx is None and self.dense_impl == "triton" and lw.gate_up is not None:  # (thresholds: transposed)
            midx = self.all_neurons
        if midx is not None:
            if sparse and lw.down_cut is not None:
                ops.sparse_mlp_cut_acc(xn, lw.gate_up[0], lw.gate_up[1], lw.down_t, midx, self.act, acc, lw.down_cut,
                                       lw.down_tally, count, *comp)
            else:
                ops.sparse_mlp_acc(xn, lw.gate_up[0], lw.gate_up[1], lw.down_t, midx, self.act, acc, count, *comp)
            self._after_mlp(st, i, lw, acc, True)  # the compensation went in with the MLP
        else:
            a = ops.act_mul(self._dense_gate_up(lw, xn), self.act)
            self._after_mlp(st, i, lw, a @ lw.down_t, False)

    @torch.no_grad()
    def select_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every predictor of the sparse step on one input: times the predictors' share of a step."""
        out = []
        for group in self.pred_groups.values():
            group.run(x, self.select_impl)
            out.extend(pred.selection_for(x.shape[0])[0] for _, _, pred, _, _ in group.members)
        out.extend(lw.mlp_quant.select(x, self.act) for lw in self.layers if lw.mlp_quant is not None)
        return out

    # --- byte accounting -------------------------------------------------------------------------------
    def reset_mlp_tally(self) -> None:
        """Start counting the MLP rows score-threshold selections keep (see rows_read) and down thresholds read."""
        for tally in (self.mlp_tally, self.down_tally):
            if tally is not None:
                tally.zero_()

    @property
    def score_thresholds_on(self) -> bool:
        """Whether some layer's MLP keeps the neurons scored above a threshold (a count that varies per step)."""
        return any(lw.mlp_pred is not None and lw.mlp_pred.score_threshold is not None for lw in self.layers)

    def mlp_share_read(self) -> float | None:
        """With score thresholds: the share of MLP neurons the selections since reset_mlp_tally kept, averaged
        over the layers (dense layers count 1); None for a fixed k."""
        if not self.score_thresholds_on:
            return None
        shares = [lw.mlp_pred.rows_read() / self.n if lw.mlp_pred is not None else 1.0 for lw in self.layers]
        return sum(shares) / len(shares)

    def _down_rows(self, lw: LayerWeights) -> float | None:
        """Down^T rows a step read under down thresholds since reset_mlp_tally (the candidates' count before any
        step); None without them. Reads the tally on the host."""
        if lw.down_cut is None:
            return None
        kept, calls = lw.down_tally.tolist()
        return kept / calls if calls else lw.mlp_pred.rows_read()

    def mlp_down_share_read(self) -> float | None:
        """With down thresholds: the share of MLP neurons whose down^T rows the steps since reset_mlp_tally read,
        averaged over the layers (dense layers count 1); None without them."""
        if not any(lw.down_cut is not None for lw in self.layers):
            return None
        shares = [(self._down_rows(lw) if lw.down_cut is not None else
                   lw.mlp_pred.rows_read() if lw.mlp_pred is not None else self.n) / self.n for lw in self.layers]
        return sum(shares) / len(shares)

    def step_bytes(self, batch: int, context: int, sparse: bool) -> dict:
        """Bytes one decode step reads from memory: weights (selected rows only when sparse; two-stage:
        gate/up rows of the candidates, down^T rows of the final set; exact-up: every up row, gate and
        down^T rows of the selection; skip_kv: k/v rows of the read KV groups only, plus the stored
        attention input, while the rare lazy fills of skipped positions are not counted; OLMo 2: every q
        head's rows, since q is normalised over all heads; MLP score thresholds: the mean count the threshold
        selections kept since reset_mlp_tally (k when none ran since, as in batches, where the top-k runs), and
        with down thresholds the mean down^T rows read likewise; MLP thresholds:
        the shares they were calibrated to keep, per sequence, while at batch > 1 the union of the
        sequences' rows is read), predictors, the KV cache over `context` positions (a sliding window's at
        most), the lm_head and one
        embedding row per sequence."""
        item = torch.empty((), dtype=self.dtype).element_size()
        d, hd = self.d, self.hd
        weights = preds = cache = 0
        for i, lw in enumerate(self.layers):
            gate_rows = lw.mlp_pred.rows_read() if (sparse and lw.mlp_pred is not None) else self.n
            if sparse and lw.mlp_quant is not None:
                gate_rows = lw.mlp_quant.k
            up_rows = self.n if (sparse and lw.up_workspace is not None) else gate_rows
            down_rows = lw.mlp_final.k if (sparse and lw.mlp_final is not None) else gate_rows
            if sparse and lw.down_cut is not None:
                down_rows = self._down_rows(lw)
            if sparse and self.thresholds is not None:  # the shares the thresholds were set to keep
                gate_rows = up_rows = round(self.thresholds.share("x", i) * self.n)
                down_rows = round(self.thresholds.share("h", i) * self.n)
            heads = lw.head_pred.k if (sparse and lw.head_pred is not None) else self.H
            # KV groups the selected heads read: exact for one head per group, at most this with GQA
            kv_heads = min(self.KV, heads) if heads < self.H else self.KV
            kv_rows = kv_heads if (self.skip_kv and heads < self.H) else self.KV
            q_heads = self.H if lw.qk_norm_whole is not None else heads  # OLMo 2 computes every q head
            attention = ((q_heads + heads) * hd + 2 * kv_rows * hd) * d
            if sparse and lw.wqkv_t is not None:  # attention thresholds: shares of q/k/v's and o's input kept
                keep, keep_o = self.thresholds.share("attn_x", i), self.thresholds.share("attn_o", i)
                attention = round(keep * d) * (self.H + 2 * self.KV) * hd + round(keep_o * self.H * hd) * d
            if lw.up is not None:  # a plain MLP (OPT) has no gate
                gate_rows = 0
            weights += (gate_rows + up_rows + down_rows) * d * item + attention * item
            cache += 2 * batch * kv_heads * (min(context, lw.window) if lw.window else context) * hd * item
            if self.skip_kv and heads < self.H:
                cache += batch * d * item  # the stored attention input (lazy fills are not counted)
            if sparse:
                preds += sum(p.nbytes for p in (lw.mlp_pred, lw.head_pred, lw.mlp_quant) if p is not None)
                if lw.compensation is not None:  # read every step like the predictors: counted with them
                    preds += sum(t.numel() for t in lw.compensation) * item
        head = (self.lm_head.numel() + batch * d) * item
        return {"weights": weights, "predictors": preds, "kv_cache": cache, "lm_head_embed": head,
                "total": weights + preds + cache + head}


class GraphedStep:
    """One decode step captured in a CUDA graph over a DecodeState's static buffers."""

    def __init__(self, dm: DecodeModel, st: DecodeState, sparse: bool, warmup_steps: int = 2):
        self.dm, self.st, self.sparse = dm, st, sparse
        start_pos, start_tokens = st.pos.clone(), st.tokens.clone()
        # the warm-up steps advance the lazy k/v bookkeeping too; it must restart from the same point
        start_kv_last = st.kv_last.clone() if st.kv_last is not None else None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles the Triton kernels and warms cuBLAS outside capture
            for _ in range(warmup_steps):
                dm.step(st, sparse)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = dm.step(st, sparse)
        st.pos.copy_(start_pos)
        st.tokens.copy_(start_tokens)
        if start_kv_last is not None:
            st.kv_last.copy_(start_kv_last)

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits
