"""The whole pipeline through the CLI on a tiny llama: collect -> train-predictors -> export -> bench."""

from __future__ import annotations

import json

import pytest

from dejavu.runtime.bench import CONTRACT_KEYS

from helpers import CALIB_TXT, EVAL_RAW, make_tiny_model, run_ok


@pytest.mark.slow
def test_pipeline_through_the_cli(tmp_path, tiny_llama, tiny_tokenizer):
    from typer.testing import CliRunner

    from dejavu.cli.main import app

    runner = CliRunner()
    run, bundle, report = tmp_path / "run", tmp_path / "bundle", tmp_path / "bench.json"

    ok = run_ok(runner, app)

    ok("collect", "--config", "tiny", "--model", tiny_llama, "--dataset", CALIB_TXT, "--out", run,
       "--max-tokens", 1024, "--device", "cpu")
    ok("train-predictors", "--run", run)
    # collect kept the MLP's down inputs, so "auto" trained with the output-error term and reports it
    metrics = json.loads((run / "predictors" / "metrics.json").read_text())
    assert metrics["loss"] == "bce+output" and metrics["output_weight"] == 1.0
    for layer in metrics["layers"].values():
        assert 0 <= layer["mlp"]["oracle_output_error"] <= layer["mlp"]["output_error"]
    # optional end-to-end tuning, exported from RUN/tuned
    out = ok("tune-predictors", "--config", "tiny", "--run", run)
    assert "held-out calibration text" in out and (run / "tuned" / "manifest.json").is_file()
    ok("export", "--run", run / "tuned", "--out", bundle)
    out = ok("bench", "--config", "tiny", "--bundle", bundle, "--dataset", EVAL_RAW, "--json", report,
             "--max-eval-tokens", 256, "--device", "cpu")
    assert "perplexity" in out
    data = json.loads(report.read_text())
    assert data["tuned"] is True and "selection predictor (tuned predictors)" in out
    for key in CONTRACT_KEYS:
        assert key in data, key
    assert data["model"] == str(tiny_llama)  # the bundle's model, since --model was not given
    assert data["synthetic"] is False and data["mlp_density"] == 0.5
    assert data["dense.ppl"] > 1 and data["sparse.ppl"] > 1 and 0 <= data["top1_agreement"] <= 1
    assert data["dense"]["ms_per_token"] > 0 and data["sparse"]["ms_per_token"] > 0 and data["speedup"] > 0
    # Exact-up selection through the CLI: quality and decode-loop speed, its bytes reported.
    up_report = tmp_path / "bench-up.json"
    out = ok("bench", "--config", "tiny", "--bundle", bundle, "--dataset", EVAL_RAW, "--json", up_report,
             "--max-eval-tokens", 256, "--device", "cpu", "--mlp-up-weight", 0.4)
    up = json.loads(up_report.read_text())
    assert "exact-up MLP" in out and up["mlp_up_weight"] == 0.4 and up["sparse.ppl"] > 1
    assert up["sparse"]["ms_per_token"] > 0 and up["speed"]["mlp_up_weight"] == 0.4
    # all of up is read: more bytes per step than the plain predictor's selection at the same density
    first = lambda report: report["speed"]["batches"]["1"]  # noqa: E731
    assert first(up)["sparse_bytes_per_step"] > first(data)["sparse_bytes_per_step"]
    assert up["quality"]["computed"]["mlp_weight_share"] == pytest.approx(
        1 / 3 + 2 / 3 * up["quality"]["computed"]["mlp_kept"])
    # The two reports side by side, as `make demo` ends.
    table = ok("compare", report, up_report, "--json", tmp_path / "compare.json")
    assert "predictor (tuned), MLP 0.5" in table and "exact-up 0.4 (tuned), MLP 0.5" in table and "note:" not in table
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert [r["sparse_ppl"] for r in rows] == [data["sparse.ppl"], up["sparse.ppl"]]
    # The bundle drives generation: decode loop, sparse and dense side by side, JSON beside.
    gen = tmp_path / "generate.json"
    out = ok("generate", "--config", "tiny", "--bundle", bundle, "--prompt", "The city of", "-p", "In 1999",
             "-n", 8, "--compare-dense", "--device", "cpu", "--json", gen)
    g = json.loads(gen.read_text())
    assert g["engine"] == "decode-loop (eager)" and g["mlp_density"] == 0.5 and len(g["generations"]) == 2
    assert all(1 <= len(r["sparse"]["token_ids"]) <= 8 and r["sparse"]["sparse"] and not r["dense"]["sparse"]
               for r in g["generations"])
    assert out.count("sparse (") == 2 and out.count("dense (") == 2
    # the same two prompts as one batch: dense greedy tokens as one at a time
    batched = tmp_path / "generate-batch.json"
    (tmp_path / "prompts.txt").write_text("The city of\nIn 1999\n")
    out = ok("generate", "--config", "tiny", "--bundle", bundle, "--prompt-file", tmp_path / "prompts.txt",
             "-n", 8, "--compare-dense", "--device", "cpu", "--batch-size", 2, "--json", batched)
    gb = json.loads(batched.read_text())
    assert gb["batch_size"] == 2 and all(r["sparse"]["batch_size"] == 2 for r in gb["generations"])
    assert [r["dense"]["token_ids"] for r in gb["generations"]] == [r["dense"]["token_ids"] for r in g["generations"]]
    assert "ms/step of 2" in out and out.count("prompt: ") == 2
    refused = runner.invoke(app, ["generate", "--config", "tiny", "--bundle", str(bundle), "-p", "x", "--stream",
                                  "--batch-size", "2"])
    assert refused.exit_code == 1 and "error: --stream prints one generation" in refused.output
    streamed = ok("generate", "--config", "tiny", "--bundle", bundle, "-p", "The city of", "-n", 8, "--stream",
                  "--compare-dense", "--device", "cpu")
    assert "\nsparse: " in streamed and "\ndense: " in streamed and "tokens, " in streamed
    assert streamed.count("prompt: The city of") == 1
    refused = runner.invoke(app, ["generate", "--config", "tiny", "--model", str(tiny_llama), "-p", "x"])
    assert refused.exit_code == 1 and "error: generate needs --bundle" in refused.output
    # The bundle refuses another model of the same shape, with a one-line error.
    other = make_tiny_model(tmp_path / "other", "llama", tiny_tokenizer, seed=1)
    refused = runner.invoke(app, ["bench", "--config", "tiny", "--bundle", str(bundle), "--model", str(other)])
    assert refused.exit_code == 1 and "error: bundle" in refused.output and "other weights" in refused.output
