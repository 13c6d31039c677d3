"""The whole pipeline through the CLI on a GPU, as a user with one runs it: collect and train-predictors on
CUDA, export, then bench and generate in the graphed decode loop with the trained bundle (the CPU run of
the same commands is tests/e2e/test_pipeline.py; GPU speed benches elsewhere use random predictors)."""

from __future__ import annotations

import json

import pytest
import torch

from dejavu.runtime.bench import CONTRACT_KEYS

from helpers import CALIB_TXT, EVAL_RAW, run_ok

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_pipeline_through_the_cli_on_the_gpu(tmp_path, tiny_llama):
    from typer.testing import CliRunner

    from dejavu.cli.main import app

    runner = CliRunner()
    run, bundle = tmp_path / "run", tmp_path / "bundle"

    ok = run_ok(runner, app)

    ok("collect", "--config", "tiny", "--model", tiny_llama, "--dataset", CALIB_TXT, "--out", run,
       "--max-tokens", 2048, "--device", "cuda")
    ok("train-predictors", "--run", run)
    metrics = json.loads((run / "predictors" / "metrics.json").read_text())
    assert len(metrics["layers"]) == 3 and 0 < metrics["mean"]["mlp"]["recall"] <= 1
    # collect kept the down inputs (fp8, quantised on the GPU): the output-error loss and metric ran there
    assert metrics["loss"] == "bce+output" and 0 <= metrics["mean"]["mlp"]["oracle_output_error"] < metrics["mean"]["mlp"]["output_error"]
    # all layers tuned together against the dense model on the GPU (bf16, the model dtype there), then
    # exported from RUN/tuned
    ok("tune-predictors", "--config", "tiny", "--run", run, "--device", "cuda")
    tuned = json.loads((run / "tuned" / "manifest.json").read_text())["tuned"]
    assert tuned["device"].startswith("cuda") and tuned["dtype"] == "bfloat16" and tuned["steps"] == 10
    assert 0 <= tuned["after"]["kl"] < 10 and tuned["after"]["dense_ppl"] == pytest.approx(tuned["before"]["dense_ppl"])
    ok("export", "--run", run / "tuned", "--out", bundle)
    assert json.loads((bundle / "manifest.json").read_text())["tuned"]["steps"] == 10
    for dtype in ("float32", "bfloat16"):
        report = tmp_path / f"bench-{dtype}.json"
        out = ok("bench", "--config", "tiny", "--bundle", bundle, "--dataset", EVAL_RAW, "--json", report,
                 "--max-eval-tokens", 256, "--device", "cuda", "--dtype", dtype, "--decode-tokens", 16)
        data = json.loads(report.read_text())
        for key in CONTRACT_KEYS:
            assert key in data, key
        assert data["device"].startswith("cuda") and data["dtype"] == dtype and data["synthetic"] is False
        assert data["speed"]["runtime"] == "cuda-graph" and "perplexity" in out
        assert 1 < data["dense.ppl"] < 1e4 and 1 < data["sparse.ppl"] < 1e4 and 0 <= data["top1_agreement"] <= 1
        assert data["dense"]["ms_per_token"] > 0 and data["sparse"]["ms_per_token"] > 0
    gen = tmp_path / "generate.json"
    ok("generate", "--config", "tiny", "--bundle", bundle, "--prompt", "The city of", "-n", 8, "--compare-dense",
       "--device", "cuda", "--json", gen)
    g = json.loads(gen.read_text())
    assert g["engine"] == "decode-loop (CUDA graph)" and len(g["generations"]) == 1
    row = g["generations"][0]
    assert row["sparse"]["sparse"] and not row["dense"]["sparse"] and 1 <= len(row["sparse"]["token_ids"]) <= 8
