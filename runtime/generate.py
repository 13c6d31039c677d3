"""Text generation with a bundle applied: what `dejavu generate` and the Python API (`load_sparse`) run.

Two engines, one interface:
- "decode-loop" (Llama family: runtime/decode.py): the static-KV-cache loop `dejavu bench` times, a
  CUDA graph per step on the GPU and the PyTorch fallback on the CPU; the kernels read only the
  selected rows.
- "hooks" (every family the adapters know: runtime/apply.py): Hugging Face's forward with the reference
  runtime's hooks, computing only the selected rows ("gather") where the rule allows it, else masking.

As in `dejavu bench`, the prompt is prefilled dense and every generated token is computed sparse (with
`runtime.sparse_prefill` the hooks engine runs the prompt sparse too). Greedy by default; a temperature
samples, within a top-p nucleus, from a seeded generator, so a run can be repeated.

    from dejavu.runtime import load_sparse
    sm = load_sparse("smollm2-135m", bundle="runs/smol/bundle")
    print(sm.generate("The capital of France is", max_new_tokens=32).text)
"""

from __future__ import annotations

import inspect
import numbers
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dejavu.errors import DejavuError
from dejavu.models.loading import dtype_name
from dejavu.runtime.speed import sync_device

ENGINES = ("auto", "decode-loop", "hooks")
# the decode loop reads its tokens on the host (to stop at an end-of-sequence token, or to stream them) every
# this many steps: each read waits for the GPU, which would otherwise run graph replays back to back (steps
# past an end-of-sequence token are dropped)
EOS_CHECK_EVERY = 16


@dataclass
class Generation:
    prompt: str
    text: str  # the generated continuation, special tokens removed
    token_ids: list[int]  # generated ids, the end-of-sequence token included when it stopped there
    sparse: bool
    engine: str  # decode-loop or hooks, and how it ran (CUDA graph / eager, gather / mask)
    prompt_tokens: int
    prefill_ms: float
    ms_per_token: float | None  # decode steps after the first generated token; None below 2 tokens
    stopped_at_eos: bool
    batch_size: int = 1  # prompts generated together; prefill_ms and ms_per_token are the whole batch's steps

    def to_dict(self) -> dict:
        return asdict(self)


class Sampler:
    """Greedy at temperature 0; otherwise sampling from softmax(logits / temperature) restricted to the
    smallest set of tokens whose probability reaches top_p, drawn from a generator seeded once."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise DejavuError(f"{name} must be a number, got {value!r}")
        if not temperature >= 0.0 or temperature == float("inf"):
            raise DejavuError(f"temperature must be a finite number >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise DejavuError(f"top_p must be in (0, 1], got {top_p}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise DejavuError(f"seed must be an integer, got {seed!r}")
        if not -2 ** 63 <= seed < 2 ** 64:  # what torch.Generator.manual_seed takes
            raise DejavuError(f"seed must be between -2**63 and 2**64 - 1, got {seed}")
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self._generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        # below the smallest normal float32 the division by the temperature is 0 / 0 for the top logit: greedy is
        # what such a temperature means
        return self.temperature < torch.finfo(torch.float32).tiny

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V] logits -> [B] token ids, without a host synchronisation."""
        if self.greedy:
            return logits.argmax(-1)
        if self._generator is None or self._generator.device != logits.device:
            self._generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        # the largest logit at 0 first: a tiny temperature then sends the others to -inf, not inf - inf = NaN
        logits = logits.float()
        probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # keep a token while the mass before it is below top_p (the first token always stays)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            pick = torch.multinomial(sorted_probs, 1, generator=self._generator)
            return order.gather(-1, pick).squeeze(-1)
        return torch.multinomial(probs, 1, generator=self._generator).squeeze(-1)


def cut_at_eos(ids: list[int], eos) -> tuple[list[int], bool]:
    """ids up to and including the first end-of-sequence token, and whether there was one."""
    stop = next((i for i, t in enumerate(ids) if t in eos), None)
    return (ids, False) if stop is None else (ids[:stop + 1], True)


class _Reporter:
    """Told each sequence's ids so far: hands the first sequence's, cut after its end-of-sequence token, to a
    caller's callback (streaming: one prompt at a time), and returns whether every sequence has reached an
    end-of-sequence token."""

    def __init__(self, callback: Callable[[list[int]], None] | None, eos: set[int]):
        self.callback, self.eos, self.sent = callback, eos, 0

    @property
    def wanted(self) -> bool:
        return self.callback is not None

    def __call__(self, rows: list[list[int]]) -> bool:
        cut = [cut_at_eos(ids, self.eos) for ids in rows]
        first = cut[0][0]
        if self.callback is not None and len(first) > self.sent:
            self.sent = len(first)
            self.callback(first)
        return all(stopped for _, stopped in cut)


def _takes_position_ids(model) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


@torch.no_grad()
def hooks_decode(model, ids: torch.Tensor, max_new: int, *, attention_mask: torch.Tensor | None = None,
                 runtime=None, sparse: bool = True, sparse_prefill: bool = False, sampler: Sampler | None = None,
                 eos: set[int] = frozenset(), report: _Reporter | None = None
                 ) -> tuple[list[list[int]], float, float | None]:
    """Hugging Face's forward with its KV cache, one token per sequence a step, up to max_new tokens or
    until every sequence has produced an end-of-sequence token. ids [B, P]; attention_mask [B, P] (1 for
    tokens, 0 for the left padding of shorter prompts; None: no padding). With a runtime (the reference
    hooks) and `sparse`, the prompt runs sparse only with sparse_prefill and every new token sparse; the
    runtime's enabled flag is restored after. Returns (each sequence's ids, prefill ms, ms per later
    step or None)."""
    sampler = sampler or Sampler()
    report = report or _Reporter(None, eos)
    device = ids.device
    extra: dict = {}
    positions = None
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        extra["attention_mask"] = attention_mask
        if _takes_position_ids(model):
            # each sequence's own positions, from 0 at its first token, as Hugging Face's generate sets them
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            extra["position_ids"] = positions
    was_enabled = runtime.enabled if runtime is not None else None
    if runtime is not None:
        runtime.token_mask = None
    try:
        if runtime is not None:
            runtime.enabled = sparse and sparse_prefill
        sync_device(device)
        t0 = time.perf_counter()
        result = model(input_ids=ids, use_cache=True, **extra)
        nxt = sampler(result.logits[:, -1])
        sync_device(device)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        rows, past = [[t] for t in nxt.tolist()], result.past_key_values
        done = report(rows)
        if runtime is not None:
            runtime.enabled = sparse
        t0 = time.perf_counter()
        while len(rows[0]) < max_new and not (eos and done):
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
                extra["attention_mask"] = attention_mask
                if positions is not None:
                    positions = positions[:, -1:] + 1
                    extra["position_ids"] = positions
            result = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True, **extra)
            past, nxt = result.past_key_values, sampler(result.logits[:, -1])
            for row, t in zip(rows, nxt.tolist(), strict=True):  # the host reads each token (HF's loop does too)
                row.append(t)
            done = report(rows)
        steps = len(rows[0]) - 1
        decode_ms = (time.perf_counter() - t0) * 1e3 / steps if steps else None
    finally:
        if runtime is not None:
            runtime.enabled = was_enabled
    return rows, prefill_ms, decode_ms


def loop_length(prompt_len: int, max_new: int, graphed: bool) -> int:
    """Cache positions the decode loop needs: the prompt and every new token but the last (sampled, never
    cached), and with a CUDA graph at least the two positions its warm-up steps write past the prompt (no
    graph is built for a single new token). No more: a model with learned positions (GPT-2, OPT) has no
    embedding past its context, so a prompt and new tokens that fill the context exactly must fit."""
    return prompt_len + max(max_new - 1, 2 if graphed and max_new > 1 else 1)


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise DejavuError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")


class SparseModel:
    """A loaded model with a resolved sparse plan (runtime/plan.py); `generate` runs it."""

    def __init__(self, model, tokenizer, adapter, plan, *, device, dtype, name: str, engine: str = "auto",
                 sparse_prefill: bool = False):
        from dejavu.runtime.decode import SUPPORTED_MODEL_TYPES

        check_engine(engine)
        self.model, self.tokenizer, self.adapter, self.plan = model, tokenizer, adapter, plan
        self.device, self.dtype, self.name = torch.device(device), dtype, name
        self.sparse_prefill = sparse_prefill
        model_type = getattr(model.config, "model_type", "")
        loop_ok = model_type in SUPPORTED_MODEL_TYPES and plan.decode_loop_note is None and not sparse_prefill
        if engine == "decode-loop" and not loop_ok:
            if model_type not in SUPPORTED_MODEL_TYPES or plan.decode_loop_note is None:
                why = f"the decode loop does not run {model_type!r} models" if model_type not in \
                    SUPPORTED_MODEL_TYPES else "the decode loop does not run sparse prefill"
            else:
                why = plan.decode_loop_note
            raise DejavuError(f"{why}; use engine 'hooks' (or 'auto')")
        self.engine = engine if engine != "auto" else ("decode-loop" if loop_ok else "hooks")
        self._auto = engine == "auto"
        self._loop = None  # DecodeModel, built on first use, rebuilt when a longer cache is needed
        self._loop_len = 0
        self._loop_states: dict[bool, tuple] = {}  # sparse flag -> (DecodeState, step callable)
        self._hooks = None  # SparseRuntime, installed on first use
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None) if gen is not None else None
        if extra is not None:
            ids.update(int(i) for i in (extra if isinstance(extra, (list, tuple)) else [extra]))
        return ids

    @property
    def engine_detail(self) -> str:
        if self.engine == "decode-loop":
            return "decode-loop (CUDA graph)" if self.device.type == "cuda" else "decode-loop (eager)"
        return f"hooks ({self.hooks_mode})"

    @property
    def hooks_mode(self) -> str:
        # gather computes only the selected rows; the oracle, exact-up and thresholds need mask mode
        p = self.plan
        gather = p.selection == "predictor" and p.mlp_up_weight is None and p.thresholds is None
        return "gather" if gather else "mask"

    # --- prompts --------------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False) -> torch.Tensor:
        """[1, P] token ids of the prompt, through the tokenizer's chat template when chat."""
        tok = self.tokenizer
        if chat:
            if not getattr(tok, "chat_template", None):
                raise DejavuError(f"the tokenizer of {self.name} has no chat template: drop --chat")
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt)["input_ids"]
        if not ids:
            if tok.bos_token_id is None:
                raise DejavuError("the prompt is empty and the tokenizer has no start token to begin from")
            ids = [tok.bos_token_id]
        return torch.tensor([ids], dtype=torch.long)

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0  # nothing attends to padding: any id in the vocabulary will do

    @staticmethod
    def padding_mask(width: int, lengths: torch.Tensor) -> torch.Tensor:
        """[B, width] attention mask of left-padded prompts: 1 for their tokens, 0 for the padding."""
        return (torch.arange(width)[None] >= (width - lengths)[:, None]).long()

    def encode_batch(self, prompts: list[str], chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, P] ids of the prompts, left-padded to the longest, and [B] their lengths."""
        rows = [self.encode(p, chat)[0] for p in prompts]
        lengths = torch.tensor([r.numel() for r in rows])
        ids = torch.full((len(rows), int(lengths.max())), self._pad_id(), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, ids.shape[1] - r.numel():] = r
        return ids, lengths

    # --- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 64, *, sparse: bool = True, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, chat: bool = False, stop_at_eos: bool = True,
                 on_tokens: Callable[[list[int]], None] | None = None) -> Generation:
        """Continue `prompt` by up to max_new_tokens tokens; sparse=False runs the same engine dense.

        on_tokens: called with the ids generated so far (end-of-sequence token included) whenever more
        reach the host, every token with the hooks and every EOS_CHECK_EVERY tokens in the decode loop."""
        if not isinstance(prompt, str):
            raise DejavuError(f"generate() takes one prompt, a str, not {type(prompt).__name__}; "
                              "generate_batch() takes a list of them")
        return self._generate([prompt], max_new_tokens, sparse, temperature, top_p, seed, chat, stop_at_eos,
                              on_tokens)[0]

    @torch.no_grad()
    def generate_batch(self, prompts: list[str], max_new_tokens: int = 64, *, sparse: bool = True,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, chat: bool = False,
                       stop_at_eos: bool = True) -> list[Generation]:
        """Continue several prompts together, one batch: the prompts are left-padded to the longest and
        each step computes one token of every sequence. Runs until every sequence has reached an
        end-of-sequence token or max_new_tokens; each Generation is cut at its own.

        Dense, the greedy tokens equal generate()'s one prompt at a time (to rounding). Sparse, the hooks
        keep each token's own selection (so the same tokens again), while the decode loop's predictors pick
        one set of neurons and heads for the whole batch, the top-k of its scores (MLP score thresholds apply
        at batch 1 only; down thresholds per sequence), as `dejavu bench` times it at batch > 1. Sampled tokens come from one generator
        for the whole batch."""
        if isinstance(prompts, str):
            raise DejavuError("generate_batch() takes a list of str prompts; for one prompt, use generate()")
        prompts = list(prompts)  # once: a generator checked item by item would be used up
        if not all(isinstance(p, str) for p in prompts):
            raise DejavuError("generate_batch() takes a list of str prompts")
        if not prompts:
            raise DejavuError("no prompts to generate from")
        return self._generate(prompts, max_new_tokens, sparse, temperature, top_p, seed, chat, stop_at_eos, None)

    def _generate(self, prompts, max_new_tokens, sparse, temperature, top_p, seed, chat, stop_at_eos,
                  on_tokens) -> list[Generation]:
        from dejavu.runtime.quality import model_context

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise DejavuError(f"max_new_tokens must be an integer of at least 1, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)  # (a numpy integer too)
        sampler = Sampler(temperature, top_p, seed)
        if len(prompts) == 1:
            ids, lengths = self.encode(prompts[0], chat), None
        else:
            ids, lengths = self.encode_batch(prompts, chat)
        context = model_context(self.model)
        if ids.shape[1] + max_new_tokens > context:
            raise DejavuError(f"the prompt ({ids.shape[1]} tokens) and {max_new_tokens} new tokens exceed "
                              f"{self.name}'s context of {context} tokens")
        eos = self.eos_ids if stop_at_eos else set()
        sparse = sparse and self.plan.sparse
        needed = loop_length(ids.shape[1], max_new_tokens, self.device.type == "cuda")
        if self.engine == "decode-loop" and self._auto and (self._loop is None or needed > self._loop_len):
            try:  # (a longer cache than before rebuilds the loop: the same check then)
                self._loop_state(needed, sparse, ids.shape[0])
            except DejavuError as exc:  # a layout the loop does not take (biases, an ungated MLP)
                print(f"  note: {exc}; generating with the hooks instead", flush=True)
                self.engine = "hooks"
                self._loop, self._loop_states = None, {}  # (a shorter cache built for an earlier call, unused now)
        run = self._loop_generate if self.engine == "decode-loop" else self._hooks_generate
        rows, prefill_ms, decode_ms = run(ids, lengths, max_new_tokens, sparse, sampler, eos,
                                          _Reporter(on_tokens, eos))
        out = []
        for i, (prompt, tokens) in enumerate(zip(prompts, rows, strict=True)):
            tokens, stopped = cut_at_eos(tokens, eos)
            out.append(Generation(
                prompt=prompt, text=self.tokenizer.decode(tokens, skip_special_tokens=True), token_ids=tokens,
                sparse=sparse, engine=self.engine_detail,
                prompt_tokens=int(lengths[i]) if lengths is not None else int(ids.shape[1]),
                prefill_ms=prefill_ms, ms_per_token=decode_ms, stopped_at_eos=stopped, batch_size=len(prompts)))
        return out

    def _loop_state(self, needed_len: int, sparse: bool, batch: int = 1):
        if self._loop is None or needed_len > self._loop_len:
            # a longer cache than any before: rebuild (rope tables and caches are sized by max_len)
            self._loop = self.plan.decode_model(self.model, self.adapter, self.device, self.dtype, needed_len)
            self._loop_len, self._loop_states = needed_len, {}
        key = (sparse, batch)
        if key not in self._loop_states:
            # several prompts may differ in length: their state holds each sequence's first position
            self._loop_states[key] = (self._loop.new_state(batch, dense_only=not sparse, padded=batch > 1), None)
        return self._loop_states[key]

    def _loop_generate(self, ids, lengths, max_new, sparse, sampler, eos, report: _Reporter):
        from dejavu.runtime.decode import GraphedStep

        batch = ids.shape[0]
        st, step = self._loop_state(loop_length(ids.shape[1], max_new, self.device.type == "cuda"), sparse, batch)
        dm = self._loop
        sync_device(self.device)
        t0 = time.perf_counter()
        logits = dm.prefill(st, ids, lengths)
        st.tokens.copy_(sampler(logits))
        sync_device(self.device)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        if step is None and max_new > 1:  # (one new token comes from the prefill: no step, no graph)
            if self.device.type == "cuda":
                step = GraphedStep(dm, st, sparse)  # restores the position and tokens it warmed up from
            else:
                def step(st=st, sparse=sparse):
                    return dm.step(st, sparse)
            self._loop_states[(sparse, batch)] = (st, step)
        out = torch.empty(max_new, batch, dtype=torch.long, device=self.device)
        out[0] = st.tokens
        n = 1
        if eos and report(out[:1].T.tolist()):
            return out[:1].T.tolist(), prefill_ms, None
        sync_device(self.device)
        t0 = time.perf_counter()
        while n < max_new:
            logits = step()  # writes its argmax into st.tokens
            if not sampler.greedy:
                st.tokens.copy_(sampler(logits))
            out[n] = st.tokens
            n += 1
            if (eos or report.wanted) and (n % EOS_CHECK_EVERY == 0 or n == max_new) and report(out[:n].T.tolist()):
                break
        sync_device(self.device)
        decode_ms = (time.perf_counter() - t0) * 1e3 / (n - 1) if n > 1 else None
        return out[:n].T.tolist(), prefill_ms, decode_ms

    def _hooks_generate(self, ids, lengths, max_new, sparse, sampler, eos, report: _Reporter):
        if self._hooks is None:
            self._hooks = self.plan.hooks(self.model, self.adapter, mode=self.hooks_mode)
            self._hooks.enabled = False  # between calls the model is the user's, and dense
        mask = self.padding_mask(ids.shape[1], lengths) if lengths is not None else None
        return hooks_decode(self.model, ids.to(self.device), max_new, attention_mask=mask, runtime=self._hooks,
                            sparse=sparse, sparse_prefill=self.sparse_prefill, sampler=sampler, eos=eos, report=report)

    def close(self) -> None:
        """Remove the hooks from the model (the decode loop holds its own copies of the weights)."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        self._loop, self._loop_states = None, {}

    def __enter__(self) -> SparseModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {"model": self.name, "device": str(self.device), "dtype": dtype_name(self.dtype),
                "engine": self.engine_detail, **self.plan.description}


def load_sparse(model: str | None = None, bundle: str | Path | None = None, *, config: str | None = None,
                engine: str = "auto", **runtime) -> SparseModel:
    """Load `model` (default: the bundle's) with `bundle` applied, ready to generate.

    runtime: any key of the config's `runtime` section (device, dtype, selection, mlp_density,
    head_density, mlp_keep_input, ...), over `config` (a YAML path or a name in configs/) and the
    bundle's own settings, as the CLI's flags are."""
    from dejavu.config import load_config

    cfg = load_config(config, {f"runtime.{k}": v for k, v in runtime.items()})
    return load_with_config(model, Path(bundle) if bundle is not None else None, cfg, engine)


def load_with_config(model: str | None, bundle: Path | None, cfg, engine: str = "auto") -> SparseModel:
    from dejavu.models.adapters import adapter_for
    from dejavu.models.loading import load_model, resolve_device, resolve_dtype
    from dejavu.runtime.plan import check_flags, model_to_load, read_bundle, resolve_plan, revision_to_load

    rt = cfg.runtime
    check_engine(engine)  # before the model loads
    manifest, predictors = read_bundle(bundle)
    check_flags(cfg, predictors, "generate")
    device = resolve_device(rt.device if rt.device != "auto" else cfg.model.device)
    dtype = resolve_dtype(rt.dtype if rt.dtype != "auto" else cfg.model.dtype, device)
    hf_model, tokenizer, source = load_model(model_to_load(model, manifest, cfg), device=str(device),
                                             dtype=dtype_name(dtype), revision=revision_to_load(model, manifest, cfg),
                                             trust_remote_code=cfg.model.trust_remote_code)
    adapter = adapter_for(hf_model)
    plan = resolve_plan(cfg, manifest, predictors, hf_model, adapter, tokenizer, bundle)
    return SparseModel(hf_model, tokenizer, adapter, plan, device=device, dtype=dtype, name=source.display,
                       engine=engine, sparse_prefill=rt.sparse_prefill)


class _TextStream:
    """Prints a generation's text as its ids arrive (an on_tokens callback)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.printed = tokenizer, ""

    def __call__(self, ids: list[int]) -> None:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # the ids end inside a character: print it once the rest arrives (or at finish)
        self._print_beyond(text)

    def finish(self, text: str) -> None:
        """The generation's final text: whatever the last callbacks held back (a character cut at the end)."""
        self._print_beyond(text)

    def _print_beyond(self, text: str) -> None:
        # decoding more ids can change the last characters (merged pieces); printed text stays, so the rare
        # change shows as a repeated piece, never as lost text
        print(text[len(os.path.commonprefix([self.printed, text])):], end="", flush=True)
        self.printed = text


def _speed(g: Generation) -> str:
    n = len(g.token_ids)
    step = "ms/token" if g.batch_size == 1 else f"ms/step of {g.batch_size}"
    per = f", {g.ms_per_token:.2f} {step}" if g.ms_per_token is not None else ""
    return f"{n} token{'s' if n != 1 else ''}{per}{', stopped at end of sequence' if g.stopped_at_eos else ''}"


def read_prompt_file(path: Path) -> list[str]:
    """Prompts, one per line of a text file ('-': standard input); blank lines are skipped."""
    import sys

    if str(path) == "-":
        text = sys.stdin.read()
    else:
        path = Path(path)
        if path.is_dir():
            raise DejavuError(f"--prompt-file {path} is a directory: give a text file of prompts, one per line")
        if not path.is_file():
            raise DejavuError(f"no prompt file at {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DejavuError(f"{path} is not UTF-8 text ({exc})") from exc
    prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise DejavuError(f"{path} holds no prompts (one per line)")
    return prompts


def run_generate(prompts: list[str], *, prompt_file: Path | None = None, model: str | None = None,
                 bundle: Path | None = None, config_file=None,
                 json_out: Path | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, chat: bool = False, compare_dense: bool = False,
                 engine: str = "auto", overrides: dict | None = None, stream: bool | None = None,
                 batch_size: int = 1) -> dict:
    """`dejavu generate`: the prompts (then prompt_file's lines, '-' for standard input) continued sparse
    (and dense with compare_dense), batch_size prompts at a time, printed and returned.

    stream: print the text as it is generated (default: when stdout is a terminal; one prompt at a time)."""
    import sys

    from dejavu.config import load_config
    from dejavu.runtime.bench import rule_lines

    cfg = load_config(config_file, overrides or {})
    if json_out is not None:  # checked before the model loads
        from dejavu.artifacts import check_report_path
        from dejavu.config import report_inputs

        inputs = report_inputs(config_file, cfg, bundle, model, prompt_file if str(prompt_file) != "-" else None)
        check_report_path(json_out, inputs=inputs)
    prompts = list(prompts) + (read_prompt_file(prompt_file) if prompt_file is not None else [])
    if not prompts:
        raise DejavuError("give a prompt: --prompt TEXT (repeatable) or --prompt-file FILE")
    if max_new_tokens < 1:
        raise DejavuError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise DejavuError(f"--batch-size must be at least 1, got {batch_size}")
    if stream and batch_size > 1:
        raise DejavuError("--stream prints one generation as it runs: use --batch-size 1, or --no-stream")
    Sampler(temperature, top_p, seed)  # its checks, before the model loads
    sm = load_with_config(model, bundle, cfg, engine)
    report = {**sm.describe(), "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
              "seed": seed, "chat": chat, "batch_size": batch_size, "sparse_tokens": "the generated tokens (prompt dense)"
              if not cfg.runtime.sparse_prefill else "prompt and generated tokens", "generations": []}
    print(f"dejavu generate: {report['model']} on {report['device']} ({report['dtype']}), engine {report['engine']}")
    for line in rule_lines(report):
        print(line)
    if batch_size > 1 and len(prompts) > 1:
        scored = sm.plan.mlp_score_thresholds is not None
        cut = sm.plan.mlp_down_thresholds is not None
        parts = []
        if sm.plan.predictors is not None:
            parts.append("predicted neurons and heads: one set for the whole batch"
                         + (" (MLP score thresholds apply at batch 1: here the batch's top-k of its scores"
                            + ("; down thresholds: each prompt's own" if cut else "") + ")" if scored else ""))
        if sm.plan.thresholds is not None:
            parts.append("magnitude thresholds: each prompt's own")
        shared = ("; ".join(parts) or "no predictors or thresholds: every neuron and head") \
            if sm.engine == "decode-loop" else "each prompt keeps its own selection"
        print(f"  batches of up to {batch_size} prompts ({shared})")
    stream = sys.stdout.isatty() and batch_size == 1 if stream is None else stream
    label = "sparse" if sm.plan.sparse else "dense (the rule computes everything)"
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, chat=chat)
    modes = ((label, True), ("dense", False))[:2 if compare_dense else 1]
    with sm:
        for first in range(0, len(prompts), batch_size):
            group = prompts[first:first + batch_size]
            runs: dict[bool, list[Generation]] = {}
            if stream:
                print(f"\nprompt: {group[0]}")
            for name, sparse_run in modes:
                if stream:
                    print(f"{name}: ", end="", flush=True)
                    streamed = _TextStream(sm.tokenizer)
                    g = sm.generate(group[0], sparse=sparse_run, on_tokens=streamed, **kwargs)
                    streamed.finish(g.text)
                    print(f"\n  ({_speed(g)})")
                    runs[sparse_run] = [g]
                elif len(group) == 1:
                    runs[sparse_run] = [sm.generate(group[0], sparse=sparse_run, **kwargs)]
                else:
                    runs[sparse_run] = sm.generate_batch(group, sparse=sparse_run, **kwargs)
            if not stream:
                for i, prompt in enumerate(group):
                    print(f"\nprompt: {prompt}")
                    for name, sparse_run in modes:
                        g = runs[sparse_run][i]
                        print(f"{name} ({_speed(g)}): {g.text}")
            for i in range(len(group)):
                dense = runs[False][i] if False in runs else None
                report["generations"].append({"sparse": runs[True][i].to_dict(),
                                              "dense": dense.to_dict() if dense is not None else None})
    report["engine"] = sm.engine_detail  # auto may have fallen back to the hooks on the first call
    if json_out is not None:
        from dejavu.artifacts import atomic_write_json

        atomic_write_json(json_out, report)
        print(f"\n  JSON: {json_out}")
    return report
