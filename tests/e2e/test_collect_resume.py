"""`dejavu collect` end to end on a tiny model and real text: resume after an interruption, refusals,
bad input through the CLI, and a 2-process run whose shards add up to the 1-process data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dejavu.artifacts import load_tensors, read_manifest
from dejavu.bits import unpack_bits
from dejavu.cli.main import app
from dejavu.collect import collect as C
from dejavu.config import load_config
from dejavu.errors import DejavuError

from helpers import CALIB_TXT, make_tiny_model


def tiny_cfg(model_dir, **overrides):
    return load_config("tiny", {"model.name": str(model_dir), "model.device": "cpu",
                                "data.dataset": str(CALIB_TXT), **overrides})


def shard_bytes(stage: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((stage / "shards").glob("*.safetensors"))}


@pytest.fixture(scope="module")
def reference(tiny_model_factory, tmp_path_factory):
    """One uninterrupted 1-process run: the data every other run must reproduce."""
    model_dir = tiny_model_factory("llama")
    out = tmp_path_factory.mktemp("reference")
    C.run_collect(tiny_cfg(model_dir), out)
    return model_dir, out / "collect"


def test_resume_after_interruption_is_byte_identical(reference, tmp_path, monkeypatch):
    model_dir, ref = reference
    real_write = C.write_shard
    written = []

    def write_then_die(path, tensors, metadata):
        if len(written) == 2:
            raise KeyboardInterrupt  # what Ctrl-C / a kill looks like mid-run
        written.append(path)
        return real_write(path, tensors, metadata)

    monkeypatch.setattr(C, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        C.run_collect(tiny_cfg(model_dir), tmp_path)
    stage = tmp_path / "collect"
    assert not (stage / "manifest.json").exists()
    assert len(shard_bytes(stage)) == 2
    # a write killed half-way leaves a temp file behind; resume must ignore and remove it
    (stage / "shards" / ".train-r00-00002.safetensors.x1y2.tmp").write_bytes(b"partial")
    with pytest.raises(DejavuError, match=r"collect\.max_tokens: 1024 -> 2048"):
        C.run_collect(tiny_cfg(model_dir, **{"collect.max_tokens": 2048}), tmp_path)

    monkeypatch.setattr(C, "write_shard", real_write)
    redone = []
    monkeypatch.setattr(C, "record_shard", lambda *a, **k: redone.append(a[2].name) or C_record(*a, **k))
    manifest = C.run_collect(tiny_cfg(model_dir), tmp_path)
    assert redone == ["train-r00-00002.safetensors", "eval-r00-00000.safetensors"]  # only the missing ones
    assert not list((stage / "shards").glob(".*.tmp"))
    assert shard_bytes(stage) == shard_bytes(ref)
    ref_manifest = read_manifest(ref, "dejavu.collect")
    assert manifest["shards"] == ref_manifest["shards"]
    assert manifest["stats"] == ref_manifest["stats"]


C_record = C.record_shard


def test_complete_run_is_kept_and_overwrite_discards(reference, tmp_path, monkeypatch, capsys):
    model_dir, _ = reference
    cfg = tiny_cfg(model_dir, **{"collect.max_tokens": 512})
    C.run_collect(cfg, tmp_path)
    stage = tmp_path / "collect"
    before = (stage / "manifest.json").read_bytes()
    monkeypatch.setattr(C, "record_shard", lambda *a, **k: pytest.fail("a complete run must not recompute"))
    C.run_collect(cfg, tmp_path)
    assert "already complete" in capsys.readouterr().out
    assert (stage / "manifest.json").read_bytes() == before
    monkeypatch.setattr(C, "record_shard", C_record)
    (stage / "shards" / "stray.bin").write_bytes(b"x")
    C.run_collect(cfg, tmp_path, overwrite=True)
    assert not (stage / "shards" / "stray.bin").exists()
    read_manifest(stage, "dejavu.collect")


@pytest.mark.parametrize("damage", ["flipped byte", "flipped byte, no hash records", "deleted shard", "cut manifest"])
def test_a_damaged_complete_collection_is_repaired_by_rerunning(reference, tmp_path, monkeypatch, capsys, damage):
    """Rerunning the command over a finished collection with a damaged shard or manifest once named the damage
    on every rerun, leaving only --overwrite (losing the intact shards): it now collects only what is damaged."""
    model_dir, _ = reference
    cfg = tiny_cfg(model_dir, **{"collect.max_tokens": 512})
    C.run_collect(cfg, tmp_path)
    stage = tmp_path / "collect"
    good = shard_bytes(stage)
    victim = sorted((stage / "shards").glob("train-*.safetensors"))[0]
    if damage.startswith("flipped byte"):
        if "no hash records" in damage:  # (lost, or a run from before them): the damaged manifest's hashes judge
            for record in stage.glob("shard-hashes-*.json"):
                record.unlink()
        data = bytearray(victim.read_bytes())
        data[-100] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "deleted shard":
        victim.unlink()
    else:
        (stage / "manifest.json").write_text((stage / "manifest.json").read_text()[:100])
    redone = []
    monkeypatch.setattr(C, "record_shard", lambda *a, **k: redone.append(a[2].name) or C_record(*a, **k))
    C.run_collect(cfg, tmp_path)
    assert "collecting what is damaged again" in capsys.readouterr().out
    assert redone == ([] if damage == "cut manifest" else [victim.name])
    assert shard_bytes(stage) == good
    read_manifest(stage, "dejavu.collect")


def test_other_weights_at_the_same_path_are_refused(reference, tmp_path, tiny_tokenizer):
    # The config names the model by path only: on resume the directory may hold other weights.
    model_dir = make_tiny_model(tmp_path / "model", tokenizer=tiny_tokenizer, seed=0)
    cfg = tiny_cfg(model_dir, **{"collect.max_tokens": 512})
    C.run_collect(cfg, tmp_path / "run")
    before = (tmp_path / "run" / "collect" / "manifest.json").read_bytes()
    make_tiny_model(model_dir, tokenizer=tiny_tokenizer, seed=1)
    with pytest.raises(DejavuError, match=r"holds a collection made for other weights.*--overwrite"):
        C.run_collect(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "collect" / "manifest.json").read_bytes() == before
    C.run_collect(cfg, tmp_path / "run", overwrite=True)


def test_refuses_when_the_disk_is_too_small(reference, tmp_path, monkeypatch):
    model_dir, _ = reference
    monkeypatch.setattr(C.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(DejavuError, match="not enough disk"):
        C.run_collect(tiny_cfg(model_dir), tmp_path)
    assert not (tmp_path / "collect").exists()


def _cli(*args, env=None):
    return CliRunner().invoke(app, ["collect", "--config", "tiny", "--device", "cpu", *args], env=env)


def test_cli_bad_inputs_fail_in_one_line_and_keep_earlier_artifacts(reference, tmp_path):
    model_dir, ref = reference
    before = shard_bytes(ref) | {"manifest": (ref / "manifest.json").read_bytes()}
    run = str(ref.parent)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cases = [
        (["--model", str(tmp_path / "no-model"), "--dataset", str(CALIB_TXT), "--out", run, "--overwrite"],
         "model path not found"),
        (["--model", str(model_dir), "--dataset", "no_such_user/no_such_dataset_xyz", "--out", run, "--overwrite"],
         "cannot load dataset"),
        (["--model", str(model_dir), "--dataset", str(empty), "--out", run, "--overwrite"], "empty"),
        (["--model", str(model_dir), "--dataset", str(CALIB_TXT), "--out", run, "--max-tokens", "100000000",
          "--overwrite"], "more than the corpus holds"),
        (["--model", str(model_dir), "--dataset", str(CALIB_TXT), "--out", str(blocker / "run")], "not a directory"),
    ]
    for args, message in cases:
        result = _cli(*args, env=offline)
        assert result.exit_code == 1, (args, result.output)
        lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], result.output
        assert "Traceback" not in result.output
    assert shard_bytes(ref) | {"manifest": (ref / "manifest.json").read_bytes()} == before


def test_cli_collects(reference, tmp_path):
    model_dir, _ = reference
    result = _cli("--model", str(model_dir), "--dataset", str(CALIB_TXT), "--out", str(tmp_path),
                  "--max-tokens", "512", "--mlp-label-densities", "0.3,0.5")
    assert result.exit_code == 0, result.output
    assert "disk: about" in result.output and "MLP neurons for 90%/95%/99%" in result.output
    m = read_manifest(tmp_path / "collect", "dejavu.collect")
    assert m["mlp_label_tags"] == ["0.3", "0.5"] and m["tokens"] == 512


def test_two_processes_add_up_to_one(reference, tmp_path):
    model_dir, ref = reference
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dejavu.cli.main", "collect", "--config", "tiny", "--model", str(model_dir),
           "--dataset", str(CALIB_TXT), "--out", str(tmp_path), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = read_manifest(tmp_path / "collect", "dejavu.collect")
    one = read_manifest(ref, "dejavu.collect")
    assert two["world_size"] == 2 and two["tokens"] == one["tokens"]
    assert {s["rank"] for s in two["shards"]} == {0, 1}
    n, seq_len = one["model"]["intermediate_size"], one["seq_len"]

    def per_sequence(manifest, stage, split):
        """{(rank, position in the rank's stream): tensors of one sequence}, per rank."""
        out: dict[int, list[dict[str, torch.Tensor]]] = {}
        for shard in (s for s in manifest["shards"] if s["split"] == split):
            t = load_tensors(stage / shard["path"])
            for i in range(shard["tokens"] // seq_len):
                out.setdefault(shard["rank"], []).append({k: v[i * seq_len:(i + 1) * seq_len] for k, v in t.items()})
        return out

    for split in ("train", "eval"):
        single = per_sequence(one, ref, split)[0]
        ranks = per_sequence(two, tmp_path / "collect", split)
        # round-robin: sequence j of the 1-process stream is sequence j // 2 of rank j % 2
        assert sum(len(v) for v in ranks.values()) == len(single)
        for j, seq in enumerate(single):
            other = ranks[j % 2][j // 2]
            assert set(other) == set(seq)
            for key, value in seq.items():
                if key.startswith("mlp_labels"):
                    diff = unpack_bits(value, n) ^ unpack_bits(other[key], n)
                    assert diff.float().mean() < 1e-3, key  # only near-ties may flip
                else:
                    torch.testing.assert_close(other[key].float(), value.float(), atol=2e-3, rtol=2e-3)
    for layer, row in one["stats"].items():
        for kind in ("mlp", "attn"):
            for q, v in row[kind]["frac_for_mass"].items():
                assert abs(two["stats"][layer][kind]["frac_for_mass"][q] - v) < 1e-3
    assert json.loads((tmp_path / "collect" / "run.json").read_text())["world_size"] == 2


def test_a_resume_over_other_text_under_the_same_corpus_path_is_refused(reference, tmp_path, monkeypatch, capsys):
    """run.json named the corpus by its path only: a file rewritten between a kill and the rerun mixed two
    texts in one collection. The tokens' hash (corpus through tokenizer) now tells them apart."""
    model_dir, _ = reference
    corpus = tmp_path / "corpus.txt"
    text = CALIB_TXT.read_text()
    corpus.write_text(text)
    real_write, written = C.write_shard, []

    def write_then_die(path, tensors, metadata):
        if len(written) == 1:
            raise KeyboardInterrupt
        written.append(path)
        return real_write(path, tensors, metadata)

    monkeypatch.setattr(C, "write_shard", write_then_die)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        C.run_collect(tiny_cfg(model_dir, **{"data.dataset": str(corpus)}), out)
    monkeypatch.setattr(C, "write_shard", real_write)
    corpus.write_text(text[len(text) // 2:] + text[:len(text) // 2])  # the same words, in another order
    with pytest.raises(DejavuError, match="partial collection of other tokens .* holds other text, or the model "
                                          "another tokenizer"):
        C.run_collect(tiny_cfg(model_dir, **{"data.dataset": str(corpus)}), out)
    assert [p.name for p in (out / "collect" / "shards").glob("*.safetensors")] == [Path(written[0]).name]
    corpus.write_text(text)  # the text it started on: resumed
    finished = C.run_collect(tiny_cfg(model_dir, **{"data.dataset": str(corpus)}), out)
    # a finished collection over other text mixes nothing: kept, with a word
    corpus.write_text(text[len(text) // 2:] + text[:len(text) // 2])
    assert C.run_collect(tiny_cfg(model_dir, **{"data.dataset": str(corpus)}), out) == finished
    assert "was collected from other tokens than these settings give now" in capsys.readouterr().out


@pytest.mark.parametrize("state", ["[]", '{"config": 5}', '{"model": "x"}'])
def test_a_run_state_of_the_wrong_shape_is_a_one_line_error(reference, tmp_path, state):
    model_dir, _ = reference
    (tmp_path / "collect").mkdir()
    (tmp_path / "collect" / "run.json").write_text(state)
    with pytest.raises(DejavuError, match="is not a dejavu collection's state"):
        C.run_collect(tiny_cfg(model_dir), tmp_path)


def test_a_second_writer_of_the_same_run_is_refused_before_it_writes(reference, tmp_path):
    """Two collects into one --out once both reported success over a mixture of their shards."""
    from dejavu.artifacts import WriterLock

    model_dir, _ = reference
    other = WriterLock(tmp_path / ".collect.lock", "another run")
    with pytest.raises(DejavuError, match=r"collect is being written by another dejavu process"):
        C.run_collect(tiny_cfg(model_dir, **{"collect.max_tokens": 512}), tmp_path)
    assert not (tmp_path / "collect").exists()
    other.release()
    C.run_collect(tiny_cfg(model_dir, **{"collect.max_tokens": 512}), tmp_path)
    assert not tmp_path.joinpath(".collect.lock").exists()  # released at the end
    # released on an error too: the next run is not refused
    with pytest.raises(DejavuError, match="other settings"):
        C.run_collect(tiny_cfg(model_dir, **{"collect.max_tokens": 1024}), tmp_path)
    assert not tmp_path.joinpath(".collect.lock").exists()


def test_relative_names_are_stored_absolute_and_match_other_spellings(reference, tmp_path, monkeypatch):
    """A corpus or model named relative to the working directory was stored as typed: tune and export, run from
    elsewhere, then read another file or none; and `./tiny` against `tiny` was refused as other settings."""
    model_dir, _ = reference
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CALIB_TXT.read_text())
    monkeypatch.chdir(model_dir.parent)
    relative_corpus = os.path.relpath(corpus)
    cfg = tiny_cfg(model_dir.name, **{"data.dataset": relative_corpus, "collect.max_tokens": 512})
    manifest = C.run_collect(cfg, tmp_path / "run")
    assert manifest["config"]["data"]["dataset"] == str(corpus.resolve())
    assert manifest["config"]["model"]["name"] == str(model_dir.resolve())
    again = C.run_collect(tiny_cfg(f"./{model_dir.name}", **{"data.dataset": relative_corpus,
                                                             "collect.max_tokens": 512}), tmp_path / "run")
    assert again == manifest
    # a glob names no existing path: stored as an absolute pattern too (it was kept relative, and read other
    # files, or none, from another directory)
    pattern = os.path.join(os.path.dirname(relative_corpus), "corp*.txt")
    globbed = C.run_collect(tiny_cfg(model_dir.name, **{"data.dataset": pattern, "collect.max_tokens": 512}),
                            tmp_path / "glob-run")
    assert globbed["config"]["data"]["dataset"] == str(tmp_path / "corp*.txt")
