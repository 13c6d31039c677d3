"""train-predictors on synthetic collect directories (train/synthetic.py writes the real format)."""

from __future__ import annotations

import json
import threading

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


def rewrite_shard(run, edit, index: int = 0) -> None:
    """Change a collect shard's tensors and re-record its hash, so only reading the layer finds the damage."""
    collect = run / "collect"
    manifest = json.loads((collect / "manifest.json").read_text())
    entry = manifest["shards"][index]
    tensors = load_file(str(collect / entry["path"]))
    edit(tensors)
    digest = save_tensors(collect / entry["path"], tensors)
    size = (collect / entry["path"]).stat().st_size
    for item in (entry, next(f for f in manifest["files"] if f["path"] == entry["path"])):
        item.update(sha256=digest, bytes=size)
    (collect / "manifest.json").write_text(json.dumps(manifest))


def finished_layers(run) -> list[int]:
    return sorted(json.loads(p.read_text())["layer"] for p in (run / "predictors" / "progress").glob("layer-*.json"))


@pytest.fixture(params=["0", "1"], ids=["read-when-reached", "read-ahead"])
def prefetch(request, monkeypatch):
    monkeypatch.setenv(train_mod.PREFETCH_ENV, request.param)
    return request.param == "1"


def test_planted_rule_is_learned(tmp_path):
    write_synthetic_collect(tmp_path, num_layers=2, train_tokens=2048, eval_tokens=512, config=small_config())
    manifest = run_train(tmp_path, None, FAST)
    metrics = json.loads((tmp_path / "predictors" / "metrics.json").read_text())
    for layer in ("0", "1"):
        assert metrics["layers"][layer]["mlp"]["recall"] > 0.95
        assert metrics["layers"][layer]["mlp"]["mass_kept"] > 0.99
        assert metrics["layers"][layer]["attn"]["recall"] > 0.9
    assert manifest["metrics"]["mlp"]["recall"] > 0.95


def test_predictors_at_chance_are_warned_about():
    # lr 1e12 on SmolLM2 kept 0.52 of the mass at density 0.5 with no word (a review's find)
    good = {"recall": 0.8, "predicted_density": 0.5}
    at_chance = {"recall": 0.51, "predicted_density": 0.5}
    assert train_mod.chance_warnings({"mlp": good, "attn": good}) == []
    (warning,) = train_mod.chance_warnings({"mlp": at_chance, "attn": good})
    assert warning.startswith("warning: the mlp predictors barely beat a random choice (mean recall 0.510")
    # at density 1 every choice is perfect and at chance at once: nothing to warn about
    assert train_mod.chance_warnings({"attn": {"recall": 1.0, "predicted_density": 1.0}}) == []


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


def test_resume_skips_finished_layers(synthetic_run, monkeypatch, prefetch):
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
    # what a writer killed mid-write leaves (a crash, not the KeyboardInterrupt above, which cleans up): removed
    stale = [out / "layers" / ".layer-001.safetensors.k3x9q2.tmp", out / ".manifest.json.a8b2c1.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    real_read, reads = CollectRun.read_layer, []

    def recording(self, layer, split, *args, **kwargs):
        reads.append((layer, split))
        return real_read(self, layer, split, *args, **kwargs)

    monkeypatch.setattr(CollectRun, "read_layer", recording)
    manifest = run_train(synthetic_run, None, {})
    assert calls == [1, 2]
    assert [layer for layer, split in reads if split == "train"] == [1, 2]  # the finished layer is not read
    assert manifest["layers"] == 3
    assert sha256_file(out / "layers" / "layer-000.safetensors") == done
    assert not any(path.exists() for path in stale)

    # Different settings never silently overwrite finished layers.
    with pytest.raises(DejavuError, match=r"3 layer\(s\) \(0, 1, 2\) trained with train.rank: 8 -> 4.*--overwrite"):
        run_train(synthetic_run, None, {"train.rank": 4})
    assert (out / "manifest.json").exists()
    # a bad value with --overwrite is refused before the finished layers are removed
    with pytest.raises(DejavuError, match="train.lr"):
        run_train(synthetic_run, None, {"train.lr": -1}, overwrite=True)
    assert (out / "manifest.json").exists() and sha256_file(out / "layers" / "layer-000.safetensors") == done


def test_progress_records_of_the_wrong_shape_retrain_their_layers(synthetic_run, monkeypatch):
    """A record edited into another JSON value (a list, or an object without its file) is a missing record,
    not a traceback: its layer is trained again, the others are kept."""
    run_train(synthetic_run, None, {})
    progress = synthetic_run / "predictors" / "progress"
    (progress / "layer-001.json").write_text("[]")
    record = json.loads((progress / "layer-002.json").read_text())
    del record["file"]
    (progress / "layer-002.json").write_text(json.dumps(record))
    real, calls = train_mod.train_layer, []

    def counting(train, held_out, layer, *args, **kwargs):
        calls.append(layer)
        return real(train, held_out, layer, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_layer", counting)
    assert run_train(synthetic_run, None, {})["layers"] == 3
    assert calls == [1, 2]


def test_a_second_train_into_the_same_run_is_refused_while_the_first_runs(synthetic_run):
    from dejavu.artifacts import WriterLock

    lock = synthetic_run / ".predictors.lock"
    other = WriterLock(lock, "another run")
    with pytest.raises(DejavuError, match=r"predictors is being written by another dejavu process"):
        run_train(synthetic_run, None, {"train.rank": 4}, overwrite=True)
    assert not (synthetic_run / "predictors").exists()
    other.release()
    run_train(synthetic_run, None, {})
    assert not lock.exists()
    with pytest.raises(DejavuError, match="train.rank: 8 -> 4"):  # an error releases the lock as well
        run_train(synthetic_run, None, {"train.rank": 4})
    assert not lock.exists()


def test_an_edited_collect_token_count_is_refused(synthetic_run):
    manifest_path = synthetic_run / "collect" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tokens"] = 999999
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DejavuError, match=r"says tokens = 999999, but its shards hold 1280 \(an edited manifest\?\)"):
        run_train(synthetic_run, None, {})
    manifest["tokens"] = 1280
    manifest["shards"][0]["tokens"] = "many"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DejavuError, match="a shard's token count is not a number"):
        run_train(synthetic_run, None, {})


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


def test_a_stale_check_failure_marker_is_cleared(synthetic_run):
    # a marker another process left when its share of the hashes failed (that run then stopped); the
    # next run checks the data again and must not stop on the old marker
    progress = synthetic_run / "predictors" / "progress"
    progress.mkdir(parents=True)
    (progress / f"{train_mod.CHECK_FAILED}-1").touch()
    run_train(synthetic_run, None, {})
    assert not list(progress.glob(f"{train_mod.CHECK_FAILED}-*"))
    assert finished_layers(synthetic_run) == [0, 1, 2]


def test_unknown_density_lists_the_stored_ones(synthetic_run):
    with pytest.raises(DejavuError, match=r"densities 0\.5, not 0\.3.*--mlp-label-densities 0\.3"):
        run_train(synthetic_run, None, {"train.mlp_density": 0.3})


def test_nan_input_names_the_layer(synthetic_run, prefetch, monkeypatch):
    rewrite_shard(synthetic_run, lambda tensors: tensors["input.1"].__setitem__((3, 5), float("nan")))
    cancelled = []
    monkeypatch.setattr(train_mod.CollectCheck, "cancel", lambda self: cancelled.append(True))
    with pytest.raises(DejavuError, match=r"layer 1: input\.1 .*NaN"):
        run_train(synthetic_run, None, {"train.mlp_pairing": "current", "train.head_pairing": "current"})
    assert finished_layers(synthetic_run) == [0]
    assert cancelled  # the background hash check is told to stop, so the process exits at once


def test_a_damaged_later_layer_fails_when_reached_and_earlier_layers_stay(synthetic_run, prefetch):
    rewrite_shard(synthetic_run, lambda tensors: tensors.pop("mlp_labels.2@0.5"), index=1)
    with pytest.raises(DejavuError, match=r"train-r00-00001\.safetensors lacks tensors \['mlp_labels\.2@0\.5'\]"):
        run_train(synthetic_run, None, {})
    assert finished_layers(synthetic_run) == [0, 1]
    assert not (synthetic_run / "predictors" / "manifest.json").exists()


def test_read_ahead_changes_no_result(synthetic_run, monkeypatch):
    results = {}
    for setting in ("0", "1"):
        monkeypatch.setenv(train_mod.PREFETCH_ENV, setting)
        run_train(synthetic_run, None, {}, overwrite=True)
        out = synthetic_run / "predictors"
        metrics = json.loads((out / "metrics.json").read_text())
        tensors = {layer: load_file(str(out / "layers" / f"layer-{layer:03d}.safetensors")) for layer in range(3)}
        results[setting] = (metrics, tensors)
        # train_seconds split into waiting for the data and fitting
        for layer in ("0", "1", "2"):
            parts = [metrics[f"{name}_seconds"][layer] for name in ("load_wait", "fit")]
            assert all(part >= 0 for part in parts)
            assert sum(parts) <= metrics["train_seconds"][layer] + 0.01
    (before, before_tensors), (after, after_tensors) = results["0"], results["1"]
    assert after["layers"] == before["layers"]
    for layer, tensors in before_tensors.items():
        assert all(torch.equal(tensors[name], after_tensors[layer][name]) for name in tensors)


def test_the_next_layer_is_read_while_the_current_one_trains(synthetic_run, monkeypatch):
    monkeypatch.setenv(train_mod.PREFETCH_ENV, "1")
    started = {layer: threading.Event() for layer in range(3)}
    readers: set[str] = set()
    real_read, real_train = CollectRun.read_layer, train_mod.train_layer

    def recording(self, layer, split, *args, **kwargs):
        readers.add(threading.current_thread().name)
        started[layer].set()
        return real_read(self, layer, split, *args, **kwargs)

    def checking(train, held_out, layer, *args, **kwargs):
        if layer + 1 in started:
            assert started[layer + 1].wait(30), f"layer {layer + 1} was not read while layer {layer} trained"
        # never more than the next layer ahead: host memory holds two layers at most
        assert layer + 2 not in started or not started[layer + 2].is_set()
        return real_train(train, held_out, layer, *args, **kwargs)

    monkeypatch.setattr(CollectRun, "read_layer", recording)
    monkeypatch.setattr(train_mod, "train_layer", checking)
    run_train(synthetic_run, None, {})
    assert readers and all(name.startswith("dejavu-prefetch") for name in readers)


def test_read_ahead_is_on_for_accelerators_only_unless_set(monkeypatch):
    monkeypatch.delenv(train_mod.PREFETCH_ENV, raising=False)
    assert train_mod.prefetch_enabled(torch.device("cuda", 0))
    assert not train_mod.prefetch_enabled(torch.device("cpu"))
    monkeypatch.setenv(train_mod.PREFETCH_ENV, "1")
    assert train_mod.prefetch_enabled(torch.device("cpu"))
    monkeypatch.setenv(train_mod.PREFETCH_ENV, "0")
    assert not train_mod.prefetch_enabled(torch.device("cuda", 0))


def _tiny_fit(monkeypatch, bad_step: int | None):
    """fit_predictor on 640 tokens, batch 8, 3 epochs: 80 steps an epoch; the loss at `bad_step` is NaN."""
    real_loss, checks, step = train_mod._loss, [], [0]

    def loss(*args, **kwargs):
        step[0] += 1
        value = real_loss(*args, **kwargs)
        return value * float("nan") if step[0] == bad_step else value

    real_check = train_mod._check_finite

    def counting(*args, **kwargs):
        checks.append(args[3])
        return real_check(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_loss", loss)
    monkeypatch.setattr(train_mod, "_check_finite", counting)
    cfg = small_config()
    cfg.train.epochs, cfg.train.batch_size, cfg.train.loss = 3, 8, "bce"
    gen = torch.Generator().manual_seed(0)
    x, target = torch.randn(640, 16, generator=gen), torch.rand(640, 12, generator=gen) > 0.5
    train_mod.fit_predictor(x, target, cfg=cfg, density=0.5, seed=0, device=torch.device("cpu"),
                            desc="layer 4 mlp", show=False)
    return checks


@pytest.mark.parametrize("bad_step, steps", [(70, "65-80"), (100, "81-128"), (1, "1-64")])
def test_a_nan_loss_is_caught_within_its_check_window(monkeypatch, bad_step, steps):
    with pytest.raises(DejavuError, match=rf"layer 4 mlp: the loss became NaN or infinite within steps {steps} of 240"):
        _tiny_fit(monkeypatch, bad_step)


def test_the_loss_is_checked_every_64_steps_and_at_epoch_ends_not_every_step(monkeypatch):
    assert _tiny_fit(monkeypatch, None) == [64, 80, 128, 160, 192, 240]


def test_a_nan_loss_stops_the_run_naming_the_predictor(synthetic_run, monkeypatch):
    monkeypatch.setattr(train_mod, "_loss", lambda scores, *args: scores.sum() * float("nan"))
    with pytest.raises(DejavuError, match=r"layer 0 mlp: the loss became NaN or infinite within steps 1-4 of 8"):
        run_train(synthetic_run, None, {})
    assert finished_layers(synthetic_run) == []


def test_pairings():
    assert [source_layer(layer, "lookahead") for layer in range(3)] == [0, 0, 1]
    assert [source_layer(layer, "current") for layer in range(3)] == [0, 1, 2]


def test_ranking_loss_learns_too(tmp_path):
    write_synthetic_collect(tmp_path, num_layers=1, train_tokens=2048, eval_tokens=512, config=small_config())
    manifest = run_train(tmp_path, None, {**FAST, "train.loss": "bce+rank"})
    assert manifest["metrics"]["mlp"]["recall"] > 0.9
    with pytest.raises(DejavuError, match="train.loss"):
        run_train(tmp_path, None, {"train.loss": "mse"})


def test_output_loss_keeps_the_neurons_that_carry_the_output():
    """The labels rank neurons by |activation| alone, but half of them write to the output through down
    columns 100x smaller: the bce+output loss learns to leave those out, BCE cannot."""
    from torch.nn import functional as F

    from dejavu.fp8 import quantize_rows
    from dejavu.predictor import topk_mask
    from dejavu.train.metrics import output_metrics

    torch.manual_seed(0)
    tokens, d, n = 4096, 16, 32
    x = torch.randn(tokens, d)
    act = F.silu(x @ torch.randn(n, d).T) * (1 + 0.1 * torch.randn(tokens, n))  # signed, as gated MLPs give
    assert (act < 0).float().mean() > 0.2
    w_down = torch.randn(8, n)
    w_down[:, n // 2:] *= 0.01
    labels = topk_mask(act, 0.5)
    q, scale = quantize_rows(act)
    errors = {}
    for loss in ("bce", "bce+output"):
        cfg = small_config()
        cfg.train.epochs, cfg.train.loss = 10, loss
        pred = train_mod.fit_predictor(x, labels, cfg=cfg, density=0.5, seed=0, device=torch.device("cpu"), desc="l",
                                       show=False, down=(q, scale, w_down) if loss == "bce+output" else None)
        errors[loss] = output_metrics(train_mod.predict(pred, x, torch.device("cpu")), q, scale, w_down, 0.5)
    assert errors["bce+output"]["output_error"] < 0.6 * errors["bce"]["output_error"]
    assert errors["bce"]["oracle_output_error"] == errors["bce+output"]["oracle_output_error"] < 0.03


def test_replicas_split_the_output_rows_as_the_batch():
    """Each replica's output-term rows are the first of its own rows, and together they are the batch's
    first OUTPUT_ROWS, so the averaged gradient is the one-process run's."""
    batch = torch.randperm(1000)
    mine, rows = train_mod.split_batch(batch, None)
    assert torch.equal(mine, batch) and rows == train_mod.OUTPUT_ROWS
    for size in (2, 3):
        parts = []
        for member in range(size):
            mine, rows = train_mod.split_batch(batch, train_mod.Replicas(None, size, member))
            assert torch.equal(mine, batch[member::size])
            parts.append(mine[:rows])
        assert sorted(torch.cat(parts).tolist()) == sorted(batch[:train_mod.OUTPUT_ROWS].tolist())
    small = torch.arange(100)  # a last batch shorter than OUTPUT_ROWS
    assert train_mod.split_batch(small, train_mod.Replicas(None, 2, 1))[1] == 50


def test_output_weight_is_part_of_the_key_only_for_the_output_loss():
    """Layers trained before output_weight existed (loss bce) keep their key; under bce its value is moot."""
    parent = {"sha256": "c" * 64}
    cfg = RunConfig()
    cfg.train.loss = "bce"
    before = train_mod.training_key(cfg, parent)
    cfg.train.output_weight = 3.0
    assert train_mod.training_key(cfg, parent) == before and "output_weight" not in train_mod.training_inputs(
        cfg, parent)["train"]
    cfg.train.loss = "bce+output"
    keyed = train_mod.training_key(cfg, parent)
    cfg.train.output_weight = 1.0
    assert train_mod.training_key(cfg, parent) != keyed
    with pytest.raises(DejavuError, match="cannot train with loss 'auto'"):
        cfg.train.loss = "auto"
        train_mod.fit_predictor(torch.randn(64, 4), torch.rand(64, 6) > 0.5, cfg=cfg, density=0.5, seed=0,
                                device=torch.device("cpu"), desc="l", show=False)


def test_auto_loss_falls_back_to_bce_without_down_inputs(synthetic_run, capsys):
    run_train(synthetic_run, None, {})
    metrics = json.loads((synthetic_run / "predictors" / "metrics.json").read_text())
    assert metrics["loss"] == "bce" and "output_error" not in metrics["mean"]["mlp"]
    assert "has no MLP down inputs" in capsys.readouterr().out
    with pytest.raises(DejavuError, match="--loss bce\\+output needs the MLP down inputs"):
        run_train(synthetic_run, None, {"train.loss": "bce+output"}, overwrite=True)
    with pytest.raises(DejavuError, match="train.output_weight must be a finite number of 0 or more"):
        run_train(synthetic_run, None, {"train.output_weight": -1.0})


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


def test_a_nan_output_weight_is_refused(synthetic_run):
    # NaN compares false with 0: the output-error term was silently off while the manifest said bce+output
    with pytest.raises(DejavuError, match="train.output_weight must be a finite number of 0 or more, got nan"):
        run_train(synthetic_run, None, {"train.output_weight": float("nan")})
