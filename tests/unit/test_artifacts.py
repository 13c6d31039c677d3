"""Manifests and safetensors files: atomic writes, verification, refusal of edited or truncated files."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from dejavu.artifacts import (
    HashCancelled,
    file_entry,
    load_tensors,
    read_manifest,
    save_tensors,
    verify_files,
    write_manifest,
)
from dejavu.bits import pack_bits, unpack_bits
from dejavu.errors import DejavuError


def _stage(tmp_path):
    path = tmp_path / "stage" / "a.safetensors"
    digest = save_tensors(path, {"x": torch.arange(12.0).view(3, 4)})
    write_manifest(path.parent, "dejavu.bundle", {"k": 1}, [file_entry(path, path.parent, digest)])
    return path


def test_round_trip(tmp_path):
    path = _stage(tmp_path)
    manifest = read_manifest(path.parent, "dejavu.bundle")
    assert manifest["files"][0]["path"] == "a.safetensors"
    assert torch.equal(load_tensors(path)["x"], torch.arange(12.0).view(3, 4))
    assert not list(path.parent.glob(".*tmp"))  # no temp files left behind


def test_edited_truncated_missing_and_wrong_kind(tmp_path):
    path = _stage(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DejavuError, match="sha256"):
        read_manifest(path.parent, "dejavu.bundle")
    path.write_bytes(bytes(data[:-8]))
    with pytest.raises(DejavuError, match="truncated"):
        read_manifest(path.parent, "dejavu.bundle")
    with pytest.raises(DejavuError, match="expected 'dejavu.collect'"):
        read_manifest(path.parent, "dejavu.collect", verify=False)
    path.unlink()
    with pytest.raises(DejavuError, match="missing"):
        read_manifest(path.parent, "dejavu.bundle")
    (path.parent / "manifest.json").unlink()
    with pytest.raises(DejavuError, match="did not finish"):
        read_manifest(path.parent, "dejavu.bundle")


@pytest.mark.parametrize("threads", [1, 3])
def test_hashing_on_threads_names_the_first_bad_file(tmp_path, threads):
    stage = tmp_path / "stage"
    entries = []
    for i in range(5):
        path = stage / f"f{i}.safetensors"
        entries.append(file_entry(path, stage, save_tensors(path, {"x": torch.full((64,), float(i))})))
    write_manifest(stage, "dejavu.collect", {}, entries)
    manifest = read_manifest(stage, "dejavu.collect", verify=False)
    verify_files(stage, manifest, threads=threads)
    for i in (3, 1):  # 1 and 3 damaged: the message names 1, the first listed
        data = bytearray((stage / f"f{i}.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (stage / f"f{i}.safetensors").write_bytes(bytes(data))
    with pytest.raises(DejavuError, match="f1.safetensors does not match its sha256"):
        verify_files(stage, manifest, threads=threads)
    verify_files(stage, manifest, hash_share=(0, 2), threads=threads)  # files 0, 2, 4: this share is intact
    verify_files(stage, manifest, hash_share=None, threads=threads)  # presence and sizes only
    stop = threading.Event()
    stop.set()
    with pytest.raises(HashCancelled):  # a run ending early stops its background check
        verify_files(stage, manifest, threads=threads, stop=stop)


def test_corrupt_manifest_and_tensor_file(tmp_path):
    path = _stage(tmp_path)
    (path.parent / "manifest.json").write_text("{not json")
    with pytest.raises(DejavuError, match="not valid JSON"):
        read_manifest(path.parent, "dejavu.bundle")
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(DejavuError, match="not a readable safetensors"):
        load_tensors(path)


def test_future_format_version_is_refused(tmp_path):
    path = _stage(tmp_path)
    m = json.loads((path.parent / "manifest.json").read_text())
    m["format_version"] = 99
    (path.parent / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DejavuError, match="format version 99"):
        read_manifest(path.parent, "dejavu.bundle")


@pytest.mark.parametrize("n", [1, 7, 8, 13, 1536])
def test_bit_packing_round_trip(n):
    mask = torch.rand(5, n) > 0.5
    packed = pack_bits(mask)
    assert packed.shape == (5, -(-n // 8)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, n), mask)
    # golden bytes: neuron 0 is the least significant bit of byte 0
    one = torch.zeros(1, 9, dtype=torch.bool)
    one[0, 0] = one[0, 8] = True
    assert pack_bits(one).tolist() == [[1, 1]]


def test_a_missing_or_wrong_stage_says_which_command_writes_it(tmp_path):
    from dejavu.artifacts import read_manifest

    with pytest.raises(DejavuError, match="does not exist: `dejavu train-predictors --run RUN` writes it"):
        read_manifest(tmp_path / "predictors", "dejavu.predictors")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DejavuError, match="is a file; a bundle stage is a directory"):
        read_manifest(tmp_path / "file", "dejavu.bundle")
    (tmp_path / "predictors").mkdir()
    (tmp_path / "predictors" / "manifest.json").write_text(json.dumps({"format": "dejavu.predictors"}))
    with pytest.raises(DejavuError, match=r"expected 'dejavu.bundle' \(`dejavu export"):
        read_manifest(tmp_path / "predictors", "dejavu.bundle")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DejavuError, match="describes None"):
        read_manifest(tmp_path / "listed", "dejavu.bundle")


def test_identical_writes_are_identical_bytes(tmp_path):
    # safetensors orders the header's metadata by a hash map: without sorting, two identical runs wrote
    # predictor and bundle files that differed at byte 33 (and so in their hashes)
    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, dtype=torch.float16)}
    metadata = {"format": "dejavu.bundle", "format_version": "1", "zeta": "z", "alpha": "ü"}
    digests = {save_tensors(tmp_path / f"{i}.safetensors", tensors, metadata=metadata) for i in range(8)}
    assert len(digests) == 1
    assert load_tensors(tmp_path / "0.safetensors")["b"].tolist() == [0.0, 1.0, 2.0]
    head = (tmp_path / "0.safetensors").read_bytes()[8:120]
    assert head.startswith('{"__metadata__":{"alpha":"ü","format":"dejavu.bundle"'.encode())


def test_a_writer_lock_refuses_a_second_writer_and_ends_with_its_process(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from dejavu.artifacts import WriterLock

    path = tmp_path / ".stage.lock"
    first = WriterLock(path, "RUN/stage")
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(DejavuError, match=rf"RUN/stage is being written by another dejavu process \(pid {os.getpid()}, "
                                          r"since .*\): wait for it to finish, or stop it"):
        WriterLock(path, "RUN/stage")  # (a second holder in this process is refused like another process)
    first.release()
    assert not path.exists()
    # a process that took the lock and was killed: its lock went with it, the file it left is taken over
    code = (f"import os; from dejavu.artifacts import WriterLock; WriterLock({str(path)!r}, 'x'); "
            "os.kill(os.getpid(), 9)")
    subprocess.run([sys.executable, "-c", code], check=False)
    assert path.exists()
    with WriterLock(path, "RUN/stage"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()
