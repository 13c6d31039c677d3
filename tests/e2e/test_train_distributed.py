"""The same train-predictors command under torchrun with 2 CPU processes (gloo) matches 1 process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dejavu.artifacts import read_manifest
from dejavu.config import RunConfig
from dejavu.train.synthetic import write_synthetic_collect
from dejavu.train.train import run_train

from helpers import torchrun_cli


def _config() -> RunConfig:
    cfg = RunConfig()
    cfg.train.rank, cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = 8, 3, 256, 0.03
    return cfg


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_processes_match_one(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    for run in (single, double):
        write_synthetic_collect(run, num_layers=3, train_tokens=1024, eval_tokens=256, config=_config())

    run_train(single, None, {})
    result = torchrun_cli("train-predictors", "-r", double)
    assert result.returncode == 0, result.stderr[-3000:]

    one = json.loads((single / "predictors" / "metrics.json").read_text())
    two = json.loads((double / "predictors" / "metrics.json").read_text())
    assert set(one["layers"]) == set(two["layers"]) == {"0", "1", "2"}
    for layer in one["layers"]:
        for kind in ("mlp", "attn"):
            for key, value in one["layers"][layer][kind].items():
                assert two["layers"][layer][kind][key] == pytest.approx(value, abs=0.02), (layer, kind, key)
    # Each process trained its own layers (l % 2), and they are the same predictors.
    processes = {json.loads((double / "predictors" / "progress" / f"layer-{i:03d}.json").read_text())["process"]
                 for i in range(3)}
    assert processes == {0, 1}
    for i in range(3):
        a = load_file(str(single / "predictors" / "layers" / f"layer-{i:03d}.safetensors"))
        b = load_file(str(double / "predictors" / "layers" / f"layer-{i:03d}.safetensors"))
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=2e-3, rtol=2e-2)
    assert read_manifest(double / "predictors", "dejavu.predictors")["layers"] == 3


def test_cli_runs_in_a_subprocess(tmp_path):
    write_synthetic_collect(tmp_path, num_layers=1, train_tokens=512, eval_tokens=256, config=_config())
    result = subprocess.run([sys.executable, "-m", "dejavu.cli.main", "train-predictors", "--run", str(tmp_path),
                             "--mlp-density", "0.5", "--head-density", "0.25", "--rank", "4"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mass kept" in result.stdout + result.stderr
    manifest = read_manifest(tmp_path / "predictors", "dejavu.predictors")
    assert manifest["head_density"] == 0.25 and manifest["rank"] == 4


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_processes_share_the_hash_check_and_fail_together(tmp_path):
    write_synthetic_collect(tmp_path, num_layers=2, train_tokens=1024, eval_tokens=256, config=_config())
    files = read_manifest(tmp_path / "collect", "dejavu.collect")["files"]
    assert len(files) >= 2
    # The second listed file is hashed by process 1 only: process 0 learns of it through the reduce.
    damaged = tmp_path / "collect" / files[1]["path"]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    result = torchrun_cli("train-predictors", "-r", tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "does not match its sha256" in output and "another process" in output
    assert not (tmp_path / "predictors" / "manifest.json").exists()
    # the hashes are checked beside training: every process removes the layers it trained from that data
    assert not list((tmp_path / "predictors" / "progress").glob("layer-*.json"))
    assert not list((tmp_path / "predictors" / "layers").glob("*.safetensors"))


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
@pytest.mark.parametrize("down_inputs", [False, True], ids=["bce", "bce+output"])
def test_more_processes_than_layers_share_a_layer(tmp_path, down_inputs):
    """With the down inputs, the loss is bce+output: each replica takes its share of the output term's rows."""
    cfg = _config()
    cfg.train.layers = [1]
    if down_inputs:  # batches larger than the output term's 256 rows, which the replicas must then split
        cfg.train.batch_size = 512
    single, double = tmp_path / "single", tmp_path / "double"
    for run in (single, double):
        write_synthetic_collect(run, num_layers=2, train_tokens=1024, eval_tokens=256, config=cfg,
                                down_inputs=down_inputs)
    run_train(single, None, {})
    result = torchrun_cli("train-predictors", "-r", double)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((double / "predictors" / "progress" / "layer-001.json").read_text())
    assert record["replicas"] == 2 and record["process"] == 0
    # Same global batches, gradients averaged over two halves: the one-process predictor again.
    a = load_file(str(single / "predictors" / "layers" / "layer-001.safetensors"))
    b = load_file(str(double / "predictors" / "layers" / "layer-001.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-3, rtol=2e-2)
    metrics = json.loads((double / "predictors" / "metrics.json").read_text())
    assert metrics["loss"] == ("bce+output" if down_inputs else "bce")
    one = json.loads((single / "predictors" / "metrics.json").read_text())["layers"]["1"]
    two = metrics["layers"]["1"]
    for kind in ("mlp", "attn"):
        for key, value in one[kind].items():
            assert two[kind][key] == pytest.approx(value, abs=0.02), (kind, key)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_processes_stop_together_when_another_run_holds_the_stage(tmp_path):
    """Only the main process takes the stage's lock; the other learns of a refusal through a collective instead of
    waiting at a barrier for it."""
    from dejavu.artifacts import WriterLock

    write_synthetic_collect(tmp_path, num_layers=2, train_tokens=1024, eval_tokens=256, config=_config())
    with WriterLock(tmp_path / ".predictors.lock", "another run"):
        result = torchrun_cli("train-predictors", "-r", tmp_path, timeout=180)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "is being written by another dejavu process" in output
    assert not (tmp_path / "predictors").exists()
