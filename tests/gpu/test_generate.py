"""Generation on CUDA: the graph-captured decode loop against Hugging Face and the CPU loop."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPT = "The history of the city"
# the device machine has no shared data: the tokenizer learns from this text instead
TEXT = " ".join(f"The history of the city {i} begins with a prompt, longer than the first one." for i in range(400))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from helpers import build_tokenizer, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-gpu"), "llama", build_tokenizer(TEXT))


def _sparse_model(path, device, engine="auto"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dejavu.config import load_config
    from dejavu.models.adapters import adapter_for
    from dejavu.predictor import PredictorSet
    from dejavu.runtime.generate import SparseModel
    from dejavu.runtime.plan import resolve_plan

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    adapter = adapter_for(model)
    s = adapter.shape()
    preds = PredictorSet.random(adapter.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, 8, 0.5, 0.5)
    plan = resolve_plan(load_config("tiny", {}), None, preds, model, adapter, tokenizer)
    return SparseModel(model, tokenizer, adapter, plan, device=device, dtype=torch.float32, name=str(path),
                       engine=engine)


def test_graphed_dense_generation_equals_hugging_face(tiny_llama):
    sm = _sparse_model(tiny_llama, "cuda")
    g = sm.generate(PROMPT, 12, sparse=False, stop_at_eos=False)
    ids = sm.encode(PROMPT).cuda()
    with torch.no_grad():
        ref = sm.model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert g.engine == "decode-loop (CUDA graph)" and g.token_ids == ref[0, ids.shape[1]:].tolist()


def test_graphed_sparse_generation_equals_the_cpu_loop(tiny_llama):
    cuda = _sparse_model(tiny_llama, "cuda").generate(PROMPT, 12, stop_at_eos=False)
    cpu = _sparse_model(tiny_llama, "cpu").generate(PROMPT, 12, stop_at_eos=False)
    assert cuda.sparse and cuda.token_ids == cpu.token_ids


def test_graphed_generation_reuses_its_graph_and_samples_with_its_seed(tiny_llama):
    sm = _sparse_model(tiny_llama, "cuda")
    first = sm.generate(PROMPT, 10, stop_at_eos=False)
    graph = sm._loop_states[(True, 1)][1]
    assert sm.generate(PROMPT, 10, stop_at_eos=False).token_ids == first.token_ids
    assert sm._loop_states[(True, 1)][1] is graph  # one capture serves every call that fits its cache
    a = sm.generate(PROMPT, 20, temperature=1.2, seed=5, stop_at_eos=False)
    assert a.token_ids == sm.generate(PROMPT, 20, temperature=1.2, seed=5, stop_at_eos=False).token_ids
    full = sm.generate(PROMPT, 40, stop_at_eos=False).token_ids
    sm.eos_ids = {full[20]}
    g = sm.generate(PROMPT, 40)  # found at the check after 32 tokens: the later ones are dropped
    assert g.stopped_at_eos and g.token_ids == full[:full.index(full[20]) + 1]


PROMPTS = [PROMPT, "A", "The history of the city 12 begins with a prompt, longer than the first one. The"]


def test_graphed_batch_of_unequal_prompts_equals_each_alone_and_the_cpu_loop(tiny_llama):
    sm = _sparse_model(tiny_llama, "cuda")
    dense = sm.generate_batch(PROMPTS, 12, sparse=False, stop_at_eos=False)
    assert [g.token_ids for g in dense] == [sm.generate(p, 12, sparse=False, stop_at_eos=False).token_ids
                                            for p in PROMPTS]
    assert dense[0].engine == "decode-loop (CUDA graph)" and dense[0].batch_size == 3
    sparse = sm.generate_batch(PROMPTS, 12, stop_at_eos=False)
    cpu = _sparse_model(tiny_llama, "cpu").generate_batch(PROMPTS, 12, stop_at_eos=False)
    assert [g.token_ids for g in sparse] == [g.token_ids for g in cpu]
    assert [g.token_ids for g in sparse] != [g.token_ids for g in dense]
