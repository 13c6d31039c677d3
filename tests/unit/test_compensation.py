"""MLP compensation (`export --mlp-compensation-rank R`): a low-rank linear term per layer for what the sparse
MLP leaves out. The fit lowers the error it is fitted on, the term reaches only sparse tokens, gather equals
mask, the decode loop equals the hooks, bundles carry it for the rule it was fitted for, and damaged ones are
refused."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from dejavu.errors import DejavuError
from dejavu.runtime.apply import SparseRuntime
from dejavu.runtime.compensation import Compensation, calibrate_compensation

from helpers import (
    CALIB_TXT,
    EVAL_RAW,
    load_tiny,
    make_predictors_dir,
    random_ids,
    random_predictors,
    run_interpreted,
)


def _first_mlp_error(model, adapter, preds, ids, compensation) -> float:
    """|dense - sparse (+ term)|^2 of layer 0's MLP output: its input is the same either way (heads dense)."""
    out = {}
    down = adapter.down_proj(adapter.decoder_layers()[0])

    def record(key):  # registered after the runtime's hooks: sees the term added
        return down.register_forward_hook(lambda m, a, o: out.__setitem__(key, o.detach().clone()))

    handle = record("dense")
    model(input_ids=ids)
    handle.remove()
    with SparseRuntime(model, adapter, preds, mlp_compensation=compensation):
        handle = record("sparse")
        model(input_ids=ids)
        handle.remove()
    return (out["dense"] - out["sparse"]).pow(2).sum().item()


@torch.no_grad()
def test_the_fit_lowers_the_first_layer_s_error_on_its_own_text(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, mlp_density=0.4, rank=8, seed=1)
    ids = random_ids(model, seq=64, batch=4, seed=2)
    d = adapter.shape().hidden_size
    comp = calibrate_compensation(model, adapter, preds, ids.reshape(-1), 64, rank=d)
    assert comp.rank == d and all(parts is not None for parts in comp.layers)
    before = _first_mlp_error(model, adapter, preds, ids, None)
    after = _first_mlp_error(model, adapter, preds, ids, comp)
    assert after < 0.9 * before
    low = calibrate_compensation(model, adapter, preds, ids.reshape(-1), 64, rank=2)
    assert [parts[0].shape for parts in low.layers] == [(2, d)] * len(low.layers)
    assert after <= _first_mlp_error(model, adapter, preds, ids, low) < before


@torch.no_grad()
def test_zero_terms_change_nothing_and_dense_tokens_get_none(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, mlp_density=0.5, seed=0)
    ids = random_ids(model)
    d = adapter.shape().hidden_size
    zero = Compensation([(torch.zeros(3, d), torch.zeros(d, 3), torch.zeros(d)) for _ in adapter.decoder_layers()])
    with SparseRuntime(model, adapter, preds) as rt:
        plain = model(input_ids=ids).logits
    with SparseRuntime(model, adapter, preds, mlp_compensation=zero) as rt:
        torch.testing.assert_close(model(input_ids=ids).logits, plain, atol=0, rtol=0)
    shift = Compensation([(torch.zeros(3, d), torch.zeros(d, 3), torch.full((d,), 0.5))
                          for _ in adapter.decoder_layers()])
    prefix = ids.shape[1] // 2
    sparse_tail = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1) >= prefix
    with SparseRuntime(model, adapter, preds) as rt:
        rt.token_mask = sparse_tail
        plain = model(input_ids=ids).logits
    with SparseRuntime(model, adapter, preds, mlp_compensation=shift) as rt:
        rt.token_mask = sparse_tail
        shifted = model(input_ids=ids).logits
    # causal: the dense prefix is untouched, the sparse tokens moved
    torch.testing.assert_close(shifted[:, :prefix], plain[:, :prefix], atol=1e-6, rtol=1e-6)
    assert (shifted[:, prefix:] - plain[:, prefix:]).abs().max() > 1e-3


@torch.no_grad()
def test_gather_equals_mask_and_refusals(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    preds = random_predictors(adapter, mlp_density=0.5, seed=0)
    ids = random_ids(model)
    comp = calibrate_compensation(model, adapter, preds, ids.reshape(-1), 20, rank=4)
    with SparseRuntime(model, adapter, preds, mlp_compensation=comp):
        mask = model(input_ids=ids).logits
    with SparseRuntime(model, adapter, preds, mlp_compensation=comp, mode="gather"):
        torch.testing.assert_close(model(input_ids=ids).logits, mask, atol=1e-5, rtol=1e-5)
    with pytest.raises(DejavuError, match="selection 'predictor'"):
        SparseRuntime(model, adapter, None, selection="oracle", mlp_density=0.5, mlp_compensation=comp)
    holes = Compensation([None] + comp.layers[1:])
    with pytest.raises(DejavuError, match="layer 0 runs a sparse MLP"):
        SparseRuntime(model, adapter, preds, mlp_compensation=holes)
    with pytest.raises(DejavuError, match="at least 1"):
        calibrate_compensation(model, adapter, preds, ids.reshape(-1), 20, rank=0)


@pytest.mark.parametrize("model_type", ["llama", "granite"])  # granite: down's output scaled before the residual
@torch.no_grad()
def test_decode_steps_equal_the_hooks(tiny_model_factory, model_type):
    from transformers import AutoModelForCausalLM

    from dejavu.models.adapters import adapter_for
    from dejavu.runtime.decode import DecodeModel

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(model_type), dtype=torch.float32).eval()
    adapter = adapter_for(model)
    preds = random_predictors(adapter, mlp_density=0.4, head_density=0.5, seed=3)
    comp = calibrate_compensation(model, adapter, preds, random_ids(model, seq=32, batch=2).reshape(-1), 32, rank=4)
    preds.mlp_compensation = comp
    prompt = torch.randint(1, 500, (1, 6), generator=torch.Generator().manual_seed(0))
    dm = DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=16)
    plain = DecodeModel(model, adapter, random_predictors(adapter, mlp_density=0.4, head_density=0.5, seed=3), "cpu",
                        torch.float32, max_len=16)
    st, st_plain = dm.new_state(1), plain.new_state(1)
    dm.prefill(st, prompt)
    plain.prefill(st_plain, prompt)
    ids = torch.cat([prompt, st.tokens[:, None]], 1)
    for _ in range(3):
        logits = dm.step(st, sparse=True)
        st_plain.tokens.copy_(st.tokens)
        with SparseRuntime(model, adapter, preds, mlp_compensation=comp) as rt:
            rt.token_mask = torch.arange(ids.shape[1])[None] >= prompt.shape[1]
            ref = model(input_ids=ids).logits[:, -1]
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
        assert (plain.step(st_plain, sparse=True) - logits).abs().max() > 1e-4  # the term is there
        ids = torch.cat([ids, st.tokens[:, None]], 1)
    preds.mlp_compensation = Compensation([None] * len(comp.layers))
    with pytest.raises(DejavuError, match="no term for it"):
        DecodeModel(model, adapter, preds, "cpu", torch.float32, max_len=16)


# --- bundles and the CLI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compensated_bundle(tmp_path_factory, tiny_llama):
    from dejavu.export.bundle import run_export

    run = tmp_path_factory.mktemp("compensated")
    make_predictors_dir(run, tiny_llama, mlp_density=0.4, head_density=1.0)
    manifest = run_export(run, run / "bundle", config_file="tiny", overrides={
        "export.mlp_compensation_rank": 4, "data.dataset": str(CALIB_TXT), "export.calibration_tokens": 512})
    return run, run / "bundle", manifest


def test_bundle_round_trip_and_bench(compensated_bundle, tiny_llama, tmp_path, capsys):
    from dejavu.export.bundle import load_bundle
    from dejavu.runtime.bench import run_bench

    run, bundle, manifest = compensated_bundle
    described = manifest["mlp_compensation"]
    assert described["rank"] == 4 and described["rule"]["mlp_selection"] == "topk"
    _, pset = load_bundle(bundle)
    assert pset.mlp_compensation.rank == 4 and len(pset.mlp_compensation.layers) == len(pset.layers)
    common = dict(model=str(tiny_llama), dataset=str(EVAL_RAW), config_file="tiny", speed=False)
    settings = {"runtime.max_eval_tokens": 300, "runtime.device": "cpu"}
    on = run_bench(bundle=bundle, json_out=tmp_path / "a.json", overrides=settings, **common)
    assert on["mlp_compensation"]["from_bundle"] and on["mlp_compensation"]["rank"] == 4
    off = run_bench(bundle=bundle, json_out=tmp_path / "b.json", overrides={**settings, "runtime.mlp_compensation": False},
                    **common)
    assert off["mlp_compensation"] is None and off["sparse"]["ppl"] != on["sparse"]["ppl"]
    capsys.readouterr()
    other = run_bench(bundle=bundle, json_out=tmp_path / "c.json", overrides={**settings, "runtime.mlp_density": 0.6},
                      **common)
    assert other["mlp_compensation"] is None
    assert "fitted for another rule" in capsys.readouterr().out


def test_damaged_bundles_are_refused(compensated_bundle, tmp_path):
    from dejavu.artifacts import load_tensors, save_tensors
    from dejavu.export.bundle import BUNDLE_FILE, load_bundle

    _, bundle, _ = compensated_bundle

    def variant(name, edit_tensors=None, edit_manifest=None):
        copy = tmp_path / name
        shutil.copytree(bundle, copy)
        manifest = json.loads((bundle / "manifest.json").read_text())
        if edit_tensors is not None:
            tensors = load_tensors(bundle / BUNDLE_FILE)
            edit_tensors(tensors)
            manifest["files"][0]["sha256"] = save_tensors(copy / BUNDLE_FILE, tensors)
            manifest["files"][0]["bytes"] = (copy / BUNDLE_FILE).stat().st_size
        if edit_manifest is not None:
            edit_manifest(manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        return copy

    with pytest.raises(DejavuError, match="lacks mlp_compensation.0.a"):
        load_bundle(variant("missing", lambda t: t.pop("mlp_compensation.0.a")))
    with pytest.raises(DejavuError, match="not finite"):
        load_bundle(variant("nan", lambda t: t["mlp_compensation.1.b"].fill_(float("nan"))))
    with pytest.raises(DejavuError, match="expected"):
        load_bundle(variant("shape", lambda t: t.__setitem__("mlp_compensation.0.bias", torch.zeros(3))))
    with pytest.raises(DejavuError, match="rank of at least 1"):
        load_bundle(variant("rank", edit_manifest=lambda m: m["mlp_compensation"].__setitem__("rank", 0)))


def test_export_refuses_it_without_a_sparse_mlp_or_with_thresholds(tmp_path, tiny_llama):
    from dejavu.export.bundle import run_export

    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=1.0)
    with pytest.raises(DejavuError, match="all run dense"):
        run_export(run, tmp_path / "a", config_file="tiny", overrides={
            "export.mlp_compensation_rank": 2, "export.mlp_density": 1.0, "data.dataset": str(CALIB_TXT),
            "export.calibration_tokens": 256})
    with pytest.raises(DejavuError, match="integer >= 0"):
        run_export(run, tmp_path / "b", config_file="tiny", overrides={"export.mlp_compensation_rank": -1})
    assert not (tmp_path / "a").exists() or not (tmp_path / "a" / "manifest.json").exists()


# --- learned with the predictors (tune-predictors --mlp-compensation-rank) -----------------------------------------


def test_tuning_learns_it_and_export_carries_it(tmp_path, tiny_llama, capsys):
    from dejavu.export.bundle import load_bundle, run_export
    from dejavu.runtime.bench import run_bench
    from dejavu.train.tune import run_tune

    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=1.0)
    settings = {"data.seq_len": 32, "tune.steps": 30, "tune.sequences": 2, "tune.eval_sequences": 4, "tune.lr": 0.05,
                "tune.eval_every": 6, "model.device": "cpu", "model.dtype": "float32", "data.dataset": str(CALIB_TXT)}
    plain = run_tune(run, config_file="tiny", overrides=settings)
    shutil.move(run / "tuned", tmp_path / "plain")
    manifest = run_tune(run, config_file="tiny", overrides={**settings, "tune.mlp_compensation_rank": 3,
                                                             "tune.mlp_compensation_lr": 0.002})
    assert manifest["mlp_compensation"] == {"rank": 3}
    # it starts at zero, so the held-out KL before is the predictors' alone; after, lower than without it
    assert manifest["tuned"]["before"]["kl"] == pytest.approx(plain["tuned"]["before"]["kl"], rel=1e-5)
    assert manifest["tuned"]["after"]["kl"] < plain["tuned"]["after"]["kl"]
    bundle = run_export(run / "tuned", tmp_path / "bundle")
    assert bundle["mlp_compensation"]["tuned"] and bundle["mlp_compensation"]["rank"] == 3
    _, pset = load_bundle(tmp_path / "bundle")
    assert pset.mlp_compensation.rank == 3 and all(parts is not None for parts in pset.mlp_compensation.layers)
    report = run_bench(model=str(tiny_llama), bundle=tmp_path / "bundle", dataset=str(EVAL_RAW), config_file="tiny",
                       speed=False, json_out=tmp_path / "b.json",
                       overrides={"runtime.max_eval_tokens": 200, "runtime.device": "cpu"})
    assert report["mlp_compensation"]["from_bundle"]
    with pytest.raises(DejavuError, match="drop --mlp-compensation-rank"):
        run_export(run / "tuned", tmp_path / "bundle2", overrides={"export.mlp_compensation_rank": 2})


def test_score_thresholds_are_set_with_the_compensation_running(tmp_path, tiny_llama):
    """The compensation shifts later layers' inputs, so the shares thresholds keep: export sets them with it."""
    from dejavu.config import DataConfig
    from dejavu.export.bundle import load_bundle, run_export
    from dejavu.runtime.score_thresholds import calibrate_on_corpus

    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.4, head_density=1.0)
    manifest = run_export(run, tmp_path / "b", config_file="tiny", overrides={
        "export.mlp_compensation_rank": 4, "export.mlp_selection": "threshold", "export.mlp_candidate_density": 0.6,
        "data.dataset": str(CALIB_TXT), "export.calibration_tokens": 512})
    assert manifest["mlp_score_thresholds"]["with_mlp_compensation"]
    assert manifest["mlp_compensation"]["rule"]["mlp_selection"] == "threshold"
    _, pset = load_bundle(tmp_path / "b")
    from dejavu.models.adapters import adapter_for
    from dejavu.models.loading import load_model

    model, tokenizer, _ = load_model(str(tiny_llama), device="cpu", dtype="float32")
    data = DataConfig(dataset=str(CALIB_TXT))
    args = (model, adapter_for(model), tokenizer, pset, data, 512, 2048)
    with_it = calibrate_on_corpus(*args, candidate_density=0.6, compensation=pset.mlp_compensation)
    without = calibrate_on_corpus(*args, candidate_density=0.6)
    # layer 0's predictor reads the embeddings either way; later layers read inputs the term has shifted
    assert with_it[0][0] == pytest.approx(without[0][0], rel=1e-6)
    assert with_it[0][1:] != pytest.approx(without[0][1:], rel=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter mode)")
def test_the_one_launch_mlp_kernel_adds_it_in_interpreter():
    """Batch 1's MLP kernel reads the compensation's rows beside the neurons' (more rows than programs too, and no
    neuron selected), against the reference op; the cut variant likewise."""
    run_interpreted('''
        from dejavu.runtime.kernels import triton_kernels as T, ops
        torch.manual_seed(0)
        d, n = 300, 200
        gate, up, down_t = torch.randn(n, d) * 0.3, torch.randn(n, d) * 0.3, torch.randn(n, d) * 0.1
        idx = torch.randperm(n)[:80]
        x = torch.randn(1, d)
        for rank, programs in ((3, 8), (20, 4)):
            a, bt, bias = torch.randn(rank, d) * 0.1, torch.randn(rank, d) * 0.1, torch.randn(d)
            for c in (None, 0, 37):
                count = None if c is None else torch.tensor([c], dtype=torch.int32)
                ref = torch.zeros(1, d)
                ops.sparse_mlp_acc.eager(x, gate, up, down_t, idx, 1, ref, count, a, bt, bias)
                acc = torch.zeros(1, d)
                T.sparse_mlp_gemv(x, gate, up, down_t, idx, 1, acc, config=(4, 4, programs), count=count,
                                  compensation=(a, bt, bias))
                torch.testing.assert_close(acc, ref, atol=1e-4, rtol=1e-4)
                ref, ref_tally = torch.zeros(1, d), torch.zeros(2, dtype=torch.int64)
                ops.sparse_mlp_cut_acc.eager(x, gate, up, down_t, idx, 1, ref, 0.05, ref_tally, count, a, bt, bias)
                acc, tally = torch.zeros(1, d), torch.zeros(2, dtype=torch.int64)
                T.sparse_mlp_gemv(x, gate, up, down_t, idx, 1, acc, config=(4, 4, programs), count=count, cut=0.05,
                                  tally=tally, compensation=(a, bt, bias))
                torch.testing.assert_close(acc, ref, atol=1e-4, rtol=1e-4)
                assert tally.tolist() == ref_tally.tolist()
        plain, ref = torch.zeros(1, d), torch.zeros(1, d)
        T.sparse_mlp_gemv(x, gate, up, down_t, idx[:0], 1, plain, compensation=(a, bt, bias))
        ops.sparse_mlp_acc.eager(x, gate, up, down_t, idx[:0], 1, ref, None, a, bt, bias)
        torch.testing.assert_close(plain, ref, atol=1e-4, rtol=1e-4)
        print("ok")
    ''', timeout=600)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter mode)")
def test_the_gather_kernels_add_it_in_batches_in_interpreter():
    """Batches: the gate/up kernel computes x a^T in row blocks after the selection's, the down kernel adds its
    rows of b^T and the bias in a split of its own (gated and plain MLPs); with and without d split, a device count (0 included) and a
    down cut, against the reference op (fp32: the interpreter's bf16 products are wrong; the GPU tests cover bf16)."""
    run_interpreted('''
        from dejavu.runtime import reference as R
        from dejavu.runtime.kernels import triton_kernels as T, ops
        torch.manual_seed(0)
        d, n = 300, 200
        gate, up, down_t = (torch.randn(n, d) * s for s in (0.3, 0.3, 0.1))
        idx = torch.randperm(n)[:70]
        x, up_bias = torch.randn(3, d), torch.randn(n)
        for rank, gemm_config in ((3, (16, 128, 4, 1)), (20, (16, 64, 4, 3))):
            a, bt, bias = (torch.randn(*shape) * 0.1 for shape in ((rank, d), (rank, d), (d,)))
            for batch in (1, 3):
                for c in (None, 0, 37):
                    count = None if c is None else torch.tensor([c], dtype=torch.int32)
                    ref = torch.zeros(batch, d)
                    ops.sparse_mlp_acc.eager(x[:batch], gate, up, down_t, idx, 1, ref, count, a, bt, bias)
                    h = T.gather_matvec(x[:batch], up, idx, 1, gate, 1, config=gemm_config, count=count,
                                        compensation=a)
                    assert h.shape == (batch, idx.numel() + rank)
                    acc = torch.zeros(batch, d)
                    T.gather_vecmat_acc(h, down_t, idx, 1, acc, config=(16, 128, 4, 2), count=count,
                                        compensation=(bt, bias))
                    torch.testing.assert_close(acc, ref, atol=1e-4, rtol=1e-4)
                    ref, ref_tally = torch.zeros(batch, d), torch.zeros(2, dtype=torch.int64)
                    ops.sparse_mlp_cut_acc.eager(x[:batch], gate, up, down_t, idx, 1, ref, 0.05, ref_tally, count,
                                                 a, bt, bias)
                    acc, tally = torch.zeros(batch, d), torch.zeros(2, dtype=torch.int64)
                    T.gather_vecmat_acc(h, down_t, idx, 1, acc, config=(16, 128, 4, 2), count=count, cut=0.05,
                                        tally=tally, compensation=(bt, bias))
                    torch.testing.assert_close(acc, ref, atol=1e-4, rtol=1e-4)
                    assert tally.tolist() == ref_tally.tolist()
                    # a plain MLP (OPT): the selection's rows get up's bias and the activation, the term's neither
                    ref = torch.zeros(batch, d)
                    ops.plain_mlp_acc.eager(x[:batch], up, up_bias, down_t, idx, 2, ref, count, a, bt, bias)
                    h = T.gather_matvec(x[:batch], up, idx, 1, None, 2, config=gemm_config, bias=up_bias, count=count,
                                        compensation=a)
                    acc = torch.zeros(batch, d)
                    T.gather_vecmat_acc(h, down_t, idx, 1, acc, config=(16, 128, 4, 2), count=count,
                                        compensation=(bt, bias))
                    torch.testing.assert_close(acc, ref, atol=1e-4, rtol=1e-4)
        # through the CUDA dispatch (batch 1: the one-launch kernel; 3: the gather kernels), with and without the term
        for batch in (1, 3):
            for comp in ((None, None, None), (a, bt, bias)):
                ref, acc = torch.zeros(batch, d), torch.zeros(batch, d)
                ops.sparse_mlp_acc.eager(x[:batch], gate, up, down_t, idx, 1, ref, None, *comp)
                ops._sparse_mlp_cuda(x[:batch], gate, up, down_t, idx, 1, acc, None, comp=comp)
                torch.testing.assert_close(acc, ref, atol=1e-4, rtol=1e-4)
        # a caller's split workspace sized to its outputs exactly (more than the 1,024 rows it holds at least, not a
        # whole number of row blocks; the predictors' side stream sizes it so), with and without the term, left zeroed
        big_gate, big_up = torch.randn(1200, 64) * 0.2, torch.randn(1200, 64) * 0.2
        big_idx, a = torch.randperm(1200)[:1090], torch.randn(20, 64)
        x = torch.randn(3, 64)
        for comp in (None, a):
            ws = T.split_workspace("cpu", 1090 + (0 if comp is None else 20))
            for c in (None, 0, 500):
                count = None if c is None else torch.tensor([c], dtype=torch.int32)
                kept = big_idx if c is None else big_idx[:c]
                h = T.gather_matvec(x, big_up, big_idx, 1, big_gate, 1, config=(32, 32, 4, 2), count=count,
                                    compensation=comp, workspace=ws)
                torch.testing.assert_close(h[:, :kept.numel()], R.gather_matvec(x, big_up, kept, 1, big_gate, 1),
                                           atol=1e-4, rtol=1e-4)
                if comp is not None:
                    torch.testing.assert_close(h[:, 1090:], x @ a.T, atol=1e-4, rtol=1e-4)
                assert not ws.any()
        print("ok")
    ''', timeout=900)


def test_the_rule_it_runs_with(tmp_path, tiny_llama, capsys):
    """A layer without predictors runs dense whatever the flags say (restating the bundle's density keeps the term);
    a term tuned for one rule, exported for another, is carried but left out; thresholds set with the term running
    are set again when it is left out."""
    from dejavu.export.bundle import run_export
    from dejavu.runtime.bench import run_bench
    from dejavu.train.tune import run_tune

    common = dict(model=str(tiny_llama), dataset=str(EVAL_RAW), config_file="tiny", speed=False)
    settings = {"runtime.max_eval_tokens": 200, "runtime.device": "cpu", "data.dataset": str(CALIB_TXT),
                "runtime.calibration_tokens": 256}
    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.4, head_density=1.0, layers=[0, 1])
    run_export(run, tmp_path / "b", config_file="tiny", overrides={
        "export.mlp_compensation_rank": 2, "data.dataset": str(CALIB_TXT), "export.calibration_tokens": 256})
    capsys.readouterr()
    restated = run_bench(bundle=tmp_path / "b", json_out=tmp_path / "a.json",
                         overrides={**settings, "runtime.mlp_density": 0.4}, **common)
    assert restated["mlp_compensation"] is not None and "another rule" not in capsys.readouterr().out

    tuned_run = tmp_path / "tuned-run"
    make_predictors_dir(tuned_run, tiny_llama, mlp_density=0.5, head_density=1.0)
    run_tune(tuned_run, config_file="tiny", overrides={
        "data.seq_len": 32, "tune.steps": 2, "tune.sequences": 2, "tune.eval_sequences": 2, "tune.eval_every": 0,
        "model.device": "cpu", "model.dtype": "float32", "data.dataset": str(CALIB_TXT),
        "tune.mlp_compensation_rank": 2})
    capsys.readouterr()
    manifest = run_export(tuned_run / "tuned", tmp_path / "t", config_file="tiny", overrides={"export.mlp_density": 0.3})
    assert "runtimes will leave it out" in capsys.readouterr().out
    assert manifest["mlp_compensation"]["rule"]["mlp_density_per_layer"][0] == 0.5
    other = run_bench(bundle=tmp_path / "t", json_out=tmp_path / "c.json", overrides=settings, **common)
    assert other["mlp_compensation"] is None and "another rule" in capsys.readouterr().out

    run_export(tuned_run / "tuned", tmp_path / "s", config_file="tiny", overrides={
        "export.mlp_selection": "threshold", "data.dataset": str(CALIB_TXT), "export.calibration_tokens": 256})
    capsys.readouterr()
    # tuned for a top-k, exported with score thresholds: another rule, so the thresholds are set without it
    kept = run_bench(bundle=tmp_path / "s", json_out=tmp_path / "d.json", overrides=settings, **common)
    assert kept["mlp_compensation"] is None and kept["mlp_score_thresholds"]["from_bundle"]
    closed = run_export(run, tmp_path / "f", config_file="tiny", overrides={
        "export.mlp_compensation_rank": 2, "export.mlp_selection": "threshold", "data.dataset": str(CALIB_TXT),
        "export.calibration_tokens": 256})
    assert closed["mlp_score_thresholds"]["with_mlp_compensation"]
    capsys.readouterr()
    off = run_bench(bundle=tmp_path / "f", json_out=tmp_path / "e.json",
                    overrides={**settings, "runtime.mlp_compensation": False}, **common)
    assert "with the MLP compensation left out" in capsys.readouterr().out
    assert not off["mlp_score_thresholds"].get("from_bundle") and not off["mlp_score_thresholds"]["with_mlp_compensation"]


def test_a_tuned_term_of_a_layer_exported_dense_is_left_out(tmp_path, tiny_llama):
    from dejavu.export.bundle import load_bundle, run_export
    from dejavu.train.tune import run_tune

    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=1.0)
    run_tune(run, config_file="tiny", overrides={
        "data.seq_len": 32, "tune.steps": 2, "tune.sequences": 2, "tune.eval_sequences": 2, "tune.eval_every": 0,
        "model.device": "cpu", "model.dtype": "float32", "data.dataset": str(CALIB_TXT), "tune.mlp_compensation_rank": 2})
    full = run_export(run / "tuned", tmp_path / "a", config_file="tiny")
    part = run_export(run / "tuned", tmp_path / "b", config_file="tiny",
                      overrides={"export.mlp_density_per_layer": {0: 1.0}})
    d = load_tiny(tiny_llama)[1].shape().hidden_size
    assert full["predictor_bytes"] - part["predictor_bytes"] >= (2 * 2 * d + d) * 4
    _, pset = load_bundle(tmp_path / "b")
    assert pset.mlp_compensation.layers[0] is None and pset.mlp_compensation.layers[1] is not None
