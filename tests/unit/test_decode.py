"""The decode loop on CPU (reference ops) against Hugging Face's own forward pass."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dejavu.models.adapters import adapter_for
from dejavu.predictor import PredictorSet, units_for_density
from dejavu.runtime.decode import DecodeModel

from helpers import decode_one_sparse_step


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # tiny models leave biases at 0 and norm weights at 1, which would hide a bias or norm the loop skipped
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model, adapter_for(model)


def _greedy_hf(model, prompt, steps):
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids, logits


def _assert_decodes_as_hf(model, dm, prompt, steps):
    """Dense prefill then `steps` greedy steps of the loop equal HF's own forward (logits and tokens);
    returns the state."""
    st = dm.new_state(prompt.shape[0])
    logits = dm.prefill(st, prompt)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(prompt).logits[:, -1], atol=1e-4, rtol=1e-4)
    ids = [st.tokens.clone()]
    for _ in range(steps):
        logits = dm.step(st, sparse=False)
        ids.append(st.tokens.clone())
    ref_ids, ref_logits = _greedy_hf(model, prompt, steps + 1)
    torch.testing.assert_close(torch.stack(ids, 1), ref_ids[:, prompt.shape[1]:])
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    return st


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text",
                                        "granite", "olmo2", "opt", "gpt2", "gpt_neox", "olmo"])
def test_dense_prefill_and_steps_match_hf(tiny_model_factory, model_type):
    model, adapter = _load(tiny_model_factory(model_type))
    torch.manual_seed(0)
    prompt = torch.randint(1, 500, (2, 7))
    st = _assert_decodes_as_hf(model, DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=16), prompt, 3)
    assert int(st.pos) == 10


@pytest.mark.parametrize("model_type,overrides", [
    ("granite", dict(attention_bias=True)),  # o's bias is scaled with the block's output
    ("gemma3_text", dict(attn_logit_softcapping=5.0)),  # kept in Gemma 3's config, never applied by its attention
    ("gemma2", dict(attn_logit_softcapping=5.0)),  # applied by Gemma 2's
])
def test_dense_decode_matches_hf_for_config_variants(tiny_model_factory, model_type, overrides):
    model, adapter = _load(tiny_model_factory(model_type, **overrides))
    torch.manual_seed(0)
    prompt = torch.randint(1, 500, (2, 7))
    _assert_decodes_as_hf(model, DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=16), prompt, 3)


def _masked_hf_logits(model, adapter, ids, keep_mlp, keep_heads):
    """HF forward where, at the last position only, unselected neurons / heads are zeroed."""
    s = adapter.shape()
    handles = []
    for i, layer in enumerate(adapter.decoder_layers()):
        def mask_mlp(mod, args, idx=keep_mlp[i]):
            x = args[0].clone()
            m = torch.zeros(x.shape[-1], dtype=torch.bool)
            m[idx] = True
            x.view(ids.shape[0], -1, x.shape[-1])[:, -1, ~m] = 0  # (OPT flattens the tokens: [B * T, n])
            return (x,)

        def mask_heads(mod, args, idx=keep_heads[i]):
            x = args[0].clone()
            m = torch.zeros(s.num_heads, dtype=torch.bool)
            m[idx] = True
            x[:, -1] = (x[:, -1].view(x.shape[0], s.num_heads, s.head_dim) * m[None, :, None]).view(x.shape[0], -1)
            return (x,)

        if keep_mlp[i] is not None:
            handles.append(adapter.down_proj(layer).register_forward_pre_hook(mask_mlp))
        if keep_heads[i] is not None:
            handles.append(adapter.o_proj(layer).register_forward_pre_hook(mask_heads))
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        for hd in handles:
            hd.remove()
    return out


@pytest.mark.parametrize("model_type,pairing", [
    ("llama", "current"), ("llama", "lookahead"), ("qwen3", "current"), ("phi3", "lookahead"),
    ("gemma2", "current"), ("gemma3_text", "lookahead"), ("granite", "current"), ("olmo2", "lookahead"),
    ("opt", "current"), ("gpt2", "lookahead"), ("gpt_neox", "current")])
def test_sparse_step_matches_masked_hf(tiny_model_factory, model_type, pairing):
    model, adapter = _load(tiny_model_factory(model_type))
    s = adapter.shape()
    nl = adapter.num_layers
    preds = PredictorSet.random(nl, s.hidden_size, s.intermediate_size, s.num_heads, 8, 0.5, 0.5, seed=1)
    preds.head_pairing = pairing
    logits, ids, _ = decode_one_sparse_step(model, adapter, preds)
    # The selections, recomputed from HF's own block inputs of the new token (dense up to the
    # current layer's input would differ, so take them from the masked run's hidden states by fixpoint:
    # layer l's inputs depend only on layers < l, so run L times, fixing one more layer each time).
    keep_mlp, keep_heads = [None] * nl, [None] * nl
    for _ in range(nl + 1):
        out = _masked_hf_logits(model, adapter, ids, keep_mlp, keep_heads)
        block_in = [hs[:, -1] for hs in out.hidden_states[:nl]]
        for i, lp in enumerate(preds.layers):
            src_h = i if pairing == "current" else max(i - 1, 0)
            k_h = units_for_density(0.5, s.num_heads)
            keep_heads[i] = lp.attn(block_in[src_h]).topk(k_h, -1).indices[0]
            keep_mlp[i] = lp.mlp(block_in[i]).topk(units_for_density(0.5, s.intermediate_size), -1).indices[0]
    torch.testing.assert_close(logits, out.logits[:, -1], atol=1e-4, rtol=1e-4)
    # and sparsity really changed the output
    with torch.no_grad():
        dense = model(ids).logits[:, -1]
    assert (logits - dense).abs().max() > 1e-3


def test_step_bytes_sparse_less_than_dense(tiny_model_factory):
    model, adapter = _load(tiny_model_factory("llama"))
    s = adapter.shape()
    preds = PredictorSet.random(adapter.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, 8, 0.5, 0.5)
    dm = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=8)
    dense, sparse = dm.step_bytes(1, 8, False), dm.step_bytes(1, 8, True)
    assert sparse["weights"] < dense["weights"] and sparse["predictors"] > 0 == dense["predictors"]
    expected = adapter.num_layers * 4 * sum(
        3 * units_for_density(0.5, s.intermediate_size) * s.hidden_size
        + 2 * units_for_density(0.5, s.num_heads) * s.head_dim * s.hidden_size
        + 2 * s.num_kv_heads * s.head_dim * s.hidden_size for _ in [0])
    assert sparse["weights"] == expected


@pytest.mark.parametrize("model_type,window_config", [
    ("mistral", dict(sliding_window=4)),  # every layer
    ("mistral", dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])),  # loads as Ministral
    ("phi3", dict(sliding_window=4)),
    ("qwen2", dict(sliding_window=4, use_sliding_window=True, max_window_layers=1)),  # layers from 1 on
    ("gemma2", dict(sliding_window=4)),  # every other layer
    ("gemma3_text", dict(sliding_window=4, num_hidden_layers=3, sliding_window_pattern=2)),  # own rope base
])
def test_sliding_windows_match_hf_past_the_window(tiny_model_factory, model_type, window_config):
    # prompt and decoded tokens run well past the window, in prefill and in the steps
    model, adapter = _load(tiny_model_factory(model_type, **window_config))
    windows = adapter.attention_windows()
    assert 4 in windows and (model_type in ("mistral", "phi3") or None in windows or model_type == "gemma3_text")
    if "layer_types" in window_config:
        assert model.config.model_type == "ministral" and windows == [4, None]
    torch.manual_seed(0)
    prompt = torch.randint(1, 500, (2, 7))
    _assert_decodes_as_hf(model, DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=16), prompt, 5)
    # and the window matters here: the same loop attending to every position gives other logits
    unwindowed = DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=16)
    for lw in unwindowed.layers:
        lw.window = 0
    full = unwindowed.prefill(unwindowed.new_state(2), prompt)
    with torch.no_grad():
        assert (full - model(prompt).logits[:, -1]).abs().max() > 1e-3


def test_qwen_windows_apply_only_when_switched_on(tiny_model_factory):
    # Qwen configs carry a window that only use_sliding_window turns on
    model, adapter = _load(tiny_model_factory("qwen2", sliding_window=8, use_sliding_window=False))
    assert adapter.attention_windows() == [None, None]


def _neox_rope(factor: float) -> dict:
    return dict(rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": factor, "rope_type": "default"})


@pytest.mark.parametrize("config", [
    dict(use_parallel_residual=False),  # attention then MLP, as Llama
    _neox_rope(1.0),  # whole heads rotate: no reordering
    _neox_rope(0.5),  # (the default rotates a quarter of each head)
    dict(attention_bias=False, use_parallel_residual=False, **_neox_rope(0.75))])
def test_gpt_neox_layouts_decode_as_hf(tiny_model_factory, config):
    # rotary over the first part of each head reaches the whole-head kernels through a reordering of q/k
    # dims, and a parallel block's MLP normalises the block input, not the sum after attention
    model, adapter = _load(tiny_model_factory("gpt_neox", **config))
    torch.manual_seed(0)
    prompt = torch.randint(1, 500, (2, 7))
    dm = DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=16)
    assert (dm.rotary_order is None) == (config.get("rope_parameters", {}).get("partial_rotary_factor") == 1.0)
    _assert_decodes_as_hf(model, dm, prompt, 3)


def test_phi3_with_partial_rotary_decodes_as_hf(tiny_model_factory):
    # Phi-4-mini is a phi3 model rotating 3/4 of each head: the NeoX reordering serves it unchanged
    model, adapter = _load(tiny_model_factory("phi3", **_neox_rope(0.75)))
    dm = DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=16)
    assert dm.rotary_order is not None
    torch.manual_seed(0)
    _assert_decodes_as_hf(model, dm, torch.randint(1, 500, (2, 7)), 3)


@pytest.mark.parametrize("model_type,config", [("gemma2", dict(sliding_window=3)), ("opt", {}), ("gpt2", {}),
                                               ("gpt_neox", {})])
def test_left_padded_batch_equals_each_prompt_alone(tiny_model_factory, model_type, config):
    # a padded sequence's window starts at its own position minus the window, never before its start; its
    # learned position embeddings (OPT) count from its start
    model, adapter = _load(tiny_model_factory(model_type, **config))
    torch.manual_seed(0)
    prompts = [torch.randint(1, 500, (7,)), torch.randint(1, 500, (2,))]
    dm = DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=16)
    st = dm.new_state(2, padded=True)
    padded = torch.stack([torch.cat([torch.zeros(7 - len(p), dtype=torch.long), p]) for p in prompts])
    first = dm.prefill(st, padded, lengths=torch.tensor([len(p) for p in prompts]))
    batch_logits, batch_ids = [first], [st.tokens.clone()]
    for _ in range(4):
        batch_logits.append(dm.step(st, sparse=False))
        batch_ids.append(st.tokens.clone())
    for b, prompt in enumerate(prompts):
        alone = dm.new_state(1)
        logits, ids = [dm.prefill(alone, prompt[None])], [alone.tokens.clone()]
        for _ in range(4):
            logits.append(dm.step(alone, sparse=False))
            ids.append(alone.tokens.clone())
        assert torch.cat(ids).tolist() == torch.stack(batch_ids)[:, b].tolist()
        torch.testing.assert_close(torch.cat(logits), torch.stack(batch_logits)[:, b], atol=1e-4, rtol=1e-4)


def test_gemma3_with_a_vision_tower_decodes_text_as_hf():
    # Gemma 3 from 4B up loads as Gemma3ForConditionalGeneration: its text config is nested, and so is
    # the language model the loop reads its layers, norms and rotary tables from
    from transformers import AutoModelForCausalLM, Gemma3Config

    text = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_hidden_layers=3, max_position_embeddings=256, vocab_size=600, sliding_window=4,
                sliding_window_pattern=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=599,
                       boi_token_index=598, eoi_token_index=597)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    adapter = adapter_for(model)
    assert model.config.model_type == "gemma3" and adapter.attention_windows() == [4, None, 4]
    prompt = torch.randint(1, 500, (2, 7))
    _assert_decodes_as_hf(model, DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=16), prompt, 4)


def test_mistral_windows_cover_every_layer_whatever_its_layer_types():
    # HF's Mistral windows every layer and ignores layer_types (saved and reloaded, such a config becomes
    # Ministral, which reads them: the windows test above covers it)
    from transformers import MistralConfig, MistralForCausalLM

    from helpers import TINY_CONFIGS

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**TINY_CONFIGS["mistral"], vocab_size=600, sliding_window=3,
                                             layer_types=["full_attention", "sliding_attention"])).eval()
    adapter = adapter_for(model)
    assert adapter.attention_windows() == [3, 3]
    prompt = torch.randint(1, 500, (1, 7))
    dm = DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=12)
    with torch.no_grad():
        torch.testing.assert_close(dm.prefill(dm.new_state(1), prompt), model(prompt).logits[:, -1],
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type,config", [
    ("llama", dict(max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                "rope_theta": 10000.0})),
    ("phi3", dict(max_position_embeddings=64, original_max_position_embeddings=16,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                                   "long_factor": [4.0] * 8})),
])
def test_rope_that_rescales_with_length_is_matched_below_it_and_refused_past_it(tiny_model_factory, model_type,
                                                                                config):
    # dynamic NTK and longrope switch a sequence's frequencies past a length, which fixed tables cannot follow
    from dejavu.errors import DejavuError

    model, adapter = _load(tiny_model_factory(model_type, **config))
    torch.manual_seed(0)
    prompt = torch.randint(1, 500, (1, 7))
    with pytest.raises(DejavuError, match="changes its frequencies once a sequence passes 16 positions"):
        DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=17)
    dm = DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=16)
    st = _assert_decodes_as_hf(model, dm, prompt, 9)  # the last step writes the cache's last position
    # the cache is full: a clear error, not an index error
    with pytest.raises(DejavuError, match="all are used"):
        dm.step(st, sparse=False)


def test_llama_with_attention_biases_matches_hf_and_mlp_biases_are_refused(tiny_model_factory):
    from dejavu.errors import DejavuError

    model, adapter = _load(tiny_model_factory("llama", attention_bias=True))  # (_load randomises the biases)
    torch.manual_seed(0)
    prompt = torch.randint(1, 500, (2, 7))
    dm = DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=12)
    st = dm.new_state(2)
    with torch.no_grad():
        torch.testing.assert_close(dm.prefill(st, prompt), model(prompt).logits[:, -1], atol=1e-4, rtol=1e-4)
    ref_ids, ref_logits = _greedy_hf(model, prompt, 3)
    dm.step(st, sparse=False)
    torch.testing.assert_close(dm.step(st, sparse=False), ref_logits, atol=1e-4, rtol=1e-4)
    model, adapter = _load(tiny_model_factory("llama", mlp_bias=True))
    with pytest.raises(DejavuError, match="no gate/up biases"):
        DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=12)


@pytest.mark.parametrize("config,why", [
    (dict(do_layer_norm_before=False), "normalises after each block"),
    (dict(word_embed_proj_dim=32), "projected in and out"),
    (dict(layer_norm_elementwise_affine=False), "no weights"),
])
def test_opt_layouts_the_loop_does_not_take_are_refused_by_name(tiny_model_factory, config, why):
    from dejavu.errors import DejavuError

    model, adapter = _load(tiny_model_factory("opt", **config))
    with pytest.raises(DejavuError, match=why):
        DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=12)


def test_olmo_with_clipped_qkv_is_refused_by_name(tiny_model_factory):
    from dejavu.errors import DejavuError

    model, adapter = _load(tiny_model_factory("olmo", clip_qkv=8.0))
    with pytest.raises(DejavuError, match="clip_qkv"):
        DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=12)


def test_an_activation_the_kernels_lack_is_refused_so_auto_falls_back(tiny_model_factory):
    from dejavu.errors import DejavuError

    model, adapter = _load(tiny_model_factory("gpt_neox", hidden_act="quick_gelu"))
    with pytest.raises(DejavuError, match="unsupported activation 'quick_gelu'.*use the hooks engine"):
        DecodeModel(model, adapter, None, "cpu", torch.float32, max_len=12)
