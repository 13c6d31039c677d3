"""`tune-predictors` under torchrun with 2 CPU processes (gloo) tunes what 1 process tunes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dejavu.artifacts import load_tensors
from dejavu.train.tune import run_tune

from helpers import CALIB_TXT, make_predictors_dir, torchrun_cli

SETTINGS = """\
data:
  seq_len: 32
tune:
  steps: 8
  sequences: 2
  eval_sequences: 4
  lr: 0.05
  checkpoint_every: 4
  eval_every: 4
"""


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
@pytest.mark.parametrize("selection", ["topk", "threshold"])
def test_two_processes_tune_what_one_tunes(tmp_path, tiny_llama, selection):
    # score thresholds: each sequence's own quantile, so splitting a step's sequences changes nothing
    corpus = tmp_path / "calib.txt"
    corpus.write_text("".join(CALIB_TXT.read_text().splitlines(keepends=True)[:400]))
    config = tmp_path / "tune.yaml"
    config.write_text(SETTINGS.replace("data:\n", f"data:\n  dataset: {corpus}\n")
                      + f"  mlp_selection: {selection}\n")
    single, double = tmp_path / "single", tmp_path / "double"
    for run in (single, double):
        make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=0.5)

    one = run_tune(single, config_file=str(config), overrides={"model.device": "cpu", "model.dtype": "float32"})
    result = torchrun_cli("tune-predictors", "-r", double, "--config", config, "--device", "cpu",
                          "--dtype", "float32", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((double / "tuned" / "manifest.json").read_text())

    a, b = one["tuned"], two["tuned"]
    assert a["key"] == b["key"] and (a["processes"], b["processes"]) == (1, 2)
    # the held-out sequences split over the processes add up to the same measurement
    assert b["before"]["scored_tokens"] == a["before"]["scored_tokens"] == 4 * 31
    assert b["before"]["kl"] == pytest.approx(a["before"]["kl"], rel=1e-5)
    assert [p["step"] for p in b["history"]] == [p["step"] for p in a["history"]] == [0, 4, 8]
    assert [p["kl"] for p in b["history"]] == pytest.approx([p["kl"] for p in a["history"]], rel=1e-3)
    assert b["best_step"] == a["best_step"]
    for layer in range(2):
        name = f"layer-{layer:03d}.safetensors"
        x, y = load_tensors(single / "tuned" / "layers" / name), load_tensors(double / "tuned" / "layers" / name)
        for key in x:
            torch.testing.assert_close(y[key], x[key], rtol=1e-3, atol=1e-4)
