"""Models at real shapes with random weights and random predictors: speed measurements only.

The model is built from its config directly on the target device in the target dtype (no fp32 CPU
init of 7B parameters). Predictors default to rank hidden/16 (256 at 7B; Deja Vu used ~1/12 of the
hidden size at 175B), the head predictor capped at the head count as training caps it
(predictor_rank): at Llama-2-7B bf16 that is 8.4 MB per layer (MLP 8.1 MB, heads 0.27 MB), 2.1 % of
a dense layer's 405 MB.
"""

from __future__ import annotations

import torch

from dejavu.errors import DejavuError
from dejavu.models.adapters import adapter_for
from dejavu.predictor import PredictorSet

PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu"),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu"),
    # Mistral 7B v0.2 on: no sliding window (MistralConfig's default is v0.1's 4,096)
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, num_hidden_layers=32, vocab_size=32000,
                       max_position_embeddings=32768, sliding_window=None, rms_norm_eps=1e-5, hidden_act="silu"),
    # Mistral 7B v0.1 attended to a sliding window of 4,096 positions (later versions to all)
    "mistral-7b-v0.1": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                            num_key_value_heads=8, num_hidden_layers=32, vocab_size=32000,
                            max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5, hidden_act="silu"),
    "qwen2-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                     num_key_value_heads=4, num_hidden_layers=28, vocab_size=152064,
                     max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu"),
    # Qwen3 sets head_dim on its own (Qwen3-32B: 64 heads of 128 over a hidden size of 5120)
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, num_hidden_layers=36, vocab_size=151936,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu"),
    # Phi-3-mini-4k: MHA, gate/up and q/k/v each in one projection, a sliding window of 2,047 positions
    "phi-3-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
                       num_key_value_heads=32, num_hidden_layers=32, vocab_size=32064, max_position_embeddings=4096,
                       sliding_window=2047, rms_norm_eps=1e-5, hidden_act="silu", pad_token_id=32000),
    # Gemma 2: norms after each block too, scores and logits capped, every other layer in a 4,096 window
    "gemma-2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=256, num_hidden_layers=42, vocab_size=256000,
                       max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=256,
                       rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh"),
    # Gemma 3: q/k normalised per head; five of six layers in a 1,024 window with their own rope base
    "gemma-3-12b": dict(model_type="gemma3_text", hidden_size=3840, intermediate_size=15360, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=256, num_hidden_layers=48, vocab_size=262208,
                        max_position_embeddings=131072, sliding_window=1024, query_pre_attn_scalar=256,
                        rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh"),
    # OLMo 2: norms after each block only, q and k normalised over all heads (every q head is computed)
    "olmo-2-7b": dict(model_type="olmo2", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, num_hidden_layers=32, vocab_size=100352, max_position_embeddings=4096,
                      rms_norm_eps=1e-6, rope_theta=500000.0, hidden_act="silu"),
    # Granite 3: Llama's layers with scalar multipliers (folded into the weights by the decode loop)
    "granite-3-8b": dict(model_type="granite", hidden_size=4096, intermediate_size=12800, num_attention_heads=32,
                         num_key_value_heads=8, num_hidden_layers=40, vocab_size=49155, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, rope_theta=10000000.0, embedding_multiplier=12.0,
                         attention_multiplier=0.0078125, residual_multiplier=0.22, logits_scaling=16.0,
                         hidden_act="silu"),
    # OPT, Deja Vu's own family: a plain ReLU MLP (two matrices, biases), LayerNorm, learned positions, MHA
    "opt-6.7b": dict(model_type="opt", hidden_size=4096, ffn_dim=16384, num_attention_heads=32, num_hidden_layers=32,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096,
                     do_layer_norm_before=True, activation_function="relu"),
    # GPT-2 XL: OPT's layout (LayerNorm with biases, learned positions, plain MLP) with tanh-GELU, 25 heads
    "gpt2-xl": dict(model_type="gpt2", hidden_size=1600, num_attention_heads=25, num_hidden_layers=48,
                    vocab_size=50257, max_position_embeddings=1024, activation_function="gelu_new"),
    # Pythia 6.9B (GPT-NeoX): attention and MLP side by side, rotary over a quarter of each head
    "pythia-6.9b": dict(model_type="gpt_neox", hidden_size=4096, intermediate_size=16384, num_attention_heads=32,
                        num_hidden_layers=32, vocab_size=50432, max_position_embeddings=2048,
                        use_parallel_residual=True, hidden_act="gelu",
                        rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "rope_type": "default"}),
    # Pythia 2.8B: 80-dim heads (not a power of two), 20 of them rotating
    "pythia-2.8b": dict(model_type="gpt_neox", hidden_size=2560, intermediate_size=10240, num_attention_heads=32,
                        num_hidden_layers=32, vocab_size=50304, max_position_embeddings=2048,
                        use_parallel_residual=True, hidden_act="gelu",
                        rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "rope_type": "default"}),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, num_hidden_layers=30, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, hidden_act="silu"),
}


def default_rank(hidden_size: int) -> int:
    return max(16, hidden_size // 16)


def build_synthetic(name: str, layers: int | None, device, dtype, mlp_density: float, head_density: float,
                    rank: int | None = None, seed: int = 0):
    """(model, adapter, PredictorSet) for preset `name`, keeping the first `layers` decoder layers."""
    if name not in PRESETS:
        raise DejavuError(f"unknown synthetic model {name!r}; presets: {', '.join(sorted(PRESETS))}")
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(PRESETS[name])
    model_type = spec.pop("model_type")
    if layers is not None:
        if layers < 1:
            raise DejavuError(f"--layers must be at least 1, got {layers}")
        if layers > spec["num_hidden_layers"]:
            raise DejavuError(f"--layers {layers}: {name} has {spec['num_hidden_layers']} layers")
        spec["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(model_type, **spec)
    device = torch.device(device)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with device:
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device=device, dtype=dtype).eval()
    adapter = adapter_for(model)
    # The rotary inverse frequencies are recomputed in fp32, as a loaded model has them: a rotary module
    # built outside the low-precision default dtype (OPT and GPT-2 have learned positions instead)
    rotary = getattr(adapter.text_model(), "rotary_emb", None)
    if rotary is not None:
        with device:
            fresh = type(rotary)(rotary.config)
        for name, buffer in fresh.named_buffers():
            setattr(rotary, name, buffer.float())
    s = adapter.shape()
    preds = PredictorSet.random(adapter.num_layers, s.hidden_size, s.intermediate_size, s.num_heads,
                                rank or default_rank(s.hidden_size), mlp_density, head_density, seed=seed)
    preds.meta["rank"] = rank or default_rank(s.hidden_size)
    return model, adapter, preds.to(device=device, dtype=dtype)
