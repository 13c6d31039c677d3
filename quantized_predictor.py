"""An MLP predictor read from the model's own gate and up weights at low precision.

A neuron's activation is act(gate(x)) * up(x). A low-rank linear score of the block input can follow the
gate but not |up|, which is symmetric in up's sign: on SmolLM2 the trained predictors keep 0.82-0.85 of the
oracle's activation mass at MLP density 0.5 at every rank and training setting measured (BENCHMARKS.md). This
predictor computes both factors from 4-bit (or 8-bit) copies of gate and up on the MLP's own input and scores each
neuron by |act(g~) * u~|; the runtime keeps each token's top-k of those scores, then computes the chosen
neurons from the model's real weights. It needs no collect or training (`dejavu export --model M --out B
--mlp-predictor-bits 4`), and it costs bits/16 of gate and up's bytes plus the scales: at 4 bits with a
scale per 64 inputs, 0.177 of a gated MLP's weight bytes every token, where a rank-128 low-rank predictor
of SmolLM2 costs 0.077. It reads the MLP's input, so it runs after attention (no lookahead).

Quantisation: symmetric, one fp16 scale per row and group of `group` inputs, each group's clipping ratio
chosen from CLIP_RATIOS to least squared error. Codes are offset binary (code - 2^(bits-1) is the
integer); 4-bit codes are packed two per byte, the even input in the low nibble.

Tensor names inside a layer's MLP predictor: up_codes, up_scales, and gate_codes, gate_scales for gated
MLPs; up_bias / gate_bias where the model's projections have a bias.
"""

from __future__ import annotations

import torch
from torch import nn

from dejavu.errors import DejavuError

BITS = (4, 8)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
KIND = "quantized-weights"
# the pairing of a predictor that reads the MLP's input (after attention and its norm)
MLP_INPUT = "mlp_input"


def check_format(bits: int, group: int, d_in: int, what: str = "the MLP's input", smallest: int = 8) -> None:
    """smallest: 8 for new copies (the GPU kernel reads a group as whole 32-bit words); bundles written with
    smaller groups still load (smallest=2) and score through their dequantized copies."""
    if bits not in BITS:
        raise DejavuError(f"quantized MLP predictors have {' or '.join(map(str, BITS))} bits, not {bits}")
    if group < smallest or group & (group - 1) or d_in % group:  # a power of two: the kernels' tiles are
        raise DejavuError(f"the quantization group ({group}) must be a power of two of at least {smallest} that "
                          f"divides {what} ({d_in} values)")


def quantize_rows(weight: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, scales fp16 [n, d / group]) of a [n, d] weight; see the module docstring."""
    n, d = weight.shape
    check_format(bits, group, d, smallest=2)  # export asks for groups of at least 8 (check_format's default)
    w = weight.detach().float().reshape(n, d // group, group)
    qmax = 2 ** (bits - 1) - 1
    absmax = w.abs().amax(-1, keepdim=True)
    best_q = best_scale = best_err = None
    for ratio in CLIP_RATIOS:
        # the fp16 scale the runtime reads is the one the error is measured with
        scale = (absmax * ratio / qmax).half().float().clamp_min(torch.finfo(torch.float16).tiny)
        q = torch.clamp(torch.round(w / scale), -qmax - 1, qmax)
        err = (q * scale - w).square().sum(-1, keepdim=True)
        if best_err is None:
            best_q, best_scale, best_err = q, scale, err
        else:
            better = err < best_err
            best_q = torch.where(better, q, best_q)
            best_scale = torch.where(better, scale, best_scale)
            best_err = torch.minimum(err, best_err)
    codes = (best_q + 2 ** (bits - 1)).to(torch.uint8).reshape(n, d)
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes.contiguous(), best_scale.reshape(n, d // group).half()


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The fp32 [n, d] weight that `codes` and `scales` stand for."""
    if codes.dtype != torch.uint8:
        raise DejavuError(f"quantized codes must be uint8, got {codes.dtype}")
    if bits == 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(codes.shape[0], -1)
    n, d = codes.shape
    groups = scales.shape[1]
    q = codes.float() - 2 ** (bits - 1)
    return (q.reshape(n, groups, d // groups) * scales.float().unsqueeze(-1)).reshape(n, d)


def tile_rows(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPU kernel's layout of (codes, scales): codes as int32 words, input-major [d * bits / 32, n] (word m of
    row r holds inputs 32/bits * m + j at bits j * bits, the lowest first), scales group-major [G, n]. A program
    then reads contiguous words of many rows at once and unpacks each word in registers
    (runtime/kernels/triton_kernels.py quant_scores)."""
    n = codes.shape[0]
    words = codes.contiguous().view(torch.uint8).view(torch.int32)  # little-endian: the lowest byte first
    return words.reshape(n, -1).t().contiguous(), scales.t().contiguous()


def untile_rows(words_t: torch.Tensor, scales_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tile_rows undone."""
    n = words_t.shape[1]
    return words_t.t().contiguous().view(torch.uint8).reshape(n, -1), scales_t.t()


def quantize_mlp(weights, bits: int, group: int) -> dict[str, torch.Tensor]:
    """The predictor's tensors for one layer's MLP (models.adapters.MLPWeights)."""
    tensors = {}
    for name, weight, bias in (("up", weights.up, weights.up_bias), ("gate", weights.gate, weights.gate_bias)):
        if weight is None:
            continue
        tensors[f"{name}_codes"], tensors[f"{name}_scales"] = quantize_rows(weight, bits, group)
        if bias is not None:
            tensors[f"{name}_bias"] = bias.detach().half().contiguous()
    return tensors


class QuantizedMLPPredictor(nn.Module):
    """Scores each neuron by |act(g~) * u~| (|act(u~)| for plain MLPs) from the quantized copies."""

    def __init__(self, tensors: dict[str, torch.Tensor], bits: int, group: int, activation: str,
                 where: str = "the quantized MLP predictor"):
        super().__init__()
        from transformers.activations import ACT2FN

        if activation not in ACT2FN:
            raise DejavuError(f"{where}: unknown MLP activation {activation!r}")
        self.bits, self.group, self.activation_name = bits, group, activation
        self.act = ACT2FN[activation]
        self.gated = "gate_codes" in tensors
        self.parts = ("up", "gate") if self.gated else ("up",)
        expected = {f"{p}_{t}" for p in self.parts for t in ("codes", "scales")}
        missing = sorted(expected - set(tensors))
        if missing:
            raise DejavuError(f"{where} lacks {missing}")
        n, packed = tensors["up_codes"].shape
        d = packed * 8 // bits
        check_format(bits, group, d, smallest=2)
        for p in self.parts:
            codes, scales = tensors[f"{p}_codes"], tensors[f"{p}_scales"]
            if codes.dtype != torch.uint8 or tuple(codes.shape) != (n, packed):
                raise DejavuError(f"{where}: {p}_codes is {codes.dtype} {tuple(codes.shape)}, expected uint8 "
                                  f"{(n, packed)}")
            if (scales.dtype != torch.float16 or tuple(scales.shape) != (n, d // group)
                    or not torch.isfinite(scales.float()).all()):
                raise DejavuError(f"{where}: {p}_scales must be {(n, d // group)} finite fp16 values, got "
                                  f"{scales.dtype} {tuple(scales.shape)}")
            self.register_buffer(f"{p}_codes", codes.contiguous())
            self.register_buffer(f"{p}_scales", scales.half().contiguous())
            bias = tensors.get(f"{p}_bias")
            if bias is not None and (bias.dtype != torch.float16 or tuple(bias.shape) != (n,)
                                     or not torch.isfinite(bias.float()).all()):
                raise DejavuError(f"{where}: {p}_bias must be {n} finite fp16 values")
            self.register_buffer(f"{p}_bias", None if bias is None else bias.half().contiguous())
        self._dequantized: dict = {}

    @property
    def d_in(self) -> int:
        return self.up_codes.shape[1] * 8 // self.bits

    @property
    def n_out(self) -> int:
        return self.up_codes.shape[0]

    def _apply(self, fn, recurse=True):
        self._dequantized = {}  # moved or cast: dequantize again where it now lives
        return super()._apply(fn, recurse)

    def _weights(self, part: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dequantized weight and bias, cached: this is the reference path, a kernel would read the codes."""
        key = (part, dtype)
        if key not in self._dequantized:
            w = dequantize_rows(getattr(self, f"{part}_codes"), getattr(self, f"{part}_scales"), self.bits)
            bias = getattr(self, f"{part}_bias")
            self._dequantized[key] = (w.to(dtype), None if bias is None else bias.to(dtype))
        return self._dequantized[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the copies are cached in x's dtype: fp32 for exact CPU measurements, half the memory for a bf16 model on a
        # GPU (dequantized gate and up of all of Llama-3-8B's layers: 7.5 GB in bf16, 15 GB in fp32)
        dtype = x.dtype if x.is_floating_point() else torch.float32
        x = x.to(dtype)
        up = nn.functional.linear(x, *self._weights("up", dtype))
        if not self.gated:
            return self.act(up).abs().float()
        gate = nn.functional.linear(x, *self._weights("gate", dtype))
        return (self.act(gate) * up).abs().float()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for p in self.parts:
            out[f"{p}_codes"], out[f"{p}_scales"] = getattr(self, f"{p}_codes"), getattr(self, f"{p}_scales").half()
            bias = getattr(self, f"{p}_bias")
            if bias is not None:
                out[f"{p}_bias"] = bias.half()
        return out
