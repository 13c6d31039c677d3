"""Text corpora through `datasets`: a hub id, or local .txt/.jsonl/.parquet files, dirs or globs.

Shared by collect (calibration) and bench (evaluation), so it lives outside both stages.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from dejavu.errors import DejavuError

LOCAL_BUILDERS = {".txt": "text", ".raw": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# A directory's .json files are most often metadata (dataset_info.json, config.json), not documents;
# a .json corpus is still read when named as a file or matched by a glob.
DIRECTORY_SUFFIXES = set(LOCAL_BUILDERS) - {".json"}


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[") and not Path(spec).expanduser().exists()  # (a file may have "[" in its name)


def absolute_spec(spec: str) -> str:
    """A local corpus (file, directory or glob) by its absolute path, so that a stage run from another directory
    reads the same files; anything else (a hub id) as given."""
    if _is_glob(spec):
        pattern = os.path.expanduser(spec)
        return pattern if os.path.isabs(pattern) or not glob.glob(pattern, recursive=True) else os.path.abspath(pattern)
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _local_files(spec: str) -> list[str] | None:
    """The files a local spec names, or None when the spec is not local."""
    if _is_glob(spec):
        # (`DIR/**` matches DIR and its subdirectories too)
        files = sorted(name for name in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(name))
        if not files:
            raise DejavuError(f"no files match {spec}")
        return files
    path = Path(spec).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in DIRECTORY_SUFFIXES and p.is_file())
        if not files:
            raise DejavuError(f"directory {path} holds no .txt/.jsonl/.parquet files")
        return files
    if spec.startswith((".", "/", "~")) or Path(spec).suffix in LOCAL_BUILDERS:
        raise DejavuError(f"dataset path not found: {spec}")
    return None


def _check_looks_like_text(path, text: str) -> None:
    """A binary file given as text (a model or tensor file named .txt) would tokenize into noise and train on it
    without a word: refused when NUL bytes make up more than 0.1 % of it. Text in another encoding (Latin-1)
    still reads, with a note, as its undecodable bytes become U+FFFD."""
    nul = text.count("\x00")
    if text and nul > 0.001 * len(text):
        raise DejavuError(f"{path} does not look like text: {nul} of its {len(text)} characters are NUL bytes "
                          "(a binary file?)")
    undecodable = text.count("\ufffd")
    if text and undecodable > 0.01 * len(text):
        print(f"note: {path}: {undecodable} of its {len(text)} characters are not UTF-8 and read as U+FFFD; "
              "re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)", file=sys.stderr)


def _jsonl_lines_are_objects(files: list[str]) -> None:
    """A .jsonl line that is an array, not an object, loads as a column of its items (strings as documents,
    numbers as a wrong field type): named by file and line. Only the first byte of each line is read here."""
    for name in files:
        if Path(name).suffix != ".jsonl":
            continue
        with open(name, "rb") as fh:
            if any(line.strip() and not line.lstrip().startswith(b"{") for line in fh):
                _raise_bad_json_line([name])


def load_texts(spec: str, split: str = "train", text_field: str = "text") -> list[str]:
    """All documents of a corpus as strings (raw text files come back whole, as one document)."""
    files = _local_files(spec)
    if files is not None:
        suffixes = {Path(f).suffix for f in files}
        builders = {LOCAL_BUILDERS.get(s) for s in suffixes}
        if None in builders or len(builders) != 1:
            raise DejavuError(f"cannot mix or read these file types: {sorted(suffixes)} (use .txt, .jsonl or .parquet)")
        builder = builders.pop()
        if builder == "text":
            # Read text whole: line-per-row loading loses the newlines that the model saw in training.
            # utf-8-sig: a byte-order mark is not text (it would start the first document as U+FEFF)
            texts = [Path(f).read_text(encoding="utf-8-sig", errors="replace") for f in files]
            for f, t in zip(files, texts, strict=True):
                _check_looks_like_text(f, t)
            return [t for t in texts if t.strip()]
        import datasets  # imported late: plain-text corpora need no `datasets` (e.g. on the GPU image)

        datasets.disable_progress_bars()
        try:
            with _datasets_errors_unlogged():
                ds = datasets.load_dataset(builder, data_files=files, split="train")
        except Exception as exc:  # datasets raises many types for unreadable files
            _raise_bad_json_line(files)
            raise DejavuError(f"cannot read {spec}: {_first_line(exc)}") from None
    else:
        import datasets

        datasets.disable_progress_bars()
        from dejavu.hub import hub_offline

        offline = hub_offline()
        name, _, config = spec.partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=split)
        except Exception as exc:
            where = " (the hub cannot be reached and it is not in the local cache)" if offline else ""
            raise DejavuError(f"cannot load dataset {spec!r} (split {split!r}){where}: "
                              f"{str(exc).splitlines()[0]}") from None
    if files is not None:
        _jsonl_lines_are_objects(files)
    if text_field not in ds.column_names:
        raise DejavuError(f"dataset {spec} has no field {text_field!r} (fields: {', '.join(ds.column_names)})")
    try:
        return _nonblank_texts(ds[text_field], spec, text_field)
    except UnicodeDecodeError:  # (decoded lazily, past the read above)
        if files is not None:
            _raise_bad_json_line(files)
        raise DejavuError(f"{spec} is not UTF-8 text") from None


@contextmanager
def _datasets_errors_unlogged():
    """`datasets` logs a failed read before raising it; the DejavuError raised for it says it once, on one line."""
    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)


def _first_line(exc: BaseException) -> str:
    """The most telling line of a `datasets` error: its generic wrapper hides the cause (bad JSON, bad parquet)."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if exc.__cause__ is not None and "error occurred while generating the dataset" in message:
        return _first_line(exc.__cause__)
    return message


def _raise_bad_json_line(files: list[str]) -> None:
    """Name the first line of a .jsonl file that is not one JSON object; `datasets` names neither file nor line."""
    for name in files:
        if Path(name).suffix != ".jsonl":
            continue
        with open(name, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.rstrip(b"\r\n"))
                except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
                    detail = f"{exc.msg}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
                    raise DejavuError(f"{name}:{lineno} is not valid JSON ({detail})") from None
                if not isinstance(record, dict):
                    raise DejavuError(f"{name}:{lineno} is not a JSON object (each line of a .jsonl file must be one)")


def _nonblank_texts(values: list, spec: str, text_field: str) -> list[str]:
    """The non-blank strings of a text column; missing values are skipped with a note (records of another shape
    would otherwise vanish unseen), any other type is refused."""
    texts, missing = [], 0
    for value in values:
        if value is None:
            missing += 1
            continue
        if not isinstance(value, str):
            raise DejavuError(f"{spec}: field {text_field!r} holds {type(value).__name__} values, not text")
        if value.strip():
            texts.append(value)
    if missing:
        print(f"note: {missing:,} of {len(values):,} records of {spec} have no {text_field!r} field (or null): skipped",
              file=sys.stderr, flush=True)
    return texts


def tokenize_stream(texts: list[str], tokenizer, name: str = "") -> torch.Tensor:
    """One long token stream; documents are joined with the EOS token when the tokenizer has one. `name`
    (a role and spec, e.g. "calibration corpus X") goes into the error when nothing is left."""
    ids: list[int] = []
    sep = tokenizer.eos_token_id
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None and len(texts) > 1:
            ids.append(sep)
    if not ids:
        raise DejavuError(f"the {name or 'corpus'} is empty after tokenisation")
    return torch.tensor(ids, dtype=torch.long)


def fixed_length_sequences(
    stream: torch.Tensor, seq_len: int, max_tokens: int | None, seed: int, shuffle: bool = True,
    strict_budget: bool = True,
) -> torch.Tensor:
    """[num_seqs, seq_len] chunks of the stream, seeded-shuffled, cut to the token budget."""
    n = stream.numel() // seq_len
    if n == 0:
        raise DejavuError(f"the corpus has {stream.numel()} tokens, fewer than one sequence of {seq_len}")
    chunks = stream[: n * seq_len].view(n, seq_len)
    if shuffle:
        gen = torch.Generator().manual_seed(seed)
        chunks = chunks[torch.randperm(n, generator=gen)]
    if max_tokens is not None:
        wanted = -(-max_tokens // seq_len)
        if wanted > n and strict_budget:
            raise DejavuError(
                f"--max-tokens {max_tokens} is more than the corpus holds ({n * seq_len} tokens in "
                f"sequences of {seq_len}); lower it or add data"
            )
        chunks = chunks[:wanted]
    return chunks
