"""Mistakes a new user makes (found by an audit of the CLI): each is refused before anything is lost."""

from __future__ import annotations

import json
import os

import pytest

from dejavu.config import load_config
from dejavu.errors import DejavuError
from dejavu.export.bundle import load_bundle, run_export

from helpers import make_predictors_dir


@pytest.mark.parametrize("override, message", [
    ({"runtime.mlp_density": "abc"}, "expected a number"),
    ({"model.name": [1, 2]}, "expected a string"),
    ({"model.device": 5}, "must be auto, cpu, cuda"),
    ({"runtime.device": "gpu"}, "must be auto, cpu, cuda"),
    ({"train.lr": -1}, "train.lr"),
    ({"train.lr": float("nan")}, "train.lr"),
    ({"train.weight_decay": -0.1}, "weight_decay"),
    ({"tune.mlp_density": 1.5}, "tune.mlp_density"),
])
def test_bad_config_values_are_one_line_errors(override, message):
    with pytest.raises(DejavuError, match=message):
        load_config(None, override)


def test_the_default_corpus_is_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dataset = load_config(None, {}).data.dataset
    assert os.path.isabs(dataset) and os.path.isfile(dataset)
    assert load_config(None, {"data.dataset": "corpus.txt"}).data.dataset == "corpus.txt"  # others stay as given


def test_export_never_writes_over_another_stage_or_foreign_files(tmp_path, tiny_llama, capsys):
    make_predictors_dir(tmp_path, tiny_llama)
    collect = tmp_path / "collect"
    collect.mkdir()
    (collect / "manifest.json").write_text(json.dumps({"format": "dejavu.collect"}))
    with pytest.raises(DejavuError, match="dejavu.collect manifest, not a bundle"):
        run_export(tmp_path, collect)
    assert json.loads((collect / "manifest.json").read_text())["format"] == "dejavu.collect"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(DejavuError, match=r"already holds other files \(todo.txt\)"):
        run_export(tmp_path, notes)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DejavuError, match="is a file"):
        run_export(tmp_path, tmp_path / "a-file")
    run_export(tmp_path, tmp_path / "bundle")
    assert "replacing" not in capsys.readouterr().out
    run_export(tmp_path, tmp_path / "bundle")
    assert "replacing the bundle at" in capsys.readouterr().out


def test_export_refuses_candidates_below_the_final_density(tmp_path, tiny_llama):
    make_predictors_dir(tmp_path, tiny_llama, mlp_density=0.5)
    with pytest.raises(DejavuError, match="candidate-density 0.3 is below the MLP density 0.5"):
        run_export(tmp_path, tmp_path / "bundle", overrides={"export.mlp_candidate_density": 0.3})
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("key, value", [("mlp_density", 7), ("head_density", "abc"),
                                        ("mlp_density_per_layer", [0.5, 2.0, 0.5])])
def test_an_edited_manifest_density_is_refused(tmp_path, tiny_llama, key, value):
    make_predictors_dir(tmp_path, tiny_llama)
    run_export(tmp_path, tmp_path / "bundle")
    path = tmp_path / "bundle" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest[key] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(DejavuError, match=f"{key}.*edited manifest"):
        load_bundle(tmp_path / "bundle")


def test_a_run_directory_given_as_bundle_points_to_export(tmp_path, tiny_llama):
    make_predictors_dir(tmp_path, tiny_llama)
    with pytest.raises(DejavuError, match="is a training run, not a bundle: write one with `dejavu export"):
        load_bundle(tmp_path)


def test_bench_checks_its_json_path_before_measuring(tmp_path, tiny_llama, monkeypatch):
    from dejavu.runtime import bench

    def never(*args, **kwargs):
        raise AssertionError("measured before checking --json")

    monkeypatch.setattr(bench, "_model_bench", never)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DejavuError, match="cannot write --json"):
        bench.run_bench(model=str(tiny_llama), json_out=blocker / "report.json", config_file="tiny")
    with pytest.raises(DejavuError, match="is a directory"):
        bench.run_bench(model=str(tiny_llama), json_out=tmp_path, config_file="tiny")


def test_bench_refuses_to_move_a_bundled_threshold_by_density(tmp_path, tiny_llama):
    from dejavu.runtime.bench import run_bench

    from helpers import CALIB_TXT, EVAL_RAW

    run_export(None, tmp_path / "bundle", config_file="tiny", model_name=str(tiny_llama),
               overrides={"export.mlp_keep_input": 0.7, "data.dataset": str(CALIB_TXT),
                          "export.calibration_tokens": 256})
    with pytest.raises(DejavuError, match="--mlp-density cannot move"):
        run_bench(model=str(tiny_llama), bundle=tmp_path / "bundle", dataset=str(EVAL_RAW), config_file="tiny",
                  speed=False, overrides={"runtime.mlp_density": 0.3, "runtime.device": "cpu",
                                          "runtime.max_eval_tokens": 64})


def test_written_files_follow_the_umask(tmp_path):
    import torch

    from dejavu.artifacts import FILE_MODE, atomic_write_json, save_tensors

    mask = os.umask(0)
    os.umask(mask)
    assert FILE_MODE == 0o666 & ~mask  # not mkstemp's owner-only 0600
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    save_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == FILE_MODE
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == FILE_MODE


@pytest.mark.parametrize("args, message", [
    (["bench", "--no-quality", "--no-speed"], "nothing to measure"),
    (["bench", "--synthetic", "llama-2-7b", "--bundle", "b", "--no-speed"], "drop --bundle"),
    (["bench", "--synthetic", "smollm2-135m", "--layers", "2", "--no-speed"], "measures speed only: drop --no-speed"),
    (["bench", "--selection", "oracle", "--mlp-up-weight", "0.4"], "does not use them"),
    (["bench", "--batch-sizes", "abc"], "--batch-sizes: expected comma-separated integers"),
    (["collect", "-o", "x", "--mlp-label-densities", "0.5,abc"], "--mlp-label-densities: expected comma-separated"),
])
def test_conflicting_or_malformed_flags_are_one_line_errors(args, message, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dejavu.cli.main import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_repeated_label_densities_are_labelled_once():
    from dejavu.cli.main import _numbers

    assert _numbers("0.5,0.3,0.5", float, "--mlp-label-densities") == [0.5, 0.3]


def test_help_shows_the_shipped_defaults():
    from typer.testing import CliRunner

    from dejavu.cli.main import app
    from dejavu.config import load_config

    shipped = load_config(None, {})
    out = CliRunner().invoke(app, ["collect", "--help"], env={"COLUMNS": "200"}).output
    assert f"(default: {shipped.collect.max_tokens})" in out
    out = CliRunner().invoke(app, ["train-predictors", "--help"], env={"COLUMNS": "200"}).output
    assert f"(default: {shipped.train.rank})" in out and "run's config" in out
    out = CliRunner().invoke(app, ["tune-predictors", "--help"], env={"COLUMNS": "200"}).output
    assert f"(default: {shipped.tune.steps})" in out and "RUN/tuned" in out
    out = " ".join(CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "--run RUN/tuned" in out
    # bench's help lists every synthetic preset (kept by hand: --help must not import torch)
    from dejavu.runtime.synthetic import PRESETS

    out = " ".join(CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200"}).output.split())
    assert all(name in out for name in PRESETS)


def test_bad_yaml_is_one_line_with_its_position(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  rank: [1\n  lr: 2\n")
    with pytest.raises(DejavuError, match=r"not valid YAML \(line \d+, column \d+\)") as caught:
        load_config(bad, {})
    assert "\n" not in str(caught.value)


def test_bench_says_when_the_corpus_is_shorter_than_asked(tmp_path, tiny_llama, capsys):
    from dejavu.runtime.bench import run_bench

    short = tmp_path / "short.txt"
    short.write_text("A short evaluation text of a few words only.\n")
    run_bench(model=str(tiny_llama), dataset=str(short), config_file="tiny", speed=False,
              overrides={"runtime.selection": "dense", "runtime.max_eval_tokens": 256, "runtime.device": "cpu"})
    assert "holds only" in capsys.readouterr().out


def test_bench_reads_an_evaluation_field_and_split(tmp_path, tiny_llama):
    from dejavu.runtime.bench import run_bench

    from helpers import EVAL_RAW

    lines = EVAL_RAW.read_text().splitlines()[:400]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"body": line}) + "\n" for line in lines if line.strip()))
    common = dict(model=str(tiny_llama), dataset=str(tmp_path / "eval.jsonl"), config_file="tiny", speed=False)
    settings = {"runtime.selection": "dense", "runtime.max_eval_tokens": 128, "runtime.device": "cpu"}
    with pytest.raises(DejavuError, match="body|text"):
        run_bench(**common, overrides=settings)  # no "text" field
    report = run_bench(**common, overrides={**settings, "runtime.eval_text_field": "body"})
    assert report["quality"]["scored_tokens"] > 0


@pytest.mark.parametrize("argv,says", [
    (["compare"], "error: Missing argument 'REPORT.json'"),
    (["bench", "--max-eval-tokens", "abc"], "error: Invalid value for '--max-eval-tokens'"),
    (["bench", "--frobnicate"], "error: No such option: --frobnicate (see `dejavu bench --help`)"),
    (["nope"], "error: No such command 'nope'"),
])
def test_usage_errors_are_one_line_too(capsys, argv, says):
    from dejavu.cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(says) and err.count("\n") == 1 and "Traceback" not in err


def test_generate_needs_a_prompt_and_reads_prompt_files(capsys, tmp_path):
    from dejavu.cli.main import main
    from dejavu.runtime.generate import read_prompt_file

    assert main(["generate"]) == 1
    assert capsys.readouterr().err == "error: give a prompt: --prompt TEXT (repeatable) or --prompt-file FILE\n"
    assert main(["generate", "--prompt-file", str(tmp_path / "missing.txt")]) == 1
    assert "error: no prompt file at" in capsys.readouterr().err
    (tmp_path / "prompts.txt").write_text("The city of\n\n  \nIn 1999,\r\n")
    assert read_prompt_file(tmp_path / "prompts.txt") == ["The city of", "In 1999,"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DejavuError, match="holds no prompts"):
        read_prompt_file(tmp_path / "empty.txt")


def test_help_shows_flags_without_a_value_placeholder(capsys):
    from dejavu.cli.main import main

    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--compare-dense " in out and "<bool>" not in out and "--max-new-tokens <int>" in out


def test_json_reports_never_overwrite_inputs_or_artifacts(capsys, tmp_path, tiny_llama):
    """--json is checked before any work: not one of the command's inputs, not inside a bundle or a run
    stage (a directory with a dejavu manifest), and for bench not a .png (its plot's name)."""
    from dejavu.cli.main import main

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"format": "dejavu.bundle", "format_version": 1}))
    (bundle / "predictors.safetensors").write_bytes(b"tensors")
    report = tmp_path / "report.json"
    report.write_text("{}")
    for argv, says in (
        (["compare", str(report), "--json", str(report)], "would overwrite the command's own input"),
        (["compare", str(report), "--json", str(bundle / "table.json")], "would write into a dejavu artifact"),
        (["generate", "-b", str(bundle), "-p", "hi", "--json", str(bundle / "predictors.safetensors")],
         "would overwrite the command's own input"),
        (["bench", "-b", str(bundle), "--json", str(bundle / "manifest.json")], "would overwrite"),
        (["bench", "--model", str(tiny_llama), "--selection", "dense", "--json", str(tmp_path / "r.png")],
         "give the report a .json name"),
    ):
        assert main(argv) == 1, argv
        assert says in capsys.readouterr().err, argv
    assert (bundle / "predictors.safetensors").read_bytes() == b"tensors" and report.read_text() == "{}"


@pytest.mark.parametrize("argv,says", [
    (["bench", "--selection", "dense", "--no-speed", "--batch-sizes", "0"], "runtime.batch_sizes (--batch-sizes)"),
    (["generate", "-p", "hi", "--mlp-candidate-density", "0.8", "--mlp-up-weight", "0.4"], "choose one MLP rule"),
    (["bench", "--mlp-candidate-density", "0.3", "--mlp-density", "0.5"], "the candidates must include the final set"),
    (["export", "--run", "nowhere", "--out", "b", "--calibration", "c.txt"], "--calibration is used only to calibrate"),
    (["export", "--run", "nowhere", "--out", "b", "--model", "m"], "--model is used only to calibrate"),
    (["export", "--run", "nowhere", "--out", "b", "--calibration-tokens", "256"],
     "--calibration-tokens is used only to calibrate"),
    (["bench", "--calibration-tokens", "256"], "--calibration-tokens is used only to calibrate"),
    (["bench", "--decode-tokens", "0"], "runtime.decode_tokens (--decode-tokens) must be at least 1"),
    (["generate", "-p", "hi", "--calibration", "c.txt"], "--calibration is used only to calibrate"),
    (["generate", "-p", "hi", "--calibration-tokens", "256"], "--calibration-tokens is used only to calibrate"),
    (["generate", "--prompt-file", "."], "--prompt-file . is a directory"),
])
def test_bad_numbers_and_rule_mixes_are_refused_before_loading(capsys, argv, says):
    from dejavu.cli.main import main

    assert main(argv) == 1
    assert says in capsys.readouterr().err
    with pytest.raises(DejavuError, match=r"train.cpu_threads \(--cpu-threads\) must be 0"):
        load_config(None, {"train.cpu_threads": -2})


def test_version_and_interruptions(capsys, monkeypatch):
    from dejavu.cli import main as cli

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("dejavu ")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # only the stages that keep finished work promise a resume
    monkeypatch.setattr("dejavu.runtime.compare.run_compare", interrupted)
    assert cli.main(["compare", "x.json"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    monkeypatch.setattr("dejavu.collect.collect.run_collect", interrupted)
    assert cli.main(["collect", "--out", "nowhere"]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err


def test_flags_of_a_measurement_switched_off_are_noted(monkeypatch, capsys):
    from dejavu.cli.main import main

    monkeypatch.setattr("dejavu.runtime.bench.run_bench", lambda **kwargs: None)
    assert main(["bench", "--no-speed", "--prompt-len", "32", "--warmup", "2", "--max-eval-tokens", "64"]) == 0
    err = capsys.readouterr().err
    assert "note: --prompt-len, --warmup set what a measurement switched off here would use" in err
    assert "--max-eval-tokens" not in err  # quality still runs


def test_review26_inputs_and_numbers_are_refused_before_work(capsys, tmp_path, tiny_llama):
    """Found by session 26's audit: --json over a corpus or a config, a calibration budget below 1, a negative
    exact-up weight, --mlp-predictor-group alone, collect into a bundle, and train-predictors on one."""
    from dejavu.cli.main import main

    corpus = tmp_path / "eval.txt"
    corpus.write_text("Some evaluation text. " * 50)
    config = tmp_path / "mine.yaml"
    config.write_text("model:\n  device: cpu\n")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"format": "dejavu.bundle", "format_version": 1}))
    for argv, says in (
        (["bench", "--model", str(tiny_llama), "--selection", "dense", "-d", str(corpus), "--json", str(corpus)],
         "would overwrite the command's own input"),
        (["bench", "--model", str(tiny_llama), "--selection", "dense", "-c", str(config), "--json", str(config)],
         "would overwrite the command's own input"),
        (["bench", "--model", str(tiny_llama), "--selection", "dense", "--json", str(tmp_path / "mine.yaml")],
         "exists and is not a JSON report"),
        (["export", "--model", "m", "--out", str(tmp_path / "b"), "--mlp-keep-input", "0.8",
          "--calibration-tokens", "-5"], "export.calibration_tokens (--calibration-tokens) must be at least 1"),
        (["bench", "--mlp-keep-input", "0.8", "--calibration-tokens", "0"],
         "runtime.calibration_tokens (--calibration-tokens) must be at least 1"),
        (["generate", "-p", "hi", "--mlp-up-weight", "-1"], "must be a finite number >= 0, got -1"),
        (["export", "--model", str(tiny_llama), "--out", str(tmp_path / "b"), "--mlp-predictor-group", "32"],
         "--mlp-predictor-group sets the quantized predictors' group"),
        (["bench", "--model", str(tiny_llama), "--selection", "dense", "--json", str(tiny_llama / "config.json")],
         "would overwrite the command's own input"),
        (["collect", "--out", str(bundle), "-c", "tiny", "-m", str(tiny_llama)], "is inside a dejavu artifact"),
        (["train-predictors", "--run", str(bundle), "-c", "tiny"], "is inside a dejavu artifact"),
    ):
        assert main(argv) == 1, argv
        assert says in capsys.readouterr().err, argv
    assert corpus.read_text().startswith("Some evaluation text.") and config.read_text().startswith("model:")
    assert not (bundle / "collect").exists()


def test_an_earlier_report_may_be_overwritten_but_not_other_files(tmp_path):
    from dejavu.artifacts import check_report_path

    report = tmp_path / "r.json"
    report.write_text('{"dense_ppl": 1}')
    check_report_path(report)  # an earlier report: rewritten
    (tmp_path / "fresh.json").write_text("")
    check_report_path(tmp_path / "fresh.json")  # an empty file (mktemp) too
    for name, content in (("list.json", "[1, 2]"), ("corpus.txt", "text"), ("model.bin", "\x00\x01")):
        (tmp_path / name).write_text(content)
        with pytest.raises(DejavuError, match="exists and is not a JSON report"):
            check_report_path(tmp_path / name)


def test_a_preset_named_like_a_folder_does_not_block_a_report_there(tmp_path, monkeypatch):
    from dejavu.config import load_config, report_inputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    inputs = report_inputs("tiny", load_config("tiny", {}))
    assert all(p.name != "tiny" or p.is_file() for p in inputs)  # the shipped tiny.yaml, not ./tiny/


def test_review26_bench_flags_that_would_change_nothing(capsys, tmp_path):
    """Third audit: --selection with --synthetic, --head-density with thresholds and no bundle, --layers past the
    preset's, and a shipped config named with its extension."""
    from dejavu.cli.main import main
    from dejavu.config import resolve_config_path

    for argv, says in (
        (["bench", "--synthetic", "smollm2-135m", "--layers", "1", "--device", "cpu", "--selection", "dense"],
         "--selection dense does not apply"),
        (["bench", "-c", "tiny", "--mlp-keep-input", "0.7", "--head-density", "0.5", "--no-speed"],
         "no bundle: magnitude thresholds compute every head"),
        (["bench", "--synthetic", "smollm2-135m", "--layers", "99", "--device", "cpu"], "smollm2-135m has 30 layers"),
    ):
        assert main(argv) == 1, argv
        assert says in capsys.readouterr().err, argv
    assert resolve_config_path("tiny.yaml") == resolve_config_path("tiny")


def test_a_rerun_without_speed_removes_the_earlier_plot(tmp_path, tiny_llama, capsys):
    from dejavu.cli.main import main

    from helpers import CALIB_TXT

    (tmp_path / "r.png").write_bytes(b"an earlier run's timings")
    assert main(["bench", "--model", str(tiny_llama), "-c", "tiny", "--selection", "dense", "--no-speed",
                 "--max-eval-tokens", "64", "-d", str(CALIB_TXT), "--json", str(tmp_path / "r.json")]) == 0
    assert not (tmp_path / "r.png").exists() and "removed the earlier plot" in capsys.readouterr().out
