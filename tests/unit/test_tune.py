"""`dejavu tune-predictors`: straight-through selection, tuning end to end, resume, and export's choice."""

from __future__ import annotations

import json

import pytest
import torch

from dejavu.artifacts import load_tensors
from dejavu.errors import DejavuError
from dejavu.export.bundle import BUNDLE_FILE, run_export
from dejavu.runtime.apply import SparseRuntime
from dejavu.runtime.compare import rule_label
from dejavu.train.tune import tuned_status

from helpers import CALIB_TXT, load_tiny, make_predictors_dir, random_ids, random_predictors

# a few short sequences of the calibration text: each step reads two, four are held out
TUNE = {"data.seq_len": 32, "tune.steps": 60, "tune.sequences": 2, "tune.eval_sequences": 4, "tune.lr": 0.05,
        "tune.checkpoint_every": 4, "tune.eval_every": 5, "model.device": "cpu", "model.dtype": "float32"}


def test_straight_through_forward_is_the_hard_selection_and_reaches_the_predictors(tiny_llama):
    model, adapter = load_tiny(tiny_llama)
    ids = random_ids(model)
    plain = random_predictors(adapter, mlp_density=0.5, head_density=0.5)
    with SparseRuntime(model, adapter, plain), torch.no_grad():
        expected = model(input_ids=ids).logits
    for p in model.parameters():
        p.requires_grad_(False)
    with SparseRuntime(model, adapter, plain, straight_through=2.0) as rt:
        logits = model(input_ids=ids).logits
        assert rt.stats.mlp_kept == pytest.approx(0.5, abs=0.02)  # the hard selection is what is counted
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # with some tokens dense (a float mask then meets the token mask) it is still the hard selection's forward
    dense_first = torch.zeros(ids.shape, dtype=torch.bool)
    dense_first[:, 5:] = True
    with SparseRuntime(model, adapter, plain) as rt, torch.no_grad():
        rt.token_mask = dense_first
        expected_masked = model(input_ids=ids).logits
    with SparseRuntime(model, adapter, plain, straight_through=2.0) as rt:
        rt.token_mask = dense_first
        torch.testing.assert_close(model(input_ids=ids).logits, expected_masked, rtol=1e-5, atol=1e-5)
    logits.float().logsumexp(-1).sum().backward()
    for lp in plain.layers:
        for pred in (lp.mlp, lp.attn):
            assert pred.w1.grad is not None and pred.w1.grad.abs().sum() > 0
    with pytest.raises(DejavuError, match="straight-through"):
        SparseRuntime(model, adapter, plain, straight_through=2.0, mode="gather")


@pytest.fixture(autouse=True)
def small_corpus(tmp_path, monkeypatch):
    """The calibration text's first lines: tokenising all of it for a few short sequences wastes seconds."""
    path = tmp_path / "calib.txt"
    path.write_text("".join(CALIB_TXT.read_text().splitlines(keepends=True)[:400]))
    monkeypatch.setitem(TUNE, "data.dataset", str(path))


def _tune(run, **overrides):
    from dejavu.train.tune import run_tune

    return run_tune(run, overrides={**TUNE, **overrides})


def test_tuning_lowers_held_out_kl_and_export_uses_the_tuned_predictors(tmp_path, tiny_llama, capsys):
    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=1.0)
    manifest = _tune(run)
    tuned = manifest["tuned"]
    assert tuned["before"]["scored_tokens"] == 4 * 31 and tuned["mlp_density"] == 0.5 and tuned["head_density"] == 1.0
    # random predictors on a random model: 0.089 -> 0.068 at seed 0 (-24 %)
    assert tuned["after"]["kl"] < 0.9 * tuned["before"]["kl"]
    assert tuned["after"]["dense_ppl"] == pytest.approx(tuned["before"]["dense_ppl"])
    assert not (run / "tuned" / "progress" / "checkpoint.safetensors").exists()  # finished: checkpoint removed
    metrics = json.loads((run / "tuned" / "metrics.json").read_text())
    assert metrics["tuned"]["after"] == tuned["after"] and "mlp" in metrics["trained"]
    # the same command again keeps the finished tuning; other settings need --overwrite, and keep it meanwhile
    assert _tune(run) == manifest and "already tuned" in capsys.readouterr().out
    with pytest.raises(DejavuError, match=r"other settings \(tune.lr: 0.05 -> 0.01\): pass --overwrite"):
        _tune(run, **{"tune.lr": 0.01})
    assert (run / "tuned" / "manifest.json").is_file()
    assert _tune(run, **{"tune.mlp_density": 0.5}) == manifest  # the default restated is the same tuning

    # `--run RUN` exports the trained predictors (as the contract says), naming RUN/tuned; `--run RUN/tuned`
    # the tuned ones
    layer0 = load_tensors(run / "tuned" / "layers" / "layer-000.safetensors")
    trained0 = load_tensors(run / "predictors" / "layers" / "layer-000.safetensors")
    assert not torch.equal(layer0["mlp.w1"], trained0["mlp.w1"])
    bundle = run_export(run, tmp_path / "bundle-trained")
    assert "--run " + str(run / "tuned") in capsys.readouterr().out and bundle["tuned"] is None
    exported = load_tensors(tmp_path / "bundle-trained" / BUNDLE_FILE, ["layers.0.mlp.w1"])["layers.0.mlp.w1"]
    torch.testing.assert_close(exported, trained0["mlp.w1"])
    bundle = run_export(run / "tuned", tmp_path / "bundle")
    assert bundle["tuned"]["after"] == tuned["after"] and bundle["mlp_density"] == 0.5
    exported = load_tensors(tmp_path / "bundle" / BUNDLE_FILE, ["layers.0.mlp.w1"])["layers.0.mlp.w1"]
    torch.testing.assert_close(exported, layer0["mlp.w1"])
    capsys.readouterr()
    run_export(run / "tuned", tmp_path / "bundle-0.3", overrides={"export.mlp_density": 0.3})
    assert "tuned at MLP density 0.5" in capsys.readouterr().out

    # train-predictors rerun on the finished run rewrites its manifest (date, timings), not the predictors:
    # the tuning still belongs to them
    pm = json.loads((run / "predictors" / "manifest.json").read_text())
    (run / "predictors" / "manifest.json").write_text(json.dumps({**pm, "created": "later"}))
    assert tuned_status(run) == "current"
    assert _tune(run) == manifest and "already tuned" in capsys.readouterr().out
    # predictors trained again: the tuning is stale; export of the run no longer names it, of it says so
    make_predictors_dir(run, tiny_llama, seed=1)
    assert tuned_status(run) == "stale"
    run_export(run, tmp_path / "bundle-new")
    assert "tuned" not in capsys.readouterr().out
    run_export(run / "tuned", tmp_path / "bundle")
    assert "was tuned from other predictors" in capsys.readouterr().out
    with pytest.raises(DejavuError, match=r"head_density: 1.0 -> 0.5, other trained predictors\): pass --overwrite"):
        _tune(run)


def test_a_killed_tuning_resumes_from_its_checkpoint_to_the_same_predictors(tmp_path, tiny_llama, monkeypatch):
    import dejavu.train.tune as tune

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for run in (whole, resumed):
        make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=1.0)
    # held-out KL by step: step 5's is the lowest of the run, so what is written is the best state that the
    # step-8 checkpoint below carries beside its own
    measured = tune.held_out_quality

    def kl_by_step(model, runtime, held, device, desc, *rest):
        step = 0 if desc.endswith("before") else int(desc.rsplit(" ", 1)[1])
        kl = 0.3 if step == 0 else 0.1 if step == 5 else 0.2 + step / 1000
        return {**measured(model, runtime, held, device, desc, *rest), "kl": kl}

    monkeypatch.setattr(tune, "held_out_quality", kl_by_step)
    _tune(whole)

    real, calls = tune._kl_and_logits, {"n": 0}

    def killed_at_step_9(model, runtime, ids):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 9:
                raise KeyboardInterrupt
        return real(model, runtime, ids)

    monkeypatch.setattr(tune, "_kl_and_logits", killed_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        _tune(resumed)
    # checkpoints at 4, 5 (a measurement) and 8; the best so far is step 5's, kept in the checkpoint beside step 8's
    header = tune._checkpoint_header(resumed / "tuned")
    assert header["step"] == 8 and header["best"]["step"] == 5 and [p["step"] for p in header["history"]] == [0, 5]
    assert not (resumed / "tuned" / "manifest.json").exists()
    with pytest.raises(DejavuError, match=r"unfinished tuning \(step 8\) with other settings \(tune.steps: 60 -> 80\)"):
        _tune(resumed, **{"tune.steps": 80})
    # the same corpus name with other text (the key names the file, not its words): refused, checkpoint kept
    real_sequences = tune.calibration_sequences
    monkeypatch.setattr(tune, "calibration_sequences", lambda cfg, tok: tuple(s.flip(0) for s in real_sequences(cfg, tok)))
    with pytest.raises(DejavuError, match="was tuned on other tokens than .* holds other text, or the model another"):
        _tune(resumed)
    assert tune._checkpoint_header(resumed / "tuned")["step"] == 8
    monkeypatch.setattr(tune, "calibration_sequences", real_sequences)
    monkeypatch.setattr(tune, "_kl_and_logits", real)
    manifest = _tune(resumed)
    for name in ("layer-000.safetensors", "layer-001.safetensors"):
        a = load_tensors(whole / "tuned" / "layers" / name)
        b = load_tensors(resumed / "tuned" / "layers" / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    whole_tuned = json.loads((whole / "tuned" / "manifest.json").read_text())["tuned"]
    assert manifest["tuned"]["best_step"] == whole_tuned["best_step"] == 5
    assert manifest["tuned"]["after"] == pytest.approx(whole_tuned["after"], rel=1e-5)
    for key in ("step", "kl", "sparse_ppl"):
        assert [p[key] for p in manifest["tuned"]["history"]] == pytest.approx([p[key] for p in whole_tuned["history"]],
                                                                               rel=1e-5)
    # the head predictors were not tuned (heads dense): left as trained
    a = load_tensors(resumed / "tuned" / "layers" / "layer-000.safetensors")
    b = load_tensors(resumed / "predictors" / "layers" / "layer-000.safetensors")
    assert torch.equal(a["attn.w1"], b["attn.w1"]) and not torch.equal(a["mlp.w1"], b["mlp.w1"])
    assert not (resumed / "tuned" / "progress" / "checkpoint.safetensors").exists()

    # killed while writing, after the last step: the rerun writes the best state from the last checkpoint
    cut = tmp_path / "cut"
    make_predictors_dir(cut, tiny_llama, mlp_density=0.5, head_density=1.0)
    write = tune._write_tuned

    def killed_while_writing(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune, "_write_tuned", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        _tune(cut)
    assert tune._checkpoint_header(cut / "tuned")["step"] == 60
    monkeypatch.setattr(tune, "_write_tuned", write)
    assert _tune(cut)["tuned"]["best_step"] == 5
    for name in ("layer-000.safetensors", "layer-001.safetensors"):
        a, b = load_tensors(whole / "tuned" / "layers" / name), load_tensors(cut / "tuned" / "layers" / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_refused_by_name(tmp_path, tiny_llama, tiny_model_factory):
    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=1.0)
    with pytest.raises(DejavuError, match="nothing to tune"):
        _tune(run, **{"tune.mlp_density": 1.0})
    with pytest.raises(DejavuError, match="tune.steps must be positive"):
        _tune(run, **{"tune.steps": 0})
    other = tiny_model_factory("llama", seed=3)
    from dejavu.train.tune import run_tune

    with pytest.raises(DejavuError, match="trained for"):
        run_tune(run, overrides=dict(TUNE), model_name=str(other))
    # a NaN in a trained layer file is named before the model is even loaded
    path = run / "predictors" / "layers" / "layer-001.safetensors"
    tensors = load_tensors(path)
    tensors["mlp.w2"][0, 0] = float("nan")
    from dejavu.artifacts import file_entry, save_tensors

    sha = save_tensors(path, tensors)
    manifest = json.loads((run / "predictors" / "manifest.json").read_text())
    manifest["files"] = [file_entry(path, run / "predictors", sha) if f["path"].endswith("layer-001.safetensors")
                         else f for f in manifest["files"]]
    (run / "predictors" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DejavuError, match="layer-001.safetensors: mlp.w2 contains NaN"):
        _tune(run)


def test_reports_of_tuned_bundles_say_so():
    report = {"selection": "predictor", "mlp_density": 0.5, "head_density": 1.0}
    assert rule_label(report) == "predictor, MLP 0.5, heads 1"
    assert rule_label({**report, "tuned": True}) == "predictor (tuned), MLP 0.5, heads 1"
    assert rule_label({**report, "tuned": True, "mlp_up_weight": 0.4}) == "exact-up 0.4 (tuned), MLP 0.5, heads 1"


def test_export_of_a_tuning_takes_its_densities_and_the_corpus_is_keyed_by_its_file(tmp_path, tiny_llama, capsys,
                                                                                   monkeypatch):
    from dejavu.config import load_config
    from dejavu.train.tune import tuning_inputs

    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=1.0)
    _tune(run, **{"tune.mlp_density": 0.3, "tune.steps": 4})
    capsys.readouterr()
    bundle = run_export(run / "tuned", tmp_path / "bundle")
    assert bundle["mlp_density"] == 0.3 and "note" not in capsys.readouterr().out
    with pytest.raises(DejavuError, match=f"stage directory; pass the run directory .*--run {run}"):
        _tune(run / "tuned")
    # the same corpus named relatively from its directory and absolutely from elsewhere: one tuning
    pm = json.loads((run / "predictors" / "manifest.json").read_text())
    monkeypatch.chdir(tmp_path)
    relative = tuning_inputs(load_config(None, {"data.dataset": "calib.txt"}), pm, (0.5, 1.0), "float32")
    monkeypatch.chdir(run)
    absolute = tuning_inputs(load_config(None, {"data.dataset": str(tmp_path / "calib.txt")}), pm, (0.5, 1.0),
                             "float32")
    assert relative == absolute and relative["split"] == "train"
    # and a glob, which names no existing path, by its absolute pattern
    monkeypatch.chdir(tmp_path)
    relative = tuning_inputs(load_config(None, {"data.dataset": "cal*.txt"}), pm, (0.5, 1.0), "float32")
    assert relative["dataset"] == str(tmp_path / "cal*.txt")


def test_tune_settings_come_from_the_defaults_not_the_runs_stored_config(tmp_path):
    from dejavu.config import RunConfig
    from dejavu.train.tune import resolve_tune_config

    # a run trained by session 18's code stored its tune section, lr 0.002 (then the default), in its config
    stored = RunConfig().to_dict()
    stored["tune"] = {**stored["tune"], "lr": 0.002, "steps": 7}
    stored["data"] = {**stored["data"], "seq_len": 64}
    cfg = resolve_tune_config(stored, None, {})
    assert cfg.tune.lr == RunConfig().tune.lr == 0.0005 and cfg.tune.steps == 150
    assert cfg.data.seq_len == 64  # what the run was made with stays
    yaml = tmp_path / "c.yaml"
    yaml.write_text("tune:\n  lr: 0.001\n")
    assert resolve_tune_config(stored, str(yaml), {}).tune.lr == 0.001
    assert resolve_tune_config(stored, str(yaml), {"tune.lr": 0.003}).tune.lr == 0.003


def test_configs_written_by_earlier_versions_still_load(tmp_path):
    from dejavu.config import RunConfig, load_config

    # session 18's first commit wrote tune.seed into every manifest; the key is gone since
    assert RunConfig.from_dict({"tune": {"seed": 0, "steps": 7}}).tune.steps == 7
    yaml = tmp_path / "c.yaml"
    yaml.write_text("tune:\n  seed: 1\n")
    with pytest.raises(DejavuError, match="unknown key 'seed'"):
        load_config(yaml, {})


def _held_out_script(monkeypatch, kls):
    """held_out_quality reporting the given KLs in turn; returns the layer-0 MLP predictor's w1 at each call."""
    import dejavu.train.tune as tune

    kls, real, seen = iter(kls), tune.held_out_quality, []

    def scripted(model, runtime, *rest):
        seen.append(runtime.predictors.layers[0].mlp.w1.detach().clone())
        return {**real(model, runtime, *rest), "kl": next(kls)}

    monkeypatch.setattr(tune, "held_out_quality", scripted)
    return seen


def test_the_predictors_of_the_lowest_held_out_kl_are_written(tmp_path, tiny_llama, monkeypatch, capsys):
    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=1.0)
    # before, steps 3 and 6, and the last (7): the best is step 3's
    seen = _held_out_script(monkeypatch, [0.30, 0.20, 0.25, 0.28])
    tuned = _tune(run, **{"tune.steps": 7, "tune.eval_every": 3})["tuned"]
    assert tuned["best_step"] == 3 and tuned["after"]["kl"] == 0.20 and tuned["final"]["kl"] == 0.28
    assert [p["step"] for p in tuned["history"]] == [0, 3, 6, 7]
    written = load_tensors(run / "tuned" / "layers" / "layer-000.safetensors")["mlp.w1"]
    torch.testing.assert_close(written, seen[1])
    assert not torch.equal(written, seen[3])
    out = capsys.readouterr().out
    assert "kept the predictors of step 3" in out and "fell by only" not in out  # 0.30 -> 0.20: a third


def test_a_tuning_that_barely_lowers_the_held_out_kl_says_to_compare(tmp_path, tiny_llama, monkeypatch, capsys):
    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=1.0)
    _held_out_script(monkeypatch, [0.30, 0.29])
    assert _tune(run, **{"tune.steps": 2})["tuned"]["best_step"] == 2
    assert "note: the held-out KL fell by only 3.3 %" in capsys.readouterr().out


def test_measuring_only_before_and_after_is_one_setting_however_it_is_said(tmp_path, tiny_llama, capsys):
    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=1.0)
    manifest = _tune(run, **{"tune.steps": 2, "tune.eval_every": 0})
    assert [p["step"] for p in manifest["tuned"]["history"]] == [0, 2]
    assert _tune(run, **{"tune.steps": 2, "tune.eval_every": 2}) == manifest
    assert "already tuned" in capsys.readouterr().out


def test_a_tuning_that_never_beats_the_trained_predictors_gives_them_back(tmp_path, tiny_llama, monkeypatch, capsys):
    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=1.0)
    _held_out_script(monkeypatch, [0.30, 0.35])
    manifest = _tune(run, **{"tune.steps": 2, "tune.mlp_compensation_rank": 2})
    tuned = manifest["tuned"]
    assert tuned["best_step"] == 0 and tuned["after"]["kl"] == 0.30
    assert manifest["mlp_compensation"] is None  # its zero-initialised term was shipped as "tuned"
    assert "warning: no held-out measurement beat the trained predictors (KL 0.3000; at step 2 0.3500)" in \
        capsys.readouterr().out
    for name in ("layer-000.safetensors", "layer-001.safetensors"):
        a = load_tensors(run / "tuned" / "layers" / name)
        b = load_tensors(run / "predictors" / "layers" / name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    with pytest.raises(DejavuError, match="tune.eval_every must be 0"):
        _tune(tmp_path / "run", **{"tune.eval_every": -1})


def test_tuning_for_score_thresholds_and_exporting_them(tmp_path, tiny_llama, capsys, monkeypatch):
    """--mlp-selection threshold: each step keeps the neurons above its own scores' quantile; the tuning records
    it, export says when its selection differs, and a threshold bundle of the tuned predictors keeps the density."""
    from dejavu.export.bundle import load_bundle

    calls = []
    above = SparseRuntime._select_above

    def counted(self, l, scores):  # noqa: E741
        calls.append(l)
        return above(self, l, scores)

    monkeypatch.setattr(SparseRuntime, "_select_above", counted)
    run = tmp_path / "run"
    make_predictors_dir(run, tiny_llama, mlp_density=0.5, head_density=1.0)
    manifest = _tune(run, **{"tune.mlp_selection": "threshold", "tune.steps": 20})
    assert len(calls) >= 20 * 2  # every step's forward went through the thresholds (two layers at least)
    tuned = manifest["tuned"]
    assert tuned["mlp_selection"] == "threshold" and tuned["after"]["kl"] <= tuned["before"]["kl"]
    assert "(score thresholds)" in capsys.readouterr().out
    run_export(run / "tuned", tmp_path / "topk")
    assert "tuned for MLP selection threshold" in capsys.readouterr().out
    bundle = run_export(run / "tuned", tmp_path / "scored", overrides={
        "export.mlp_selection": "threshold", "data.dataset": TUNE["data.dataset"], "export.calibration_tokens": 256})
    assert bundle["mlp_selection"] == "threshold" and "tuned for" not in capsys.readouterr().out
    _, pset = load_bundle(tmp_path / "scored")
    assert pset.mlp_score_thresholds is not None


def test_a_second_tuning_of_the_same_run_is_refused_while_the_first_runs(tmp_path, tiny_llama):
    from dejavu.artifacts import WriterLock

    make_predictors_dir(tmp_path, tiny_llama, mlp_density=0.5, head_density=1.0)
    lock = tmp_path / ".tuned.lock"
    other = WriterLock(lock, "another run")
    with pytest.raises(DejavuError, match=r"tuned is being written by another dejavu process"):
        _tune(tmp_path, **{"tune.steps": 4})
    assert not (tmp_path / "tuned").exists()
    other.release()
    _tune(tmp_path, **{"tune.steps": 4})
    assert not lock.exists() and (tmp_path / "tuned" / "manifest.json").exists()
