"""train-predictors on synthetic collect directories (train/synthetic.py writes the real format)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dejavu.artifacts import read_manifest, save_tensors, sha256_file
from dejavu.config import RunConfig
from dejavu.errors import DejavuError
from dejavu.predictor import PREDICTOR_TENSORS, LowRankPredictor
from dejavu.train import train as train_mod
from dejavu.train.data import CollectRun, source_layer
from dejavu.train.metrics import selection_metrics
from dejavu.train.synthetic import write_synthetic_collect
from dejavu.train.train import run_train

FAST = {"train.epochs": 10, "train.lr": 0.03, "train.batch_size": 256, "train.rank": 8}


def small_config() -> RunConfig:
    cfg = RunConfig()
    cfg.train.rank, cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = 8, 2, 256, 0.03
    return cfg


@pytest.fixture
def synthetic_run(tmp_path):
    write_synthetic_collect(tmp_path, num_layers=3, train_tokens=1024, eval_tokens=256, shard_tokens=512,
                            config=small_config())
    return tmp_path


def test_planted_rule_is_learned(tmp_path):
    write_synthetic_collect(tmp_path, num_layers=2, train_tokens=2048, eval_tokens=512, config=small_config())
    manifest = run_train(tmp_path, None, FAST)
    metrics = json.loads((tmp_path / "predictors" / "metrics.json").read_text())
    for layer in ("0", "1"):
        assert metrics["layers"][layer]["mlp"]["recall"] > 0.95
        assert metrics["layers"][layer]["mlp"]["mass_kept"] > 0.99
        assert metrics["layers"][layer]["attn"]["recall"] > 0.9
    assert manifest["metrics"]["mlp"]["recall"] > 0.95


def test_outputs_follow_the_format(synthetic_run):
    manifest = run_train(synthetic_run, None, {})
    out = synthetic_run / "predictors"
    assert read_manifest(out, "dejavu.predictors") == manifest
    collect = read_manifest(synthetic_run / "collect", "dejavu.collect")
    assert manifest["parent"]["format"] == "dejavu.collect"
    assert manifest["model"] == collect["model"]
    assert manifest["config"]["train"]["rank"] == 8  # taken from the collect run's config
    for key in ("layers", "rank", "hidden_activation", "mlp_pairing", "head_pairing", "mlp_density",
                "head_density", "metrics"):
        assert key in manifest
    metrics = json.loads((out / "metrics.json").read_text())
    for kind in ("mlp", "attn"):
        for layer in ("0", "1", "2"):
            entry = metrics["layers"][layer][kind]
            assert set(entry) >= {"recall", "precision", "predicted_density", "true_density", "density",
                                  "mass_kept"}
            assert entry["density"] == 0.5 and entry["predicted_density"] == pytest.approx(0.5)
        assert metrics["mean"][kind]["recall"] == pytest.approx(
            sum(metrics["layers"][str(l_)][kind]["recall"] for l_ in range(3)) / 3)
    # where this process's time went (one process here); the layers' phase covers their seconds
    phases = metrics["process_phases"]["0"]
    assert {"accelerator", "check_collect", "layers", "wait_for_others"} <= set(phases)
    assert phases["layers"] >= sum(metrics["train_seconds"].values()) - 0.05

    # The saved tensors are the predictor: rebuilding it reproduces the held-out metrics.
    tensors = load_file(str(out / "layers" / "layer-001.safetensors"))
    assert set(tensors) == {f"{k}.{n}" for k in ("mlp", "attn") for n in PREDICTOR_TENSORS}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    mlp = LowRankPredictor.from_tensors({n: tensors[f"mlp.{n}"] for n in PREDICTOR_TENSORS})
    held_out = CollectRun(synthetic_run).load_layer(1, "eval", "current", "lookahead", "0.5")
    with torch.no_grad():
        again = selection_metrics(mlp(held_out.x_mlp), held_out.mlp_labels, held_out.mlp_act, 0.5)
    assert again["recall"] == pytest.approx(metrics["layers"]["1"]["mlp"]["recall"], abs=1e-6)


def test_flags_override_and_seeded(synthetic_run, tmp_path):
    run_train(synthetic_run, None, {"train.rank": 4})
    first = load_file(str(synthetic_run / "predictors" / "layers" / "layer-002.safetensors"))
    assert first["mlp.w1"].shape == (4, 32)
    run_train(synthetic_run, None, {"train.rank": 4}, overwrite=True)
    second = load_file(str(synthetic_run / "predictors" / "layers" / "layer-002.safetensors"))
    for name in first:
        torch.testing.assert_close(first[name], second[name])


def test_resume_skips_finished_layers(synthetic_run, monkeypatch):
    real = train_mod.train_layer
    calls: list[int] = []

    def interrupted(train, held_out, layer, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(layer)
        return real(train, held_out, layer, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(synthetic_run, None, {})
    out = synthetic_run / "predictors"
    assert not (out / "manifest.json").exists()
    assert calls == [0]
    done = sha256_file(out / "layers" / "layer-000.safetensors")

    def counting(train, held_out, layer, *args, **kwargs):
        calls.append(layer)
        return real(train, held_out, layer, *args, **kwargs)

    calls.clear()
    monkeypatch.setattr(train_mod, "train_layer", counting)
    manifest = run_train(synthetic_run, None, {})
    assert calls == [1, 2]
    assert manifest["layers"] == 3
    assert sha256_file(out / "layers" / "layer-000.safetensors") == done

    # Different settings never silently overwrite finished layers.
    with pytest.raises(DejavuError, match="--overwrite"):
        run_train(synthetic_run, None, {"train.rank": 4})
    assert (out / "manifest.json").exists()


def test_missing_or_corrupt_collect_data(synthetic_run, tmp_path):
    with pytest.raises(DejavuError, match="does not exist"):
        run_train(tmp_path / "nowhere", None, {})
    shard = next((synthetic_run / "collect" / "shards").glob("train-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DejavuError, match="sha256"):
        run_train(synthetic_run, None, {})
    (synthetic_run / "collect" / "manifest.json").unlink()
    with pytest.raises(DejavuError, match="no manifest.json"):
        run_train(synthetic_run, None, {})


def test_unknown_density_lists_the_stored_ones(synthetic_run):
    with pytest.raises(DejavuError, match=r"densities 0\.5, not 0\.3.*--mlp-label-densities 0\.3"):
        run_train(synthetic_run, None, {"train.mlp_density": 0.3})


def test_nan_input_names_the_layer(synthetic_run):
    collect = synthetic_run / "collect"
    manifest = json.loads((collect / "manifest.json").read_text())
    entry = manifest["shards"][0]
    tensors = load_file(str(collect / entry["path"]))
    tensors["input.1"][3, 5] = float("nan")
    digest = save_tensors(collect / entry["path"], tensors)
    size = (collect / entry["path"]).stat().st_size
    for item in (entry, next(f for f in manifest["files"] if f["path"] == entry["path"])):
        item.update(sha256=digest, bytes=size)
    (collect / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DejavuError, match=r"layer 1: input\.1 .*NaN"):
        run_train(synthetic_run, None, {"train.mlp_pairing": "current", "train.head_pairing": "current"})


def test_pairings():
    assert [source_layer(layer, "lookahead") for layer in range(3)] == [0, 0, 1]
    assert [source_layer(layer, "current") for layer in range(3)] == [0, 1, 2]


def test_ranking_loss_learns_too(tmp_path):
    write_synthetic_collect(tmp_path, num_layers=1, train_tokens=2048, eval_tokens=512, config=small_config())
    manifest = run_train(tmp_path, None, {**FAST, "train.loss": "bce+rank"})
    assert manifest["metrics"]["mlp"]["recall"] > 0.9
    with pytest.raises(DejavuError, match="train.loss"):
        run_train(tmp_path, None, {"train.loss": "mse"})


def test_predictor_cost_at_smollm2_shapes():
    smol = {"hidden_size": 576, "intermediate_size": 1536, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64,
            "gated_mlp": True}
    cost = train_mod.predictor_cost(smol, 40)
    assert cost["layer_weight_bytes"] == 2 * (3 * 576 * 1536 + 2 * 576 * 576 + 2 * 576 * 192)
    # The head predictor's rank is capped at its 9 outputs; rank 40 stays under 3 % of a layer.
    assert cost["attn_bytes"] == 2 * (9 * 576 + 9 + 9 * 9 + 9 + 2 * 576)
    assert cost["total_fraction"] < 0.03


def test_cli_reports_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from dejavu.cli.main import app

    result = CliRunner().invoke(app, ["train-predictors", "--run", str(tmp_path)])
    assert result.exit_code == 1
    assert "error:" in result.output and "dejavu collect" in result.output
    assert "Traceback" not in result.output


def test_cpu_threads_share_the_machine_and_stay_out_of_the_training_key(monkeypatch):
    from dejavu.config import RunConfig
    from dejavu.train.train import share_cpu_threads, training_key

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr("os.cpu_count", lambda: 32)
        assert share_cpu_threads(0, 2) == 16 == torch.get_num_threads()
        assert share_cpu_threads(3, 2) == 3
        assert share_cpu_threads(0, 64) == 1
    finally:
        torch.set_num_threads(before)
    cfg, other = RunConfig(), RunConfig()
    other.train.cpu_threads = 7
    parent = {"sha256": "x"}
    assert training_key(cfg, parent) == training_key(other, parent)
