"""On-disk artifacts: safetensors files plus one JSON manifest per stage directory.

Every stage writes its files under temporary names, renames them into place, and writes the
manifest last: a directory without a manifest is an unfinished stage, and a manifest's sha256
list lets the next stage refuse edited or truncated files before reading them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dejavu import __version__
from dejavu.errors import DejavuError

MANIFEST = "manifest.json"

# Bumped whenever the layout of a stage's files changes incompatibly.
FORMAT_VERSIONS = {
    "dejavu.collect": 1,
    "dejavu.predictors": 1,
    "dejavu.bundle": 1,
}
# what writes each kind, for the hint when one is missing or another kind stands in its place
PRODUCERS = {
    "dejavu.collect": "`dejavu collect --out RUN`",
    "dejavu.predictors": "`dejavu train-predictors --run RUN`",
    "dejavu.bundle": "`dejavu export --run RUN --out BUNDLE`",
}


class HashCancelled(Exception):
    """A hash stopped early because its `stop` event was set (the run it checked for is ending)."""


def tokens_sha256(*tokens: torch.Tensor) -> str:
    """The sha256 of token ids (as int64, in order): what a stage read from its corpus through its tokenizer, so a
    resume can tell when either changed under the same name."""
    digest = hashlib.sha256()
    for t in tokens:
        digest.update(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 22, stop: threading.Event | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            if stop is not None and stop.is_set():
                raise HashCancelled(str(path))
            digest.update(block)
    return digest.hexdigest()


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _umask_mode()


def existing_ancestor(path: str | Path) -> Path:
    """`path` itself if it exists, else its nearest existing parent (where it would be created)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_report_path(path: str | Path, flag: str = "--json", inputs: Iterable[str | Path] = (),
                      beside: Path | None = None) -> None:
    """A report file about to be written after minutes of work: refused now if it cannot be, or if it would
    overwrite one of the command's `inputs` (a file, or anything in a directory), land inside a bundle or
    run stage, or be the file written `beside` it (bench's plot)."""
    if Path(path).is_dir():
        raise DejavuError(f"{flag} {path} is a directory; give a file name")
    check_can_write(Path(path).parent, flag)
    target = Path(path).resolve()
    for source in inputs:
        source = Path(source).resolve()
        if target == source or (source.is_dir() and source in target.parents):
            raise DejavuError(f"{flag} {path} would overwrite the command's own input {source}")
    around = stage_around(target)
    if around is not None:
        raise DejavuError(f"{flag} {path} would write into a dejavu artifact ({around[0]}, a {around[1]} "
                          "directory); give a path outside bundles and run stages")
    if beside is not None and Path(beside).resolve() == target:
        raise DejavuError(f"{flag} {path}: {beside} is written beside the report; give the report a .json name")
    if target.is_file() and target.stat().st_size:  # empty: a fresh mktemp
        if not _is_json_object(target):
            # whatever the inputs listed, a file that is not an earlier report (a corpus, a config, a model file)
            # is never replaced by one
            raise DejavuError(f"{flag} {path} exists and is not a JSON report; refusing to overwrite it (give a new "
                              "file name)")
        print(f"note: {flag} {path} exists and will be replaced by this run's report", file=sys.stderr)


def _is_json_object(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            if not fh.read(4096).lstrip().startswith(b"{"):  # a corpus or a model file, without reading it all
                return False
            fh.seek(0)
            return isinstance(json.loads(fh.read()), dict)
    except (OSError, ValueError):
        return False


def check_can_write(path: str | Path, what: str) -> None:
    """Fail before any work when `path` (a directory, existing or not) cannot be written: a probe file is
    created and removed in its nearest existing ancestor, which also catches read-only mounts and /proc,
    where permission bits (and root) say yes."""
    path = Path(path).absolute()
    anchor = existing_ancestor(path)
    if not anchor.is_dir():
        raise DejavuError(f"cannot write {what} {path}: {anchor} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=anchor, prefix=".dejavu-write-probe-"):
            pass
    except OSError as exc:
        raise DejavuError(f"cannot write {what} {path}: {exc.strerror or exc} under {anchor}") from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # (resolved: mkstemp collapses `link/..` by text, the kernel through the link, and the rename would miss)
    fd, tmp = tempfile.mkstemp(dir=path.parent.resolve(), prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 would hide shared runs and bundles from other users
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class WriterLock:
    """An exclusive lock on a file beside a stage while one process writes it: a second `collect`,
    `train-predictors` or `tune-predictors` into the same directory is refused instead of interleaving its
    files with the first's (both then reported success over a mixture). The lock is the operating system's
    (flock), so it ends with its process however that ends: a killed run never blocks the next one, on this
    host or another one sharing the directory. The file says who holds it, for the refusal's message.
    Release it (also on errors): `with WriterLock(...)`, or `release()`."""

    def __init__(self, path: str | Path, what: str):
        import socket

        self.path, self.what = Path(path), what
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._fd: int | None = None
        try:
            import fcntl
        except ImportError:  # (Windows) no advisory locks: the file alone, refused while it exists
            fcntl = None
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR | (0 if fcntl else os.O_EXCL), 0o644)
            except FileExistsError:
                self._refuse()
            except OSError as exc:
                raise DejavuError(f"cannot create {self.path}: {exc}") from None
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    self._refuse()
                # the holder before us may have removed the file after we opened it: then our lock is on a file
                # nobody else will open, and the next writer would make another; try again on the current one
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(self.owner).encode())
            self._fd = fd
            return
        raise DejavuError(f"cannot take {self.path}: it keeps being replaced by other processes")

    def _refuse(self) -> None:
        try:
            held = json.loads(self.path.read_text())
        except (OSError, ValueError):
            held = {}
        held = held if isinstance(held, dict) else {}
        where = f" on {held['host']}" if held.get("host") not in (None, self.owner["host"]) else ""
        raise DejavuError(f"{self.what} is being written by another dejavu process (pid {held.get('pid', '?')}{where}, "
                          f"since {held.get('started', '?')}): wait for it to finish, or stop it")

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # (before unlocking: a waiting opener then sees the file replaced)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temps(directory: str | Path) -> None:
    """Remove the temp files (`.NAME.XXXXXXXX.tmp`, see atomic_write_json and save_tensors) that a writer killed
    mid-write left below `directory`. Only while holding the stage's WriterLock: no other writer is mid-write."""
    directory = Path(directory)
    if directory.is_dir():
        for path in directory.rglob(".*.tmp"):
            if path.is_file():
                path.unlink(missing_ok=True)


def stop_together(problem: BaseException | None, device, what: str) -> None:
    """Raise `problem` (the main process's, while it prepares a stage) in every process of a launch: the others
    would otherwise wait for it at the next barrier, for as long as the process group's timeout where no launcher
    ends them. A collective, so it is also that barrier. An OSError becomes a DejavuError naming `what`."""
    import torch.distributed as dist

    if isinstance(problem, OSError):
        problem = DejavuError(f"cannot write to {what}: {problem}")
    failed = problem is not None
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([float(failed)], device=device)
        dist.all_reduce(flag)
        failed = flag.item() > 0
    if failed:
        raise problem or DejavuError(f"{what}: the main process stopped before writing it (its error names why)")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _sort_header_metadata(path: str | Path) -> None:
    """safetensors writes the header's metadata from a hash map, in an order that changes from file to
    file, so two identical runs wrote different bytes (and hashes). Rewritten in place with the keys
    sorted: the same characters in another order, so the header keeps its length and every offset."""
    with open(path, "r+b") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(size)
        header = json.loads(raw)
        metadata = header.get("__metadata__")
        if not metadata or len(metadata) < 2:
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) != len(raw.rstrip(b" ")):  # a serialisation this does not reproduce: left as written
            return
        fh.seek(8)
        fh.write(text.ljust(size, b" "))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically; returns its sha256 for the manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent.resolve(), prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as exc:  # (a full disk among others)
            raise DejavuError(f"cannot write {path}: {exc}") from None
        _sort_header_metadata(tmp)
        os.chmod(tmp, FILE_MODE)  # save_file creates the file anew, owner-only
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def load_tensors(path: str | Path, names: Iterable[str] | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read some or all tensors of a safetensors file, turning format errors into DejavuError."""
    path = Path(path)
    if not path.is_file():
        raise DejavuError(f"missing file: {path}")
    try:
        with safe_open(str(path), framework="pt", device=device) as fh:
            wanted = list(names) if names is not None else list(fh.keys())
            missing = [n for n in wanted if n not in fh.keys()]
            if missing:
                raise DejavuError(f"{path}: missing tensors {missing[:5]}")
            return {n: fh.get_tensor(n) for n in wanted}
    except SafetensorError as exc:
        raise DejavuError(f"{path} is not a readable safetensors file ({exc})") from None


def file_entry(path: str | Path, root: str | Path, sha256: str | None = None, **extra: Any) -> dict[str, Any]:
    path = Path(path)
    return {
        "path": str(path.relative_to(root)),
        "bytes": path.stat().st_size,
        "sha256": sha256 or sha256_file(path),
        **extra,
    }


def write_manifest(
    directory: str | Path,
    kind: str,
    config: dict[str, Any],
    files: list[dict[str, Any]],
    parent: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Write `directory/manifest.json` last, so its presence marks the stage complete."""
    manifest = {
        "format": kind,
        "format_version": FORMAT_VERSIONS[kind],
        "dejavu_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "parent": parent,
        "files": files,
        **fields,
    }
    atomic_write_json(Path(directory) / MANIFEST, manifest)
    return manifest


def manifest_hash(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def parent_ref(directory: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    return {"path": str(Path(directory).resolve()), "format": manifest["format"], "sha256": manifest_hash(manifest)}


def read_manifest(directory: str | Path, kind: str, verify: bool = True,
                  hash_share: tuple[int, int] | None = (0, 1)) -> dict[str, Any]:
    """Load and check a stage's manifest: right kind, known version, files present and unmodified.
    hash_share (i, n): hash only every n-th file from the i-th (processes sharing the check); None:
    check that the files are present with their sizes and leave hashing to the caller."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.exists():
        raise DejavuError(f"{directory} does not exist: {PRODUCERS[kind]} writes it")
    if not directory.is_dir():
        raise DejavuError(f"{directory} is a file; a {kind.removeprefix('dejavu.')} stage is a directory that "
                          f"{PRODUCERS[kind]} writes")
    if not path.is_file():
        raise DejavuError(f"{directory} has no {MANIFEST}: the stage that writes it did not finish (run it again)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DejavuError(f"{path} is not valid JSON ({exc})") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != kind:
        hint = f" ({PRODUCERS[kind]} writes one from it)" if found in PRODUCERS else ""
        raise DejavuError(f"{path} describes {found!r}, expected {kind!r}{hint}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSIONS[kind]:
        raise DejavuError(
            f"{path} has format version {version!r}; this dejavu reads version {FORMAT_VERSIONS[kind]!r} of {kind}"
        )
    if verify:
        verify_files(directory, manifest, hash_share)
    return manifest


def hash_threads() -> int:
    """Threads for hashing a stage's files: hashlib releases the GIL on large blocks, and one core
    hashes ~1 GB/s, so a collect run of tens of GB would otherwise spend most of a start-up here."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def file_entries(directory: str | Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's `files`, each with a path, a size and a sha256: a malformed entry would otherwise
    crash the check, and a missing list would skip it."""
    where = Path(directory) / MANIFEST
    if "files" not in manifest:
        raise DejavuError(f"{where} lacks the field 'files' (written by another version?)")
    files = manifest["files"]
    if not isinstance(files, list):
        raise DejavuError(f"{where}: files must be a list of path, bytes and sha256, got {type(files).__name__} "
                          "(edited manifest?)")
    for position, entry in enumerate(files):
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)
                and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)):
            raise DejavuError(f"{where}: files[{position}] lacks its path, bytes or sha256 (edited manifest?)")
    return files


def check_listed(directory: str | Path, manifest: dict[str, Any], paths: Iterable[str]) -> None:
    """Refuse a manifest whose `files` omits one of `paths`: an unlisted file is never hashed, so deleting
    its entry would turn the check off."""
    listed = {entry["path"] for entry in file_entries(directory, manifest)}
    missing = [p for p in paths if p not in listed]
    if missing:
        raise DejavuError(f"{Path(directory) / MANIFEST} does not list {', '.join(missing)} in its files, so its "
                          "sha256 cannot be checked (edited manifest?)")


def stage_around(path: str | Path) -> tuple[Path, str] | None:
    """The nearest directory strictly above `path` that holds a dejavu manifest (a run stage or a bundle),
    with its format; None when there is none."""
    for parent in Path(path).resolve().parents:
        try:
            kind = json.loads((parent / MANIFEST).read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            continue
        if kind in FORMAT_VERSIONS:
            return parent, kind
    return None


def verify_files(directory: str | Path, manifest: dict[str, Any], hash_share: tuple[int, int] | None = (0, 1),
                 threads: int | None = None, stop: threading.Event | None = None) -> None:
    """Every listed file present with its size; the sha256 of this process's share of them (none when
    hash_share is None), hashed on `threads` threads (default hash_threads()); the first mismatch in
    listing order is reported. Setting `stop` ends the hashing early with HashCancelled."""
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    directory = Path(directory)
    index, count = hash_share or (0, 0)
    to_hash = []
    for position, entry in enumerate(file_entries(directory, manifest)):
        path = directory / entry["path"]
        if not path.is_file():
            raise DejavuError(f"{path} is listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise DejavuError(f"{path} has {size} bytes, the manifest says {entry['bytes']} (truncated or edited)")
        if count and position % count == index:
            to_hash.append((path, entry["sha256"]))
    workers = min(len(to_hash), threads or hash_threads())
    hash_one = partial(sha256_file, stop=stop)
    if workers <= 1:
        digests = [hash_one(path) for path, _ in to_hash]
    else:
        with ThreadPoolExecutor(workers) as pool:
            digests = list(pool.map(hash_one, [path for path, _ in to_hash]))
    for (path, expected), digest in zip(to_hash, digests, strict=True):
        if digest != expected:
            raise DejavuError(f"{path} does not match its sha256 in the manifest (edited or corrupt)")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise DejavuError(f"{name} contains NaN or infinite values")
