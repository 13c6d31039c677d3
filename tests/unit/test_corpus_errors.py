"""Corpora and token budgets a user gets wrong: each is one `error:` line naming the file or flag, found
before the model runs."""

from __future__ import annotations

import json
import re

import pytest

from dejavu.corpus import load_texts
from dejavu.errors import DejavuError

from helpers import CALIB_TXT


def _jsonl(path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _parquet(path, column: list) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": column}), path)
    return str(path)


@pytest.mark.parametrize("write, kind", [
    (lambda d: _parquet(d / "int.parquet", [1, 2, 3]), "int"),
    (lambda d: _jsonl(d / "null-then-int.jsonl", [{"text": None}, {"text": 5}]), "int"),
    (lambda d: _jsonl(d / "list.jsonl", [{"text": ["a", "b"]}]), "list"),
    (lambda d: _jsonl(d / "dict.jsonl", [{"text": {"en": "a"}}]), "dict"),
])
def test_a_text_field_that_is_not_text_is_refused(tmp_path, write, kind):
    spec = write(tmp_path)
    with pytest.raises(DejavuError, match=f"^{re.escape(spec)}: field 'text' holds {kind} values, not text$"):
        load_texts(spec)


def test_missing_and_blank_texts_are_skipped(tmp_path):
    rows = [{"text": None}, {"text": "  "}, {"text": "kept"}]
    assert load_texts(_jsonl(tmp_path / "a.jsonl", rows)) == ["kept"]
    assert load_texts(_parquet(tmp_path / "a.parquet", [None, "", "kept too"])) == ["kept too"]


def test_a_directory_without_corpus_files_says_so(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.json").write_text("{}")
    (other / "b.md").write_text("# notes\n")
    for directory in (empty, other):
        with pytest.raises(DejavuError, match=f"^directory {re.escape(str(directory))} holds no .txt/.jsonl/.parquet files$"):
            load_texts(str(directory))
    # a .json corpus named as a file is still read
    (other / "c.json").write_text(json.dumps([{"text": "hello"}]))
    assert load_texts(str(other / "c.json")) == ["hello"]


@pytest.mark.parametrize("lines, says", [
    (['{"text": "ok"}', '', '{"text": "x"', '{"text": "y"}'], r":3 is not valid JSON \(Expecting ',' delimiter"),
    (['{"text": "ok"}', '5'], r":2 is not a JSON object"),
    (['[1, 2]'], r":1 is not a JSON object"),  # alone it loads as a column of ints
])
def test_bad_json_lines_are_named_by_file_and_line(tmp_path, lines, says):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DejavuError, match=f"^{re.escape(str(path))}{says}") as caught:
        load_texts(str(path))
    assert "\n" not in str(caught.value)


def test_an_unreadable_parquet_names_its_cause(tmp_path):
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DejavuError, match="cannot read .*bad.parquet: .*[Pp]arquet") as caught:
        load_texts(str(tmp_path / "bad.parquet"))
    assert "error occurred while generating" not in str(caught.value)


def test_the_cli_prints_a_corpus_error_on_one_line(tmp_path, tiny_llama, capsys):
    from dejavu.cli.main import main

    spec = _parquet(tmp_path / "int.parquet", [1, 2])
    assert main(["collect", "-m", str(tiny_llama), "-d", spec, "-o", str(tmp_path / "run"), "--device", "cpu"]) == 1
    assert capsys.readouterr().err == f"error: {spec}: field 'text' holds int values, not text\n"
    assert not (tmp_path / "run").exists()


def test_a_bad_json_line_is_the_only_line_on_stderr(tmp_path, tiny_llama, capfd):
    from dejavu.cli.main import main

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    argv = ["collect", "-m", str(tiny_llama), "-d", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "run")]
    assert main(argv) == 1
    assert capfd.readouterr().err == f"error: {tmp_path / 'bad.jsonl'}:2 is not valid JSON (Expecting value, column 10)\n"


# --- the token budget of `dejavu collect` --------------------------------------------------------------
def _collect(tiny_llama, out, *flags: str) -> int:
    from dejavu.cli.main import main

    return main(["collect", "-c", "tiny", "-m", str(tiny_llama), "-d", str(CALIB_TXT), "-o", str(out),
                 "--device", "cpu", *flags])


@pytest.mark.parametrize("overrides, says", [
    ({"collect.max_tokens": 256, "data.seq_len": 256},
     "--max-tokens 256 is 1 sequence of --seq-len 256; collect needs at least 2 .*collect.eval_tokens.*"
     "use --max-tokens 512 or more"),
    ({"collect.max_tokens": 30}, "--max-tokens 30 is 1 sequence of --seq-len 64.*--max-tokens 128 or more"),
    ({"collect.eval_tokens": 0}, "collect.eval_tokens must be positive, got 0"),
])
def test_a_budget_without_train_and_eval_sequences_is_refused_before_the_model_runs(
        tmp_path, tiny_llama, monkeypatch, overrides, says):
    from dejavu.collect.collect import run_collect
    from dejavu.config import load_config
    from dejavu.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = load_config("tiny", {"model.name": str(tiny_llama), "model.device": "cpu", "data.dataset": str(CALIB_TXT),
                               **overrides})
    with pytest.raises(DejavuError, match=says):
        run_collect(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_cli_refuses_a_one_sequence_budget(tmp_path, tiny_llama, capsys):
    assert _collect(tiny_llama, tmp_path / "run", "--max-tokens", "256", "--seq-len", "256") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --max-tokens 256 is 1 sequence") and err.count("\n") == 1


def test_a_budget_rounded_up_to_whole_sequences_says_how_many_tokens(tmp_path, tiny_llama, capsys):
    assert _collect(tiny_llama, tmp_path / "run", "--max-tokens", "300") == 0
    out = capsys.readouterr().out
    assert "note: --max-tokens 300 rounded up to 320 tokens, 5 whole sequences of --seq-len 64" in out
    manifest = json.loads((tmp_path / "run" / "collect" / "manifest.json").read_text())
    assert manifest["tokens"] == 320 and manifest["train_tokens"] > 0 and manifest["eval_tokens"] > 0


def test_sequences_longer_than_the_context_are_refused_before_anything_is_written(tmp_path, tiny_model_factory,
                                                                                  capsys):
    # OPT's learned position table has no row past its context: this used to end in an IndexError
    assert _collect(tiny_model_factory("opt"), tmp_path / "run", "--max-tokens", "1024", "--seq-len", "512") == 1
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]  # (the tiny model's own save may print above it)
    assert last.startswith("error: --seq-len 512 is longer than") and "context of 256 positions" in last
    assert not (tmp_path / "run" / "collect").exists()


def test_a_binary_file_named_as_text_is_refused(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(DejavuError, match=r"does not look like text: .* NUL bytes \(a binary file\?\)"):
        load_texts(str(path))
    ok = tmp_path / "mostly.txt"  # a stray bad byte in real text still reads
    ok.write_bytes(b"plain text " * 200 + b"\xff")
    assert load_texts(str(ok))[0].startswith("plain text")


def test_latin1_text_reads_with_a_note(tmp_path, capsys):
    path = tmp_path / "french.txt"
    path.write_bytes("Les élèves étaient à l'école. ".encode("latin-1") * 50)
    assert load_texts(str(path))[0].startswith("Les ")
    assert "are not UTF-8 and read as U+FFFD; re-encode it as UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("line", ['["hello world"]', '[1, 2]'])
def test_an_array_line_is_named_whatever_it_holds(tmp_path, line):
    path = tmp_path / "arr.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    for field in ("text", "content"):
        with pytest.raises(DejavuError, match=r"arr.jsonl:2 is not a JSON object"):
            load_texts(str(path), text_field=field)


def test_a_path_with_brackets_a_bom_records_without_the_field_and_latin1_json(tmp_path, capsys):
    odd = tmp_path / "data[1].txt"  # an existing file is itself, not a glob
    odd.write_bytes("\ufeffhello world".encode())
    assert load_texts(str(odd)) == ["hello world"]  # the byte-order mark is not text
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"text": "kept"}) + "\n" + json.dumps({"body": "skipped"}) + "\n")
    assert load_texts(str(mixed)) == ["kept"]
    assert "1 of 2 records of" in capsys.readouterr().err
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DejavuError, match=r"latin\.jsonl:1 is not valid JSON \(not UTF-8\)"):
        load_texts(str(latin))


def test_a_recursive_glob_reads_the_files_below_it(tmp_path, monkeypatch):
    # `DIR/**` also matches DIR and its subdirectories, which were read as files of no type
    from dejavu.corpus import absolute_spec

    (tmp_path / "corp" / "sub").mkdir(parents=True)
    (tmp_path / "corp" / "a.txt").write_text("first document")
    (tmp_path / "corp" / "sub" / "b.txt").write_text("second document")
    monkeypatch.chdir(tmp_path)
    assert sorted(load_texts("corp/**")) == ["first document", "second document"]
    assert absolute_spec("corp/**") == str(tmp_path / "corp" / "**")
    assert absolute_spec("corp") == str(tmp_path / "corp")
    assert absolute_spec("HuggingFaceFW/fineweb") == "HuggingFaceFW/fineweb"  # a hub id, as given
