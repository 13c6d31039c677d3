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
    assert rule_label(_report(mlp_candidate_density=0.85, mlp_selection="threshold")) == \
        "two-stage 0.85 -> 0.5 (score thresholds), heads 1"
    assert rule_label(_report(mlp_selection="threshold", tuned=True)) == \
        "predictor (tuned), MLP 0.5 (score thresholds), heads 1"
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
    # a synthetic preset shares the real model's name; --layers keeps a part of it
    real = _write(tmp_path / "real.json", _report(synthetic=False))
    one, two = (_write(tmp_path / f"s{n}.json", _report(synthetic=True, layers=n, quality=None)) for n in (1, 2))
    run_compare([real, one])
    assert "differ in synthetic (random weights) or real" in capsys.readouterr().out
    run_compare([one, two])
    assert "differ in layers kept (--layers)" in capsys.readouterr().out
    whole = _write(tmp_path / "whole.json", _report(synthetic=True, layers=None, quality=None))
    run_compare([one, whole])  # a whole-model run records no layer count: it was left out of the comparison
    assert "differ in layers kept (--layers)" in capsys.readouterr().out


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


# --- wrong-typed figures: refused before any line of the table ---------------------------------------

@pytest.mark.parametrize("changes, says", [
    ({"sparse": {"ppl": "abc", "ms_per_token": 32.0}}, "sparse.ppl is not a number (got 'abc')"),
    ({"mlp_density": "half"}, "mlp_density is not a number (got 'half')"),
    ({"speedup": "fast"}, "speedup is not a number (got 'fast')"),
    ({"kl": True}, "kl is not a number (got True)"),
    ({"head_density": None}, "head_density is missing or null; compare needs a number"),
    ({"dense": [10.0, 40.0]}, "dense is not an object (got [10.0, 40.0])"),
    ({"quality": {"computed": {"mlp_weight_share": "0.5"}}},
     "quality.computed.mlp_weight_share is not a number (got '0.5')"),
    ({"thresholds": {"keep_input": 0.8, "keep_down_input": "x"}}, "thresholds.keep_down_input is not a number"),
    ({"selection": 3}, "selection is not a string (got 3)"),
])
def test_wrong_typed_values_are_refused_before_printing(tmp_path, capsys, changes, says):
    good = _write(tmp_path / "good.json", _report())
    bad = _write(tmp_path / "bad.json", _report(**changes))
    with pytest.raises(DejavuError) as caught:
        run_compare([good, bad])
    assert str(caught.value).startswith(f"{bad}: {says}")
    assert capsys.readouterr().out == ""


def test_nulls_still_print_as_dashes(tmp_path, capsys):
    a = _write(tmp_path / "a.json", _report(speedup=None, kl=None, top1_agreement=None, quality=None,
                                            dense={"ppl": None, "ms_per_token": None}))
    b = _write(tmp_path / "b.json", _report(mlp_density=None, thresholds={
        "keep_input": 0.8, "keep_down_input": 0.5, "keep_attn_input": None, "allocation": None}))
    rows = run_compare([a, b])["rows"]
    assert rows[0]["speedup"] is None and rows[1]["rule"] == "thresholds 0.8 / 0.5, heads 1"
    assert capsys.readouterr().out.splitlines()[2].count(" - ") >= 4


def test_the_cli_prints_one_error_line_and_no_table(tmp_path, capsys):
    from dejavu.cli.main import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_report(speedup="fast")))
    assert main(["compare", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: {bad}: speedup is not a number (got 'fast')\n" and captured.out == ""


def test_a_thresholds_rule_is_not_printed_as_dense_selection():
    from dejavu.runtime.bench import rule_lines

    line = rule_lines({"selection": "dense", "mlp_density": 0.5, "head_density": 1.0,
                       "thresholds": {"keep_input": 0.8, "keep_down_input": 0.5, "calibration": "c.txt",
                                      "calibration_tokens": 256}})[0]
    assert line.startswith("  selection by magnitude thresholds, every head, MLP density 0.5")
    assert rule_lines({"selection": "dense", "mlp_density": 1.0, "head_density": 1.0})[0].startswith(
        "  selection dense,")
