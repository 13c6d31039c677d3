"""Generation with a bundle applied (runtime/generate.py): both engines, sampling, stops, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dejavu.config import load_config
from dejavu.errors import DejavuError
from dejavu.models.adapters import adapter_for
from dejavu.predictor import PredictorSet
from dejavu.runtime.generate import Sampler, SparseModel
from dejavu.runtime.plan import resolve_plan

PROMPT = "The history of the city"


def _sparse_model(path, selection="predictor", mlp_density=0.5, head_density=0.5, engine="auto", **runtime):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    adapter = adapter_for(model)
    s = adapter.shape()
    preds = PredictorSet.random(adapter.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, 8,
                                mlp_density, head_density, seed=0)
    cfg = load_config("tiny", {"runtime.selection": selection, **{f"runtime.{k}": v for k, v in runtime.items()}})
    plan = resolve_plan(cfg, None, preds, model, adapter, tokenizer)
    return SparseModel(model, tokenizer, adapter, plan, device="cpu", dtype=torch.float32, name=str(path),
                       engine=engine, sparse_prefill=cfg.runtime.sparse_prefill)


def _hf_greedy(sm: SparseModel, prompt: str, new_tokens: int) -> list[int]:
    ids = sm.encode(prompt)
    with torch.no_grad():
        out = sm.model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("engine", ["decode-loop", "hooks"])
def test_dense_generation_equals_hugging_face_greedy(tiny_llama, engine):
    sm = _sparse_model(tiny_llama, engine=engine)
    g = sm.generate(PROMPT, max_new_tokens=12, sparse=False, stop_at_eos=False)
    assert g.token_ids == _hf_greedy(sm, PROMPT, 12)
    assert not g.sparse and g.engine.startswith(engine) and len(g.token_ids) == 12


def test_both_engines_generate_the_same_sparse_tokens(tiny_llama):
    loop = _sparse_model(tiny_llama, engine="decode-loop").generate(PROMPT, max_new_tokens=12, stop_at_eos=False)
    hooks = _sparse_model(tiny_llama, engine="hooks")
    assert hooks.hooks_mode == "gather"  # the hooks compute only the selected rows
    g = hooks.generate(PROMPT, max_new_tokens=12, stop_at_eos=False)
    assert loop.sparse and g.sparse and loop.token_ids == g.token_ids
    # random predictors at half density change the continuation: the tokens really ran sparse
    assert g.token_ids != hooks.generate(PROMPT, max_new_tokens=12, sparse=False, stop_at_eos=False).token_ids


def _without_loop(monkeypatch, model_type: str) -> None:
    """As if `model_type` were a family an adapter added without teaching the decode loop (every family the
    adapters ship runs in the loop)."""
    from dejavu.runtime import decode

    monkeypatch.setattr(decode, "SUPPORTED_MODEL_TYPES",
                        tuple(t for t in decode.SUPPORTED_MODEL_TYPES if t != model_type))


def test_density_one_generates_dense_tokens(tiny_model_factory, monkeypatch):
    # auto picks the loop where it runs the family, else the hooks; both give HF's greedy tokens
    for model_type, engine in (("gpt_neox", "decode-loop"), ("gpt2", "decode-loop"), ("olmo", "decode-loop"),
                               ("gpt_neox", "hooks")):
        if engine == "hooks":
            _without_loop(monkeypatch, model_type)
        sm = _sparse_model(tiny_model_factory(model_type), mlp_density=1.0, head_density=1.0)
        assert sm.engine == engine
        assert sm.generate(PROMPT, 10, stop_at_eos=False).token_ids == _hf_greedy(sm, PROMPT, 10)


def test_sampling_repeats_with_its_seed_and_top_p_near_zero_is_greedy(tiny_llama):
    sm = _sparse_model(tiny_llama)
    a = sm.generate(PROMPT, 16, temperature=1.5, seed=3, stop_at_eos=False)
    b = sm.generate(PROMPT, 16, temperature=1.5, seed=3, stop_at_eos=False)
    c = sm.generate(PROMPT, 16, temperature=1.5, seed=4, stop_at_eos=False)
    greedy = sm.generate(PROMPT, 16, stop_at_eos=False)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids and a.token_ids != greedy.token_ids
    assert sm.generate(PROMPT, 16, temperature=1.5, top_p=1e-6, stop_at_eos=False).token_ids == greedy.token_ids
    # a temperature so small that logits / temperature overflow is still greedy, not NaN probabilities
    for tiny in (1e-37, 1e-40, 1e-46, 5e-324):  # (below float32's smallest normal number: greedy)
        assert sm.generate(PROMPT, 16, temperature=tiny, stop_at_eos=False).token_ids == greedy.token_ids


def test_a_seed_outside_what_torch_takes_is_refused_up_front():
    Sampler(1.0, seed=-2 ** 63), Sampler(1.0, seed=2 ** 64 - 1)
    for seed in (2 ** 64, -2 ** 63 - 1):
        with pytest.raises(DejavuError, match=r"seed must be between -2\*\*63 and 2\*\*64 - 1"):
            Sampler(1.0, seed=seed)


@pytest.mark.parametrize("engine", ["decode-loop", "hooks"])
def test_generation_stops_at_the_end_of_sequence_token(tiny_llama, engine):
    sm = _sparse_model(tiny_llama, engine=engine)
    full = sm.generate(PROMPT, 20, stop_at_eos=False).token_ids
    stop = full[5]
    sm.eos_ids = {stop}
    g = sm.generate(PROMPT, 20)
    assert g.stopped_at_eos and g.token_ids == full[:full.index(stop) + 1]


def test_a_longer_request_after_a_shorter_one_rebuilds_the_cache(tiny_llama):
    sm = _sparse_model(tiny_llama, engine="decode-loop")
    short = sm.generate(PROMPT, 4, stop_at_eos=False).token_ids
    longer = sm.generate(PROMPT, 30, stop_at_eos=False).token_ids
    assert longer[:4] == short and len(longer) == 30


def test_refusals(tiny_llama, tiny_model_factory, monkeypatch):
    _without_loop(monkeypatch, "gpt_neox")
    with pytest.raises(DejavuError, match="decode loop does not run 'gpt_neox'"):
        _sparse_model(tiny_model_factory("gpt_neox"), engine="decode-loop")
    with pytest.raises(DejavuError, match="oracle selection"):
        _sparse_model(tiny_llama, selection="oracle", engine="decode-loop")
    assert _sparse_model(tiny_llama, selection="oracle").engine == "hooks"
    sm = _sparse_model(tiny_llama)
    with pytest.raises(DejavuError, match="context of 256 tokens"):
        sm.generate(PROMPT, 300)
    with pytest.raises(DejavuError, match="no chat template"):
        sm.generate(PROMPT, 4, chat=True)
    # wrong types from Python are named, not failed deep inside the loop (or, for a str, run letter by letter)
    with pytest.raises(DejavuError, match="max_new_tokens must be an integer"):
        sm.generate(PROMPT, 3.5)
    with pytest.raises(DejavuError, match="generate_batch"):
        sm.generate([PROMPT, PROMPT], 4)
    with pytest.raises(DejavuError, match="for one prompt, use generate"):
        sm.generate_batch(PROMPT, 4)
    for bad in (dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
                dict(temperature="0.5"), dict(top_p="0.5")):  # (a string was a TypeError)
        with pytest.raises(DejavuError):
            Sampler(**bad)
    import numpy as np

    assert len(sm.generate(PROMPT, np.int64(2)).token_ids) <= 2  # a numpy integer is an integer


def test_chat_template_wraps_the_prompt(tiny_llama):
    sm = _sparse_model(tiny_llama)
    sm.tokenizer.chat_template = "{% for m in messages %}<|endoftext|>{{ m['content'] }}{% endfor %} Answer:"
    ids = sm.encode("hello", chat=True)[0].tolist()
    assert ids[0] == sm.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert sm.tokenizer.decode(ids[1:]) == "hello Answer:"


@pytest.mark.parametrize("engine", ["decode-loop", "hooks"])
def test_on_tokens_hands_over_every_token_up_to_the_stop(tiny_llama, engine):
    sm = _sparse_model(tiny_llama, engine=engine)
    seen: list[list[int]] = []
    full = sm.generate(PROMPT, 40, stop_at_eos=False, on_tokens=lambda ids: seen.append(list(ids)))
    assert seen[-1] == full.token_ids and all(len(a) < len(b) for a, b in zip(seen, seen[1:], strict=False))
    if engine == "hooks":
        assert len(seen) == 40  # one call per token
    else:
        assert [len(ids) for ids in seen] == [16, 32, 40]  # one call per host read
    sm.eos_ids = {full.token_ids[20]}
    seen.clear()
    g = sm.generate(PROMPT, 40, on_tokens=lambda ids: seen.append(list(ids)))
    assert seen[-1] == g.token_ids and g.stopped_at_eos  # nothing past the end-of-sequence token


def test_streamed_text_is_the_generated_text(tiny_llama, capsys):
    from dejavu.runtime.generate import _TextStream

    sm = _sparse_model(tiny_llama, engine="hooks")
    g = sm.generate(PROMPT, 24, stop_at_eos=False, on_tokens=_TextStream(sm.tokenizer))
    assert capsys.readouterr().out == g.text


def test_auto_falls_back_to_the_hooks_for_a_layout_the_loop_does_not_take(tiny_model_factory, capsys):
    sm = _sparse_model(tiny_model_factory("llama", mlp_bias=True), mlp_density=1.0, head_density=1.0)
    g = sm.generate(PROMPT, 6, stop_at_eos=False)
    assert sm.engine == "hooks" and g.engine == "hooks (gather)" and "hooks instead" in capsys.readouterr().out
    assert g.token_ids == _hf_greedy(sm, PROMPT, 6)


PROMPTS = [PROMPT, "A", "In the early years of the nineteenth century, the river"]


@pytest.mark.parametrize("engine", ["decode-loop", "hooks"])
def test_a_batch_of_unequal_prompts_generates_what_each_prompt_does_alone(tiny_llama, engine):
    # left padding must change nothing: dense, each sequence of the batch equals its prompt run alone (and
    # Hugging Face's greedy decode); sparse with the hooks too, since each token keeps its own selection
    sm = _sparse_model(tiny_llama, engine=engine)
    for sparse in (False, True):
        batch = sm.generate_batch(PROMPTS, 10, sparse=sparse, stop_at_eos=False)
        alone = [sm.generate(p, 10, sparse=sparse, stop_at_eos=False) for p in PROMPTS]
        assert [g.prompt_tokens for g in batch] == [g.prompt_tokens for g in alone]
        assert all(g.batch_size == 3 and g.sparse == sparse for g in batch)
        if not sparse:
            assert [g.token_ids for g in batch] == [_hf_greedy(sm, p, 10) for p in PROMPTS]
        if not sparse or engine == "hooks":
            assert [g.token_ids for g in batch] == [g.token_ids for g in alone]


def test_the_decode_loops_sparse_batch_ignores_the_padding(tiny_llama):
    # the loop computes the union of the batch's selections, so a batch's sparse tokens are its own; what
    # the padding holds must not reach them
    sm = _sparse_model(tiny_llama, engine="decode-loop")
    first = sm.generate_batch(PROMPTS, 12, stop_at_eos=False)
    sm._pad_id = lambda: 7
    again = sm.generate_batch(PROMPTS, 12, stop_at_eos=False)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in sm.generate_batch(PROMPTS, 12, sparse=False,
                                                                                   stop_at_eos=False)]


@pytest.mark.parametrize("engine", ["decode-loop", "hooks"])
def test_each_sequence_of_a_batch_stops_at_its_own_end_of_sequence_token(tiny_llama, engine):
    sm = _sparse_model(tiny_llama, engine=engine)
    full = [g.token_ids for g in sm.generate_batch(PROMPTS, 40, stop_at_eos=False)]
    stop = full[0][3]
    sm.eos_ids = {stop}
    cut = sm.generate_batch(PROMPTS, 40)
    for g, ids in zip(cut, full, strict=True):
        if stop in ids:
            assert g.stopped_at_eos and g.token_ids == ids[:ids.index(stop) + 1]
        else:
            assert not g.stopped_at_eos and g.token_ids == ids
    with pytest.raises(DejavuError, match="no prompts"):
        sm.generate_batch([], 4)


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text",
                                        "mistral", "olmo2", "granite"])
def test_batches_of_other_families_generate_what_each_prompt_does_alone(tiny_model_factory, model_type):
    # every family through the hooks (and the decode loop where it runs): padding and positions handled
    sm = _sparse_model(tiny_model_factory(model_type))
    for sparse in (False, True):
        batch = sm.generate_batch(PROMPTS, 8, sparse=sparse, stop_at_eos=False)
        alone = [sm.generate(p, 8, sparse=sparse, stop_at_eos=False).token_ids for p in PROMPTS]
        if not sparse or sm.engine == "hooks":
            assert [g.token_ids for g in batch] == alone, (model_type, sparse, sm.engine)


def test_a_padded_batch_with_skipped_kv_groups_gives_the_same_tokens(tiny_llama):
    # skip_kv fills a KV group's skipped positions later from stored inputs: exact, padding or not
    plain = _sparse_model(tiny_llama, engine="decode-loop").generate_batch(PROMPTS, 12, stop_at_eos=False)
    lazy = _sparse_model(tiny_llama, engine="decode-loop", skip_kv=True)
    assert lazy.plan.skip_kv
    assert [g.token_ids for g in lazy.generate_batch(PROMPTS, 12, stop_at_eos=False)] == [g.token_ids for g in plain]


@pytest.mark.parametrize("new", [1, 2, 3, None])
def test_the_loop_reaches_the_last_position_of_a_learned_position_table(tmp_path, new):
    # GPT-2 has no embedding past its context: a prompt and new tokens that fill it exactly must run in the loop
    # (the cache once kept three spare positions for a CUDA graph's warm-up, also on the CPU, which has none)
    from helpers import build_tokenizer, make_tiny_model

    prompt_len = len(build_tokenizer()(PROMPT)["input_ids"])
    context = 32 if new is None else prompt_len + new
    new = new or 32 - prompt_len
    path = make_tiny_model(tmp_path / "gpt2", "gpt2", n_positions=context)
    sm = _sparse_model(path, engine="auto", mlp_density=1.0, head_density=1.0)
    assert len(sm.encode(PROMPT)[0]) == prompt_len
    # a short request first builds a short cache; the longer one then rebuilds it, still in the loop
    sm.generate("The", 1, stop_at_eos=False)
    assert sm.generate(PROMPT, new, stop_at_eos=False).token_ids == _hf_greedy(sm, PROMPT, new)
    assert sm.engine == "decode-loop"


def test_auto_falls_back_to_the_hooks_for_an_activation_the_loop_lacks(tiny_model_factory, capsys):
    sm = _sparse_model(tiny_model_factory("gpt_neox", hidden_act="quick_gelu"), mlp_density=1.0, head_density=1.0)
    assert sm.generate(PROMPT, 6, stop_at_eos=False).token_ids == _hf_greedy(sm, PROMPT, 6)
    assert sm.engine == "hooks" and "generating with the hooks instead" in capsys.readouterr().out


def test_a_stream_ending_inside_a_character_prints_the_rest_at_finish(capsys):
    """Ids that end inside a multi-byte character are held back; finish prints them with the final text."""
    from dejavu.runtime.generate import _TextStream

    class Bytes:  # a byte-level tokenizer: one id a UTF-8 byte
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    data = list("ab😀".encode())
    stream = _TextStream(Bytes())
    for n in range(1, len(data)):  # the emoji's last byte never arrives through the callback
        stream(data[:n])
    assert capsys.readouterr().out == "ab"
    stream.finish("ab\ufffd")
    assert capsys.readouterr().out == "\ufffd"


def test_api_misuse_is_a_dejavu_error(tiny_llama):
    from dejavu.errors import DejavuError

    sm = _sparse_model(tiny_llama, engine="hooks")
    with pytest.raises(DejavuError, match="seed must be an integer, got None"):
        sm.generate(PROMPT, 2, temperature=1.0, seed=None)
    got = sm.generate_batch((p for p in [PROMPT, "A"]), 2, sparse=False)  # a generator is read once
    assert len(got) == 2
