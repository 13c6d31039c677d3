"""Quality measurement: strided windows score every token once, metrics of identical models, and the
bench report (stdout + JSON with the contract keys, nested and flat)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from dejavu.errors import DejavuError
from dejavu.runtime.bench import CONTRACT_KEYS, run_bench
from dejavu.runtime.quality import Totals, strided_windows

from helpers import EVAL_RAW, make_predictors_dir


@pytest.mark.parametrize("n,window,stride", [(100, 32, 16), (100, 32, 32), (31, 32, 8), (2, 2, 1), (257, 64, 48)])
def test_strided_windows_score_each_token_once(n, window, stride):
    scored, windows = [], strided_windows(n, window, stride)
    for w in windows:
        assert w.end - w.begin <= window
        # logit at window position p predicts token begin + p + 1
        scored.extend(range(w.begin + w.first_scored + 1, w.end))
    assert scored == sorted(set(scored))  # never twice
    # Only a window's first token goes unscored, and only when windows do not overlap (no context).
    missing = set(range(1, n)) - set(scored)
    assert missing <= {w.begin for w in windows} and (not missing or stride == window)


def test_strided_windows_reject_bad_arguments():
    with pytest.raises(DejavuError):
        strided_windows(100, 32, 64)
    with pytest.raises(DejavuError):
        strided_windows(1, 32, 16)


def test_totals_of_identical_and_different_models():
    torch.manual_seed(0)
    logits = torch.randn(50, 11)
    targets = torch.randint(0, 11, (50,))
    same = Totals()
    same.add(torch.log_softmax(logits, -1), logits, targets)
    r = same.report()
    assert r["top1_agreement"] == 1.0 and abs(r["kl"]) < 1e-6 and r["dense_ppl"] == pytest.approx(r["sparse_ppl"])
    nll = torch.nn.functional.cross_entropy(logits, targets).item()
    assert r["dense_ppl"] == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-5)
    other = Totals()
    other.add(torch.log_softmax(logits, -1), torch.randn(50, 11), targets)
    assert other.report()["kl"] > 0 and other.report()["top1_agreement"] < 1


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tiny_llama):
    from dejavu.export.bundle import run_export

    run = tmp_path_factory.mktemp("bench-run")
    make_predictors_dir(run, tiny_llama)
    run_export(run, run / "bundle")
    return run / "bundle"


def _bench(tmp_path, tiny_llama, bundle, **overrides):
    out = tmp_path / "bench.json"
    report = run_bench(model=str(tiny_llama), bundle=bundle, dataset=str(EVAL_RAW), json_out=out, config_file="tiny",
                       overrides={"runtime.max_eval_tokens": 300, "runtime.device": "cpu", **overrides},
                       speed=False)
    return report, json.loads(out.read_text())


def test_bench_report_has_contract_keys_nested_and_flat(tmp_path, tiny_llama, tiny_bundle, capsys):
    report, data = _bench(tmp_path, tiny_llama, tiny_bundle)
    for key in CONTRACT_KEYS:
        assert key in data, key
        head, _, tail = key.partition(".")
        if tail:
            assert data[head][tail] == data[key]
    assert data["synthetic"] is False and data["mlp_density"] == 0.5 and data["head_density"] == 0.5
    q = data["quality"]
    assert q["window"] == 128 and q["stride"] == 64 and q["scored_tokens"] == 299
    assert data["sparse.ppl"] > 0 and 0 <= data["top1_agreement"] <= 1 and data["kl"] >= 0
    assert len(q["generations"]) == 3 and q["computed"]["mlp_kept"] == pytest.approx(0.5, abs=0.02)
    assert "perplexity" in capsys.readouterr().out


def test_bench_density_one_and_oracle(tmp_path, tiny_llama, tiny_bundle):
    _, dense = _bench(tmp_path, tiny_llama, tiny_bundle, **{"runtime.mlp_density": 1.0, "runtime.head_density": 1.0})
    assert dense["top1_agreement"] == 1.0 and dense["sparse.ppl"] == pytest.approx(dense["dense.ppl"], rel=1e-5)
    _, oracle = _bench(tmp_path, tiny_llama, None, **{"runtime.selection": "oracle", "runtime.mlp_density": 0.5})
    assert oracle["mlp_density"] == 0.5 and oracle["sparse.ppl"] != oracle["dense.ppl"]
    # no bundle and no density: the oracle keeps what a bundle would ask by default, not everything
    from dejavu.config import load_config

    _, default = _bench(tmp_path, tiny_llama, None, **{"runtime.selection": "oracle"})
    tiny = load_config("tiny", {})  # export densities from the shipped defaults under it (MLP 0.5, heads 1.0)
    want = (tiny.export.mlp_density or tiny.train.mlp_density, tiny.export.head_density or tiny.train.head_density)
    assert (default["mlp_density"], default["head_density"]) == want == (0.5, 1.0)
    assert default["mlp_density"] < 1.0 and default["top1_agreement"] < 1.0
    with pytest.raises(DejavuError, match="bundle"):
        _bench(tmp_path, tiny_llama, None)


def test_synthetic_bench_is_speed_only(tmp_path, tiny_llama, monkeypatch, capsys):
    """--synthetic: random weights at real shapes; speed keys filled, quality keys null."""
    import sys
    import types

    from dejavu.models.adapters import adapter_for
    from dejavu.models.loading import load_model
    from dejavu.predictor import PredictorSet

    def build_synthetic(name, layers, device, dtype, mlp_density, head_density):
        model, _, _ = load_model(str(tiny_llama), device="cpu", dtype="float32")
        adapter = adapter_for(model)
        s = adapter.shape()
        preds = PredictorSet.random(adapter.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, 8,
                                    mlp_density, head_density)
        return model, adapter, preds

    fake = types.ModuleType("dejavu.runtime.synthetic")
    fake.build_synthetic = build_synthetic
    monkeypatch.setitem(sys.modules, "dejavu.runtime.synthetic", fake)
    out = tmp_path / "synthetic.json"
    run_bench(synthetic="tiny-shapes", json_out=out, config_file="tiny",
              overrides={"runtime.device": "cpu", "runtime.batch_sizes": [1, 2]})
    data = json.loads(out.read_text())
    for key in CONTRACT_KEYS:
        assert key in data, key
    assert data["synthetic"] is True and data["dense.ppl"] is None and data["top1_agreement"] is None
    assert data["batch_size"] == 1 and data["dense.ms_per_token"] > 0 and data["speedup"] > 0
    assert set(data["speed"]["batches"]) == {"1", "2"}
    assert "synthetic weights" in capsys.readouterr().out
    # the speed plot beside the JSON (matplotlib is the `plot` extra, installed by `make setup`)
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # exact-up selection: the decode loop times it too, reading every up row; here after a longer prompt
    run_bench(synthetic="tiny-shapes", json_out=out, config_file="tiny",
              overrides={"runtime.device": "cpu", "runtime.mlp_up_weight": 0.4, "runtime.prompt_len": 40})
    up = json.loads(out.read_text())
    assert up["mlp_up_weight"] == 0.4 and up["speed"]["mlp_up_weight"] == 0.4 and up["speedup"] > 0
    assert data["speed"]["prompt_len"] == 16 and up["speed"]["prompt_len"] == 40
    with pytest.raises(DejavuError, match="past the model's context"):
        run_bench(synthetic="tiny-shapes", json_out=out, config_file="tiny",
                  overrides={"runtime.device": "cpu", "runtime.prompt_len": 1 << 20})
    # the longer context: more of the KV cache read every step
    assert up["speed"]["batches"]["1"]["dense_bytes_per_step"] > data["speed"]["batches"]["1"]["dense_bytes_per_step"]
    # MLP thresholds (no MLP predictor), calibrated on the random model's own activations
    run_bench(synthetic="tiny-shapes", json_out=out, config_file="tiny",
              overrides={"runtime.device": "cpu", "runtime.mlp_keep_input": 0.7, "runtime.mlp_density": 0.5})
    thr = json.loads(out.read_text())
    assert thr["thresholds"]["keep_input"] == 0.7 and thr["speed"]["thresholds"]["keep_down_input"] == 0.5
    row = thr["speed"]["batches"]["1"]
    assert thr["speedup"] > 0 and row["sparse_bytes_per_step"] < row["dense_bytes_per_step"]
    assert (up["speed"]["batches"]["1"]["sparse_bytes_per_step"]
            > data["speed"]["batches"]["1"]["sparse_bytes_per_step"])
    # --skip-kv: k/v of the read KV groups only (exact output): fewer bytes once fewer heads than KV
    # groups are read (one of four heads here; the tiny model has two groups)
    reads = {}
    for skip_kv in (False, True):
        run_bench(synthetic="tiny-shapes", json_out=out, config_file="tiny",
                  overrides={"runtime.device": "cpu", "runtime.head_density": 0.25, "runtime.skip_kv": skip_kv})
        got = json.loads(out.read_text())
        assert got["speed"]["kv_for_all_heads"] is not skip_kv and got["speedup"] > 0
        reads[skip_kv] = got["speed"]["batches"]["1"]["sparse_bytes_per_step"]
    assert reads[True] < reads[False]


@torch.no_grad()
def test_perplexity_matches_the_hf_strided_recipe(tiny_llama):
    """Same number as the Hugging Face perplexity guide's loop (labels -100 on the overlap)."""
    import math

    from dejavu.models.adapters import adapter_for
    from dejavu.models.loading import load_model
    from dejavu.runtime.apply import SparseRuntime
    from dejavu.runtime.quality import compare

    model, _, _ = load_model(str(tiny_llama), device="cpu", dtype="float32")
    tokens = torch.randint(0, model.config.vocab_size, (200,), generator=torch.Generator().manual_seed(0))
    window, stride = 64, 24
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, tokens.numel(), stride):
        end = min(begin + window, tokens.numel())
        trg_len = end - prev_end
        ids = tokens[begin:end][None]
        labels = ids.clone()
        labels[:, :-trg_len] = -100
        loss = model(ids, labels=labels).loss
        valid = (labels[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * valid
        n_tokens += valid
        prev_end = end
        if end == tokens.numel():
            break
    with SparseRuntime(model, adapter_for(model), selection="dense") as rt:
        ours = compare(model, rt, tokens, window, stride)
    assert ours["scored_tokens"] == n_tokens
    assert ours["dense_ppl"] == pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-5)


def test_family_without_decode_loop_is_timed_with_hf_eager(tmp_path, tiny_model_factory, monkeypatch):
    """A family an adapter adds without teaching the fast decode loop (here GPT-NeoX, as if it had not):
    bench still reports speed, from HF eager decode, and says so."""
    from dejavu.export.bundle import run_export
    from dejavu.runtime import decode

    monkeypatch.setattr(decode, "SUPPORTED_MODEL_TYPES",
                        tuple(t for t in decode.SUPPORTED_MODEL_TYPES if t != "gpt_neox"))

    neox = tiny_model_factory("gpt_neox")
    run = tmp_path / "neox-run"
    make_predictors_dir(run, neox)
    run_export(run, run / "bundle")
    out = tmp_path / "neox.json"
    with pytest.warns(UserWarning, match="no fast decode loop for 'gpt_neox'"):
        run_bench(model=str(neox), bundle=run / "bundle", dataset=str(EVAL_RAW), json_out=out, config_file="tiny",
                  overrides={"runtime.device": "cpu", "runtime.batch_sizes": [1, 2]}, quality=False, speed=True)
    data = json.loads(out.read_text())
    assert "HF eager" in data["speed"]["method"]
    assert data["dense.ms_per_token"] > 0 and data["sparse.ms_per_token"] > 0 and data["speedup"] > 0
    assert set(data["speed"]["batches"]) == {"1", "2"}


def test_two_stage_bundle_is_timed_two_stage(tmp_path, tiny_llama):
    """A bundle's candidate density reaches the fast decode loop, so speed and quality time the same rule."""
    from dejavu.export.bundle import run_export

    run = tmp_path / "two-stage-run"
    make_predictors_dir(run, tiny_llama)
    run_export(run, run / "bundle", overrides={"export.mlp_candidate_density": 0.8})
    out = tmp_path / "two.json"
    run_bench(model=str(tiny_llama), bundle=run / "bundle", dataset=str(EVAL_RAW), json_out=out, config_file="tiny",
              overrides={"runtime.device": "cpu"}, quality=False, speed=True)
    data = json.loads(out.read_text())
    assert data["mlp_candidate_density"] == 0.8
    assert data["speed"]["mlp_candidate_density"] == 0.8 and data["sparse.ms_per_token"] > 0


def test_bench_thresholds_without_a_bundle(tmp_path, tiny_llama, capsys):
    settings = {"runtime.mlp_keep_input": 0.7, "runtime.mlp_density": 0.5, "runtime.calibration_tokens": 512}
    _, data = _bench(tmp_path, tiny_llama, None, **settings)
    assert data["thresholds"]["keep_input"] == 0.7 and data["thresholds"]["keep_down_input"] == 0.5
    computed = data["quality"]["computed"]
    # calibrated on the calibration corpus, measured on the evaluation text: close, not equal
    assert computed["mlp_candidates_kept"] == pytest.approx(0.7, abs=0.1)
    assert computed["mlp_kept"] == pytest.approx(0.5, abs=0.1) and computed["head_kept"] == 1.0
    assert computed["mlp_weight_share"] == pytest.approx(
        2 / 3 * computed["mlp_candidates_kept"] + 1 / 3 * computed["mlp_kept"])
    assert data["sparse.ppl"] != data["dense.ppl"] and "magnitude thresholds" in capsys.readouterr().out
    _, everything = _bench(tmp_path, tiny_llama, None, **{**settings, "runtime.mlp_keep_input": 1.0,
                                                          "runtime.mlp_density": 1.0})
    assert everything["sparse.ppl"] == pytest.approx(everything["dense.ppl"], rel=1e-5)
    # the same thresholds through the decode loop (CPU reference ops)
    out = tmp_path / "speed.json"
    run_bench(model=str(tiny_llama), json_out=out, config_file="tiny", quality=False,
              overrides={"runtime.device": "cpu", **settings})
    assert json.loads(out.read_text())["speed"]["batches"]["1"]["sparse_ms_per_token"] > 0
    with pytest.raises(DejavuError, match="own MLP rule"):
        _bench(tmp_path, tiny_llama, None, **settings, **{"runtime.mlp_up_weight": 0.4})


def test_bench_attention_thresholds(tmp_path, tiny_llama, tiny_bundle, capsys):
    settings = {"runtime.mlp_keep_input": 0.7, "runtime.mlp_density": 0.5, "runtime.attn_keep_input": 0.6,
                "runtime.calibration_tokens": 512}
    # the bundle's head predictors give way to the attention thresholds
    _, data = _bench(tmp_path, tiny_llama, tiny_bundle, **settings)
    assert data["thresholds"]["keep_attn_input"] == 0.6 and data["head_density"] == 1.0
    computed = data["quality"]["computed"]
    assert computed["attn_input_kept"] == pytest.approx(0.6, abs=0.1)
    assert computed["attn_o_kept"] == pytest.approx(0.6, abs=0.1) and computed["head_kept"] == 1.0
    assert "q/k/v's input kept" in capsys.readouterr().out
    _, mlp_only = _bench(tmp_path, tiny_llama, None, **{**settings, "runtime.attn_keep_input": None})
    assert data["sparse.ppl"] != mlp_only["sparse.ppl"]
    out = tmp_path / "speed.json"
    run_bench(model=str(tiny_llama), json_out=out, config_file="tiny", quality=False,
              overrides={"runtime.device": "cpu", **settings})
    assert json.loads(out.read_text())["speed"]["thresholds"]["keep_attn_input"] == 0.6
    with pytest.raises(DejavuError, match="comes with --mlp-keep-input"):
        _bench(tmp_path, tiny_llama, None, **{**settings, "runtime.mlp_keep_input": None})
    with pytest.raises(DejavuError, match="replace head selection"):
        _bench(tmp_path, tiny_llama, None, **settings, **{"runtime.head_density": 0.5})
