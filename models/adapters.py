"""Architecture adapters: where each family keeps its decoder layers, MLP and attention.

Every stage reaches a model only through an adapter, so adding a family is one class here.
Two facts make most of the pipeline family-independent:
- the input of the MLP's down projection (`down`) is the per-neuron activation
  act(gate(x)) * up(x) for gated MLPs and act(fc1(x)) for plain ones;
- the input of the attention output projection (`o_proj`) is the concatenation of the heads'
  outputs, head h occupying columns [h * head_dim, (h + 1) * head_dim).
Hooks on those two inputs label neurons and heads in `collect` and mask them in the runtime.
Canonical weight accessors (PyTorch Linear layout, [out, in]) serve the gather kernels.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dejavu.errors import DejavuError


@dataclass(frozen=True)
class LayerShape:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass
class MLPWeights:
    """Canonical [out, in] weights; gate is None for plain (non-gated) MLPs."""

    up: torch.Tensor  # [n, d]
    down: torch.Tensor  # [d, n]
    gate: torch.Tensor | None = None  # [n, d]
    up_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


@dataclass
class AttentionWeights:
    q: torch.Tensor  # [H * hd, d]
    k: torch.Tensor  # [KV * hd, d]
    v: torch.Tensor  # [KV * hd, d]
    o: torch.Tensor  # [d, H * hd]
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None


@dataclass(frozen=True)
class BlockNorms:
    """The norm weights around a decoder layer's attention and MLP blocks; None where the family has none.
    Llama normalises each block's input; Gemma 2/3 also each block's output before the residual add;
    OLMo 2 only the outputs; OPT each input, with LayerNorm."""

    attention_input: torch.Tensor | None
    attention_output: torch.Tensor | None
    mlp_input: torch.Tensor | None
    mlp_output: torch.Tensor | None
    # LayerNorm biases of the input norms (OPT)
    attention_input_bias: torch.Tensor | None = None
    mlp_input_bias: torch.Tensor | None = None


@dataclass(frozen=True)
class ForwardConstants:
    """The scalars a family's forward pass applies besides its weights. Only the runtimes that rebuild the
    forward pass from weights need them; hooks see Hugging Face's own."""

    norm_eps: float = 1e-6
    norm_offset: float = 0.0  # RMSNorm multiplies by offset + weight (Gemma: 1)
    layer_norm: bool = False  # the input and final norms are LayerNorms (OPT), not RMSNorms
    embed_scale: float = 1.0
    attention_scale: float | None = None  # multiplies q.k; None: 1 / sqrt(head_dim)
    residual_scale: float = 1.0  # multiplies each block's output before the residual add (Granite)
    logit_scale: float = 1.0  # multiplies the logits (Granite: 1 / logits_scaling)
    attention_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    logit_softcap: float | None = None  # the same on the logits


def _check_static_rope(rotary: nn.Module, cfg, length: int) -> None:
    """Dynamic-NTK and longrope scaling switch a sequence's frequencies once it passes a length; a decode
    loop with tables fixed up front matches them only below it."""
    rope_types = getattr(rotary, "rope_type", "default")
    types = rope_types if isinstance(rope_types, dict) else {None: rope_types}
    for layer_type, rope_type in types.items():
        if "dynamic" in rope_type:
            limit = getattr(rotary, "original_max_seq_len", None) or cfg.max_position_embeddings
        elif rope_type == "longrope":
            params = cfg.rope_parameters if layer_type is None else cfg.rope_parameters[layer_type]
            limit = params["original_max_position_embeddings"]
        else:
            continue
        if length > limit:
            raise DejavuError(f"this model's rotary embedding ({rope_type}) changes its frequencies once a sequence "
                              f"passes {limit} positions, which fixed tables cannot follow: keep prompt + new tokens "
                              f"within {limit} (asked: {length}), or use the hooks engine")


def _pre_layer_norms(attention: nn.Module, mlp: nn.Module) -> BlockNorms:
    """LayerNorms (weights and biases) before attention and before the MLP: OPT, GPT-2, GPT-NeoX."""
    return BlockNorms(attention.weight, None, mlp.weight, None, attention.bias, mlp.bias)


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """[out, in] for nn.Linear, and for GPT-2's Conv1D which stores [in, out]."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":
        return module.weight.t()
    raise DejavuError(f"unsupported projection type {type(module).__name__}")


def _bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


class Adapter:
    """Base adapter. Subclasses name the modules; the shared logic lives here."""

    family: str = "base"
    gated: bool = True
    # one projection computes [gate | up] side by side (Phi-3); up_proj and gate_proj then both return it
    fused_gate_up: bool = False
    # the config's layer_types say which layers attend in a sliding window (Qwen2/3, Gemma 2/3); else a
    # window, if any, covers every layer (Mistral, Phi-3)
    windows_by_layer_type: bool = False
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- structure --------------------------------------------------------------------------
    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def down_proj(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def up_proj(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def gate_proj(self, layer: nn.Module) -> nn.Module | None:
        return None

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def o_proj(self, layer: nn.Module) -> nn.Module:
        return self.attention_module(layer).o_proj

    def activation(self, layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.mlp_module(layer).act_fn

    def mlp_input_projections(self, layer: nn.Module) -> list[nn.Module]:
        """The modules that read the MLP's input, each once: [gate, up], [up] or the fused [gate_up]."""
        if self.fused_gate_up:
            return [self.up_proj(layer)]
        return [m for m in (self.gate_proj(layer), self.up_proj(layer)) if m is not None]

    def up_output(self, output: torch.Tensor) -> torch.Tensor:
        """up(x) from the output of the module up_proj() returns ([gate | up] when fused)."""
        return output[..., output.shape[-1] // 2:] if self.fused_gate_up else output

    def head_norms(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weights of the RMSNorms that q and k pass through before rope (Qwen3, OLMo2, Gemma3), or
        None. Only the runtimes that rebuild attention from weights need them; hooks see HF's own."""
        attn = self.attention_module(layer)
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        if q_norm is None or k_norm is None:
            return None
        return q_norm.weight, k_norm.weight

    def block_norms(self, layer: nn.Module) -> BlockNorms:
        """Llama's layout: an RMSNorm before attention and one before the MLP."""
        return BlockNorms(layer.input_layernorm.weight, None, layer.post_attention_layernorm.weight, None)

    def final_norm_module(self) -> nn.Module:
        """The norm after the last decoder layer."""
        return self.text_model().norm

    def final_norm(self) -> torch.Tensor:
        return self.final_norm_module().weight

    def final_norm_bias(self) -> torch.Tensor | None:
        return getattr(self.final_norm_module(), "bias", None)  # (LayerNorm families; RMSNorms have none)

    def parallel_residual(self) -> bool:
        """True where a layer's MLP reads the block input, as attention does, and both outputs join the
        residual together (GPT-NeoX / Pythia): x + attn(norm1(x)) + mlp(norm2(x))."""
        return False

    def position_embeddings(self) -> torch.Tensor | None:
        """A learned table [positions, d] added to the token embeddings (OPT), row p for position p; None
        where positions enter through rotary embeddings."""
        return None

    def text_model(self) -> nn.Module:
        """The decoder stack (embeddings, layers, final norm, rotary embedding) under the LM head."""
        return self.model.model

    def forward_constants(self) -> ForwardConstants:
        return ForwardConstants(norm_eps=float(getattr(self.text_config(), "rms_norm_eps", 1e-6)))

    def attention_windows(self) -> list[int | None]:
        """Per layer, how many positions (the newest included) a token attends to; None = all of them."""
        window = getattr(self.text_config(), "sliding_window", None)
        if not window:
            return [None] * self.num_layers
        if self.windows_by_layer_type:
            types = self.text_config().layer_types[:self.num_layers]
            return [window if t == "sliding_attention" else None for t in types]
        return [window] * self.num_layers  # Mistral, Phi-3: every layer (HF ignores their layer_types)

    def rotary_tables(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the rotary (cos, sin) tables [T, rotary dims] at `positions` [T], in fp32, from a copy
        of the model's own rotary module (its scaling variants included). Layers sharing a table share the
        tensors. Refused past the length at which dynamic-NTK or longrope scaling would change the
        frequencies of a sequence (fixed tables cannot follow that)."""
        if self.position_embeddings() is not None:
            # learned positions (OPT, GPT-2), no rotation: tables that rotate by nothing, so the loop's rope
            # + cache-write kernel only writes the cache
            ones = torch.ones(positions.numel(), self.shape().head_dim, device=positions.device)
            return [(ones, torch.zeros_like(ones))] * self.num_layers
        rotary = getattr(self.text_model(), "rotary_emb", None)
        if rotary is None:
            raise DejavuError("model has no rotary embedding module (rotary_emb)")
        _check_static_rope(rotary, self.text_config(), int(positions.max()) + 1)
        rotary = copy.deepcopy(rotary)  # HF's dynamic variants update the module they run on
        probe = torch.zeros(1, device=positions.device, dtype=torch.float32)
        with torch.no_grad():
            if "layer_type" not in inspect.signature(rotary.forward).parameters:
                cos, sin = rotary(probe, positions[None])
                return [(cos[0].float(), sin[0].float())] * self.num_layers
            # Gemma 3: local (sliding) layers rotate with another base than global ones
            types = self.text_config().layer_types[:self.num_layers]
            tables = {}
            for t in dict.fromkeys(types):
                cos, sin = rotary(probe, positions[None], t)
                tables[t] = (cos[0].float(), sin[0].float())
            return [tables[t] for t in types]

    def text_config(self):
        """The language model's config (a multimodal model nests it as text_config)."""
        return getattr(self.config, "text_config", None) or self.config

    def activation_name(self) -> str:
        cfg = self.text_config()
        for key in ("hidden_activation", "hidden_act", "activation_function"):
            value = getattr(cfg, key, None)
            if value:
                return str(value)
        return "unknown"

    # --- shapes -----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    def shape(self) -> LayerShape:
        cfg = self.text_config()
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return LayerShape(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
        )

    # --- canonical weights --------------------------------------------------------------------
    def mlp_weights(self, layer: nn.Module) -> MLPWeights:
        up, down, gate = self.up_proj(layer), self.down_proj(layer), self.gate_proj(layer)
        return MLPWeights(
            up=_linear_weight(up),
            down=_linear_weight(down),
            gate=_linear_weight(gate) if gate is not None else None,
            up_bias=_bias(up),
            gate_bias=_bias(gate) if gate is not None else None,
            down_bias=_bias(down),
        )

    def attention_weights(self, layer: nn.Module) -> AttentionWeights:
        attn = self.attention_module(layer)
        o = self.o_proj(layer)
        return AttentionWeights(
            q=_linear_weight(attn.q_proj),
            k=_linear_weight(attn.k_proj),
            v=_linear_weight(attn.v_proj),
            o=_linear_weight(o),
            q_bias=_bias(attn.q_proj),
            k_bias=_bias(attn.k_proj),
            v_bias=_bias(attn.v_proj),
            o_bias=_bias(o),
        )

    def describe(self) -> dict:
        s = self.shape()
        return {
            "family": self.family,
            "model_type": getattr(self.config, "model_type", "unknown"),
            "num_layers": self.num_layers,
            "hidden_size": s.hidden_size,
            "intermediate_size": s.intermediate_size,
            "num_heads": s.num_heads,
            "num_kv_heads": s.num_kv_heads,
            "head_dim": s.head_dim,
            "gated_mlp": self.gated,
            "activation": self.activation_name(),
        }


class LlamaAdapter(Adapter):
    """Llama, Mistral, Qwen2/3, SmolLM: SwiGLU in split gate/up/down projections, GQA."""

    family = "llama"
    model_types = ("llama", "mistral")

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def down_proj(self, layer):
        return layer.mlp.down_proj

    def up_proj(self, layer):
        return layer.mlp.up_proj

    def gate_proj(self, layer):
        return layer.mlp.gate_proj


class QwenAdapter(LlamaAdapter):
    """Qwen2/3 and Ministral: Llama's layout (Qwen3 normalises q and k per head), with a sliding window on the
    layers the config's layer_types list."""

    model_types = ("qwen2", "qwen3", "ministral")
    windows_by_layer_type = True


class GraniteAdapter(LlamaAdapter):
    """Granite 3: Llama's layers with scalar multipliers on the embeddings, attention scores, each block's
    output and the logits."""

    model_types = ("granite",)  # family "llama": bundles name the family, and its layers are Llama's

    def forward_constants(self) -> ForwardConstants:
        cfg = self.config
        return ForwardConstants(norm_eps=float(cfg.rms_norm_eps), embed_scale=float(cfg.embedding_multiplier),
                                attention_scale=float(cfg.attention_multiplier),
                                residual_scale=float(cfg.residual_multiplier),
                                logit_scale=1.0 / float(cfg.logits_scaling))


class OlmoAdapter(LlamaAdapter):
    """OLMo 1: Llama's projections with LayerNorms that have no weights or biases."""

    model_types = ("olmo",)  # family "llama", as before this class: bundles name the family

    def _unit_norm(self) -> torch.Tensor:
        # the loop reads a missing norm weight as "no norm", so the weightless LayerNorm gets weights of 1
        ref = self.text_model().embed_tokens.weight
        return torch.ones(self.shape().hidden_size, device=ref.device, dtype=ref.dtype)

    def block_norms(self, layer) -> BlockNorms:
        if self.config.clip_qkv is not None:
            raise DejavuError(f"this OLMo model clamps q, k and v to +-{self.config.clip_qkv} (clip_qkv), which the "
                              "decode loop does not: use the hooks engine")
        return BlockNorms(self._unit_norm(), None, self._unit_norm(), None)

    def final_norm(self) -> torch.Tensor:
        return self._unit_norm()

    def forward_constants(self) -> ForwardConstants:
        return ForwardConstants(norm_eps=1e-5, layer_norm=True)  # (HF's OlmoLayerNorm fixes its eps)


class Olmo2Adapter(LlamaAdapter):
    """OLMo 2: Llama's projections, with RMSNorms on each block's output (none on its input) and on the
    whole q and k projections (all heads at once)."""

    model_types = ("olmo2",)

    def block_norms(self, layer) -> BlockNorms:
        return BlockNorms(None, layer.post_attention_layernorm.weight, None, layer.post_feedforward_layernorm.weight)


class GemmaAdapter(LlamaAdapter):
    """Gemma, Gemma2, Gemma3 (text): GeGLU (tanh-approximate GELU gate), GQA."""

    family = "gemma"
    model_types = ("gemma", "gemma2", "gemma3_text", "gemma3")
    windows_by_layer_type = True

    def decoder_layers(self) -> nn.ModuleList:
        return self.text_model().layers

    def text_model(self) -> nn.Module:
        inner = self.model.model
        # Gemma3ForConditionalGeneration nests the text model one level deeper.
        return inner.language_model if hasattr(inner, "language_model") else inner

    def block_norms(self, layer) -> BlockNorms:
        if not hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 1: Llama's layout
            return super().block_norms(layer)
        # Gemma 2/3: post_attention_layernorm normalises attention's output, not the MLP's input
        return BlockNorms(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                          layer.pre_feedforward_layernorm.weight, layer.post_feedforward_layernorm.weight)

    def head_norms(self, layer):
        norms = super().head_norms(layer)
        # Gemma's RMSNorms scale by 1 + weight; the runtimes apply the weights they are given
        return None if norms is None else tuple(1.0 + w.float() for w in norms)

    def forward_constants(self) -> ForwardConstants:
        cfg = self.text_config()
        scalar = getattr(cfg, "query_pre_attn_scalar", None)  # Gemma 2/3 scale q.k by its inverse root
        return ForwardConstants(norm_eps=float(cfg.rms_norm_eps), norm_offset=1.0,
                                embed_scale=float(cfg.hidden_size) ** 0.5,
                                attention_scale=None if scalar is None else float(scalar) ** -0.5,
                                # Gemma 3's config keeps the field, but its attention never caps the scores
                                attention_softcap=(getattr(cfg, "attn_logit_softcapping", None)
                                                   if cfg.model_type == "gemma2" else None),
                                logit_softcap=getattr(cfg, "final_logit_softcapping", None))


class OPTAdapter(Adapter):
    """OPT: ReLU MLP (fc1/fc2 directly on the layer), multi-head attention; Deja Vu's own family."""

    family = "opt"
    gated = False
    model_types = ("opt",)

    def decoder_layers(self):
        return self.model.model.decoder.layers

    def mlp_module(self, layer):
        # OPT has no MLP submodule; the layer itself holds fc1/fc2.
        return layer

    def down_proj(self, layer):
        return layer.fc2

    def up_proj(self, layer):
        return layer.fc1

    def o_proj(self, layer):
        return layer.self_attn.out_proj

    def activation(self, layer):
        return layer.activation_fn

    def shape(self) -> LayerShape:
        cfg = self.config
        return LayerShape(cfg.hidden_size, cfg.ffn_dim, cfg.num_attention_heads, cfg.num_attention_heads,
                          cfg.hidden_size // cfg.num_attention_heads)

    def text_model(self):
        return self.model.model.decoder

    def _check_loop_layout(self) -> None:
        """The decode loop rebuilds the pre-norm OPTs with affine LayerNorms (125m, 1.3b and up)."""
        cfg, decoder = self.config, self.text_model()
        why = ("it normalises after each block (do_layer_norm_before=False, as OPT-350m)"
               if not cfg.do_layer_norm_before else
               "its embeddings are projected in and out (word_embed_proj_dim != hidden_size)"
               if decoder.project_in is not None else
               "it has no final LayerNorm" if decoder.final_layer_norm is None else
               "its LayerNorms have no weights (layer_norm_elementwise_affine=False)"
               if decoder.final_layer_norm.weight is None else None)
        if why:
            raise DejavuError(f"the decode loop does not run this OPT model: {why}; use the hooks engine")

    def block_norms(self, layer) -> BlockNorms:
        self._check_loop_layout()
        return _pre_layer_norms(layer.self_attn_layer_norm, layer.final_layer_norm)

    def final_norm_module(self):
        self._check_loop_layout()
        return self.text_model().final_layer_norm

    def forward_constants(self) -> ForwardConstants:
        return ForwardConstants(norm_eps=1e-5, layer_norm=True)  # nn.LayerNorm's default, which OPT keeps

    def position_embeddings(self):
        table = self.text_model().embed_positions
        return table.weight[table.offset:]  # OPT's table starts with `offset` (2) unused rows


class GPT2Adapter(Adapter):
    """GPT-2: GELU MLP in Conv1D layers, fused qkv (c_attn)."""

    family = "gpt2"
    gated = False
    model_types = ("gpt2",)

    def decoder_layers(self):
        return self.model.transformer.h

    def attention_module(self, layer):
        return layer.attn

    def down_proj(self, layer):
        return layer.mlp.c_proj

    def up_proj(self, layer):
        return layer.mlp.c_fc

    def o_proj(self, layer):
        return layer.attn.c_proj

    def activation(self, layer):
        return layer.mlp.act

    def shape(self) -> LayerShape:
        cfg = self.config
        inner = cfg.n_inner or 4 * cfg.n_embd
        return LayerShape(cfg.n_embd, inner, cfg.n_head, cfg.n_head, cfg.n_embd // cfg.n_head)

    def text_model(self):
        return self.model.transformer

    def block_norms(self, layer) -> BlockNorms:
        cfg = self.config
        if cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn or not cfg.scale_attn_weights:
            raise DejavuError("this GPT-2 model scales its attention scores in a way the decode loop does not "
                              "(scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn or no scaling): use the "
                              "hooks engine")
        return _pre_layer_norms(layer.ln_1, layer.ln_2)

    def final_norm_module(self):
        return self.text_model().ln_f

    def forward_constants(self) -> ForwardConstants:
        return ForwardConstants(norm_eps=float(self.config.layer_norm_epsilon), layer_norm=True)

    def position_embeddings(self):
        return self.text_model().wpe.weight

    def attention_weights(self, layer):
        # c_attn output columns are [q | k | v], each of size hidden.
        w = _linear_weight(layer.attn.c_attn)
        b = _bias(layer.attn.c_attn)
        d = self.shape().hidden_size
        q, k, v = w.split(d, dim=0)
        qb, kb, vb = b.split(d) if b is not None else (None, None, None)
        o = layer.attn.c_proj
        return AttentionWeights(q, k, v, _linear_weight(o), qb, kb, vb, _bias(o))


class GPTNeoXAdapter(Adapter):
    """GPT-NeoX / Pythia: GELU MLP, fused qkv interleaved per head, LayerNorms with biases, rotary over the
    first part of each head only, and (by default) attention and MLP side by side on the block input."""

    family = "gpt_neox"
    gated = False
    model_types = ("gpt_neox",)

    def decoder_layers(self):
        return self.model.gpt_neox.layers

    def attention_module(self, layer):
        return layer.attention

    def down_proj(self, layer):
        return layer.mlp.dense_4h_to_h

    def up_proj(self, layer):
        return layer.mlp.dense_h_to_4h

    def o_proj(self, layer):
        return layer.attention.dense

    def activation(self, layer):
        return layer.mlp.act

    def text_model(self):
        return self.model.gpt_neox

    def shape(self) -> LayerShape:
        cfg = self.config  # (HF's NeoX attention sizes heads as hidden / heads, whatever head_dim says)
        return LayerShape(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_attention_heads,
                          cfg.hidden_size // cfg.num_attention_heads)

    def block_norms(self, layer) -> BlockNorms:
        return _pre_layer_norms(layer.input_layernorm, layer.post_attention_layernorm)

    def final_norm_module(self):
        return self.text_model().final_layer_norm

    def forward_constants(self) -> ForwardConstants:
        return ForwardConstants(norm_eps=float(self.config.layer_norm_eps), layer_norm=True)

    def parallel_residual(self) -> bool:
        return bool(self.config.use_parallel_residual)

    def attention_weights(self, layer):
        # NeoX packs rows per head as [q_h | k_h | v_h]; regroup into q, k, v.
        s = self.shape()
        qkv = layer.attention.query_key_value
        w = qkv.weight.view(s.num_heads, 3, s.head_dim, s.hidden_size)
        b = qkv.bias.view(s.num_heads, 3, s.head_dim) if qkv.bias is not None else None
        q, k, v = (w[:, i].reshape(-1, s.hidden_size) for i in range(3))
        qb, kb, vb = ((b[:, i].reshape(-1) for i in range(3)) if b is not None else (None, None, None))
        o = layer.attention.dense
        return AttentionWeights(q, k, v, o.weight, qb, kb, vb, o.bias)


class Phi3Adapter(LlamaAdapter):
    """Phi-3 / Phi-3.5 / Phi-4: SwiGLU with gate and up in one projection ([gate | up]), q/k/v in one."""

    family = "phi3"
    fused_gate_up = True
    model_types = ("phi3",)

    def up_proj(self, layer):
        return layer.mlp.gate_up_proj

    def gate_proj(self, layer):
        return layer.mlp.gate_up_proj

    def activation(self, layer):
        return layer.mlp.activation_fn

    def mlp_weights(self, layer) -> MLPWeights:
        gate, up = layer.mlp.gate_up_proj.weight.chunk(2, dim=0)
        return MLPWeights(up=up, down=layer.mlp.down_proj.weight, gate=gate)

    def attention_weights(self, layer) -> AttentionWeights:
        s = self.shape()
        attn = layer.self_attn
        q, k, v = attn.qkv_proj.weight.split([s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim,
                                              s.num_kv_heads * s.head_dim], dim=0)
        return AttentionWeights(q, k, v, attn.o_proj.weight)


ADAPTERS: list[type[Adapter]] = [LlamaAdapter, QwenAdapter, GraniteAdapter, OlmoAdapter, Olmo2Adapter, GemmaAdapter,
                                  Phi3Adapter, OPTAdapter, GPT2Adapter, GPTNeoXAdapter]


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            adapter = cls(model)
            _check_structure(adapter, model_type)
            return adapter
    raise DejavuError(
        f"no adapter for model type {model_type!r} ({type(model).__name__}); supported: "
        f"{', '.join(supported_model_types())}. Add one in dejavu/models/adapters.py: it names the "
        "decoder layers, the MLP's up/gate/down projections and activation, and the attention output projection."
    )


def _check_structure(adapter: Adapter, model_type: str) -> None:
    """Fail early, naming the missing piece, when a model of a known type is laid out differently."""
    try:
        layers = adapter.decoder_layers()
        first = layers[0]
        for what, getter in (("MLP down projection", adapter.down_proj), ("MLP up projection", adapter.up_proj),
                             ("attention output projection", adapter.o_proj)):
            try:
                getter(first)
            except AttributeError as exc:
                raise DejavuError(f"{model_type} model has no {what} where the {adapter.family} adapter looks ({exc})") from None
    except AttributeError as exc:
        raise DejavuError(f"{model_type} model has no decoder layers where the {adapter.family} adapter looks ({exc})") from None
