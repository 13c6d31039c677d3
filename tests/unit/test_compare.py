"""`dejavu compare`: bench reports side by side, and refusals of what is not one."""

from __future__ import annotations

import json

import pytest

from dejavu.errors import DejavuError
from dejavu.runtime.compare import rule_label, run_compare


def _report(**changes) -> dict:
    report = {"model": "smollm2-135m", "device": "cpu", "dtype": "float32", "batch_size": 1, "selection": "predictor",
              "mlp_density": 0.5, "head_density": 1.0, "mlp_up_weight": None, "mlp_candidate_density": None,
              "thresholds": None, "dense": {"ppl": 10.0, "ms_per_token": 40.0},
              "sparse": {"ppl": 12.0, "ms_per_token": 32.0}, "speedup": 1.25, "top1_agreement": 0.8, "kl": 0.1,
              "quality": {"dataset": "wiki.test.raw", "window": 2048, "stride": 1024, "scored_tokens": 2047,
                          "computed": {"mlp_weight_share": 0.5}}}
    report.update(changes)
    return report


def _write(path, report) -> object:
    path.write_text(json.dumps(report))
    return path


def test_rules_are_named_and_compared(tmp_path, capsys):
    a = _write(tmp_path / "a.json", _report())
    b = _write(tmp_path / "b.json", _report(selection="dense", thresholds={
        "keep_input": 0.8, "keep_down_input": 0.5, "keep_attn_input": 0.8}, sparse={"ppl": 10.5, "ms_per_token": 30.0}))
    result = run_compare([a, b], json_out=tmp_path / "out.json")
    out = capsys.readouterr().out
    assert "predictor, MLP 0.5, heads 1" in out and "thresholds 0.8 / 0.5 / attention 0.8" in out
    assert "+20.0 %" in out and "+5.0 %" in out and "note:" not in out
    assert result["rows"][1]["ppl_change"] == pytest.approx(0.05)
    assert json.loads((tmp_path / "out.json").read_text())["rows"][0]["rule"] == "predictor, MLP 0.5, heads 1"


def test_labels_of_every_rule():
    assert rule_label(_report(mlp_up_weight=0.4)) == "exact-up 0.4, MLP 0.5, heads 1"
    assert rule_label(_report(mlp_candidate_density=0.85)) == "two-stage 0.85 -> 0.5, heads 1"
    assert rule_label(_report(thresholds={"keep_input": 0.8, "keep_down_input": 0.5})) == "thresholds 0.8 / 0.5, heads 1"
    assert rule_label(_report(thresholds={"allocation": {"layer_bytes": 0.5}})).startswith("thresholds, 0.5 of each")


def test_reports_measured_differently_are_flagged(tmp_path, capsys):
    a = _write(tmp_path / "a.json", _report())
    b = _write(tmp_path / "b.json", _report(model="other", device="cuda", quality=None, speedup=None,
                                            sparse={"ppl": None, "ms_per_token": None}))
    run_compare([a, b])
    out = capsys.readouterr().out
    assert "note: these reports differ in model, device" in out
    assert out.splitlines()[3].count(" - ") >= 3  # missing figures print as dashes


def test_what_is_not_a_bench_report_is_refused(tmp_path):
    with pytest.raises(DejavuError, match="no bench report at"):
        run_compare([tmp_path / "missing.json"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DejavuError, match="not a JSON bench report"):
        run_compare([tmp_path / "bad.json"])
    with pytest.raises(DejavuError, match="lacks dense, sparse, speedup"):
        run_compare([_write(tmp_path / "metrics.json", {"model": "m", "device": "cpu", "mlp_density": 0.5,
                                                         "head_density": 1.0})])
    with pytest.raises(DejavuError, match="one or more bench reports"):
        run_compare([])
