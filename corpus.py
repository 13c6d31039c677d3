"""Text corpora through `datasets`: a hub id, or local .txt/.jsonl/.parquet files, dirs or globs.

Shared by collect (calibration) and bench (evaluation), so it lives outside both stages.
"""

from __future__ import annotations

import glob
from pathlib import Path

import torch

from dejavu.errors import DejavuError

LOCAL_BUILDERS = {".txt": "text", ".raw": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _local_files(spec: str) -> list[str] | None:
    """The files a local spec names, or None when the spec is not local."""
    if any(ch in spec for ch in "*?["):
        files = sorted(glob.glob(spec, recursive=True))
        if not files:
            raise DejavuError(f"no files match {spec}")
        return files
    path = Path(spec).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS and p.is_file())
        if not files:
            raise DejavuError(f"directory {path} holds no .txt/.jsonl/.parquet files")
        return files
    if spec.startswith((".", "/", "~")) or Path(spec).suffix in LOCAL_BUILDERS:
        raise DejavuError(f"dataset path not found: {spec}")
    return None


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
            texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
            return [t for t in texts if t.strip()]
        import datasets  # imported late: plain-text corpora need no `datasets` (e.g. on the GPU image)

        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train")
        except Exception as exc:  # datasets raises many types for unreadable files
            raise DejavuError(f"cannot read {spec}: {exc}") from None
    else:
        import datasets

        datasets.disable_progress_bars()
        name, _, config = spec.partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=split)
        except Exception as exc:
            raise DejavuError(f"cannot load dataset {spec!r} (split {split!r}): {str(exc).splitlines()[0]}") from None
    if text_field not in ds.column_names:
        raise DejavuError(f"dataset {spec} has no field {text_field!r} (fields: {', '.join(ds.column_names)})")
    return [t for t in ds[text_field] if t and t.strip()]


def tokenize_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """One long token stream; documents are joined with the EOS token when the tokenizer has one."""
    ids: list[int] = []
    sep = tokenizer.eos_token_id
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None and len(texts) > 1:
            ids.append(sep)
    if not ids:
        raise DejavuError("the corpus is empty after tokenisation")
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
