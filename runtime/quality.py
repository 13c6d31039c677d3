"""Quality of a sparse model against its dense self, measured the standard way.

Perplexity is the usual strided evaluation (as in the Hugging Face perplexity guide): windows of
`window` tokens start every `stride` tokens; each window scores only the tokens beyond its overlap
with the previous one, so every token is scored once with up to `window - stride` tokens of context,
except where windows do not overlap (stride = window, as when a model's context is at most the stride): each
window's first token then has no context and is not scored (the guide's handling; the reports count the
tokens scored).

Which tokens are sparse: every token of every window (the scored ones and their context), each with
its own selection, so a scored token's own computation is sparse and the K/V it attends to come from
sparse states too, exactly what a token-by-token sparse decode of the window computes
(runtime/apply.py explains why the masked parallel forward equals it). Dense prefill applies to
generation only (`greedy_generate`, `sparse_prefill=False`: the prompt runs dense, every generated
token sparse).

Also: top-1 agreement (share of scored positions where sparse and dense pick the same next token)
and mean KL(dense || sparse) over the same positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from dejavu.errors import DejavuError

PROMPTS = (
    "The capital of France is",
    "In the early twentieth century, the city",
    "A good way to learn a new programming language is",
)


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    first_scored: int  # first logit position (within the window) whose next token is scored


def strided_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    if window < 2:
        raise DejavuError(f"evaluation window must be at least 2 tokens, got {window}")
    if not 0 < stride <= window:
        raise DejavuError(f"evaluation stride must be in 1..window ({window}), got {stride}")
    if num_tokens < 2:
        raise DejavuError(f"the evaluation corpus has {num_tokens} tokens; need at least 2")
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        new = end - prev_end  # tokens not scored by an earlier window
        # Label j is predicted by logit j-1; labels before the new ones are context only.
        windows.append(Window(begin, end, max(end - begin - new - 1, 0)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def eval_tokens(tokenizer, dataset: str, max_tokens: int, text_field: str = "text",
                split: str = "test") -> torch.Tensor:
    """The first `max_tokens` tokens of the evaluation corpus (one stream)."""
    from dejavu.corpus import load_texts, tokenize_stream

    if max_tokens < 2:
        raise DejavuError(f"--max-eval-tokens must be at least 2, got {max_tokens}")
    texts = load_texts(dataset, split=split, text_field=text_field)
    # Tokenising a whole corpus to keep a few thousand tokens wastes time: cut generously first.
    budget, cut = max_tokens * 16, []
    for text in texts:
        cut.append(text[:budget])
        budget -= len(cut[-1])
        if budget <= 0:
            break
    return tokenize_stream(cut, tokenizer, f"evaluation corpus {dataset}")[:max_tokens]


def model_context(model) -> int:
    cfg = getattr(model.config, "text_config", None) or model.config  # multimodal models nest it (Gemma 3)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if value:
            return int(value)
    return 2048


@dataclass
class Totals:
    tokens: int = 0
    dense_nll: float = 0.0
    sparse_nll: float = 0.0
    agree: int = 0
    kl: float = 0.0

    def add(self, dense_lp: torch.Tensor, sparse_logits: torch.Tensor, targets: torch.Tensor) -> None:
        sparse_lp = torch.log_softmax(sparse_logits.float(), dim=-1)
        dense_lp = dense_lp.float()
        self.tokens += targets.numel()
        self.dense_nll += -dense_lp.gather(-1, targets[:, None]).sum().item()
        self.sparse_nll += -sparse_lp.gather(-1, targets[:, None]).sum().item()
        self.agree += (dense_lp.argmax(-1) == sparse_lp.argmax(-1)).sum().item()
        self.kl += (dense_lp.exp() * (dense_lp - sparse_lp)).sum().item()

    def report(self) -> dict:
        n = max(self.tokens, 1)
        return {
            "dense_ppl": math.exp(self.dense_nll / n),
            "sparse_ppl": math.exp(self.sparse_nll / n),
            "top1_agreement": self.agree / n,
            "kl": self.kl / n,
            "scored_tokens": self.tokens,
        }


@dataclass
class DenseReference:
    """Dense log-probs at the scored positions of every window, computed once and reused (the grid)."""

    tokens: torch.Tensor
    windows: list[Window]
    log_probs: list[torch.Tensor] = field(default_factory=list)  # float16 on CPU: [scored, vocab]


def _window_logits(model, tokens: torch.Tensor, w: Window) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = tokens[w.begin:w.end].unsqueeze(0).to(device)
    logits = model(input_ids=ids, use_cache=False).logits[0]
    return logits[w.first_scored:ids.shape[1] - 1]


def _targets(tokens: torch.Tensor, w: Window, device) -> torch.Tensor:
    return tokens[w.begin + w.first_scored + 1:w.end].to(device)


@torch.no_grad()
def dense_reference(model, tokens: torch.Tensor, window: int, stride: int, desc: str = "dense") -> DenseReference:
    ref = DenseReference(tokens, strided_windows(tokens.numel(), window, stride))
    for w in tqdm(ref.windows, desc=desc, unit="window", leave=False):
        ref.log_probs.append(torch.log_softmax(_window_logits(model, tokens, w).float(), -1).half().cpu())
    return ref


def reference_ppl(ref: DenseReference) -> dict:
    """Dense perplexity straight from the stored log-probs (no forward pass)."""
    nll, n = 0.0, 0
    for w, lp in zip(ref.windows, ref.log_probs, strict=True):
        targets = _targets(ref.tokens, w, lp.device)
        nll -= lp.float().gather(-1, targets[:, None]).sum().item()
        n += targets.numel()
    return {"dense_ppl": math.exp(nll / max(n, 1)), "scored_tokens": n}


@torch.no_grad()
def score_against(model, runtime, ref: DenseReference, desc: str = "sparse") -> dict:
    """Metrics of `model` as hooked by `runtime` (every token sparse) against a stored dense reference."""
    totals = Totals()
    runtime.enabled, runtime.token_mask = True, None
    for w, dense_lp in tqdm(list(zip(ref.windows, ref.log_probs, strict=True)), desc=desc, unit="window", leave=False):
        logits = _window_logits(model, ref.tokens, w)
        totals.add(dense_lp.to(logits.device), logits, _targets(ref.tokens, w, logits.device))
    return totals.report()


@torch.no_grad()
def compare(model, runtime, tokens: torch.Tensor, window: int, stride: int) -> dict:
    """Dense and sparse over the same windows, one window at a time (no stored reference)."""
    totals = Totals()
    windows = strided_windows(tokens.numel(), window, stride)
    runtime.token_mask = None
    try:
        for w in tqdm(windows, desc="perplexity (dense + sparse)", unit="window", leave=False):
            runtime.enabled = False
            dense_lp = torch.log_softmax(_window_logits(model, tokens, w).float(), -1)
            runtime.enabled = True
            logits = _window_logits(model, tokens, w)
            totals.add(dense_lp, logits, _targets(tokens, w, logits.device))
    finally:
        runtime.enabled = True
    return {**totals.report(), "windows": len(windows)}


def greedy_generate(model, tokenizer, prompt: str, new_tokens: int, runtime=None, sparse_prefill: bool = False) -> str:
    """Greedy decode with a KV cache. With a runtime: the prompt runs dense unless sparse_prefill,
    every generated token runs sparse; without one, everything is dense."""
    from dejavu.runtime.generate import hooks_decode

    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    (tokens,), _, _ = hooks_decode(model, ids, new_tokens, runtime=runtime, sparse_prefill=sparse_prefill, eos=eos)
    return tokenizer.decode(tokens, skip_special_tokens=True)


def generations(model, tokenizer, runtime, new_tokens: int = 24, sparse_prefill: bool = False,
                prompts: tuple[str, ...] = PROMPTS) -> list[dict]:
    rows = []
    for prompt in prompts:
        runtime.enabled = False
        dense = greedy_generate(model, tokenizer, prompt, new_tokens, None)
        runtime.enabled = True
        sparse = greedy_generate(model, tokenizer, prompt, new_tokens, runtime, sparse_prefill)
        rows.append({"prompt": prompt, "dense": dense, "sparse": sparse})
    return rows


def default_eval_dataset() -> str | None:
    """../shared/data/wikitext-2-raw/wiki.test.raw next to the repository, when it is there."""
    from dejavu.config import beside_repository

    candidate = beside_repository("../shared/data/wikitext-2-raw/wiki.test.raw")
    return str(candidate) if candidate.is_file() else None
