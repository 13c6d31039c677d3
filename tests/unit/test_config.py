"""Config precedence (flag > file > default), validation, and unknown-key refusal."""

from __future__ import annotations

import pytest

from dejavu.config import DataConfig, RunConfig, beside_repository, load_config
from dejavu.errors import DejavuError


def test_shipped_default_and_precedence(tmp_path):
    cfg = load_config()
    assert cfg.model.name == "smollm2-135m"
    f = tmp_path / "c.yaml"
    f.write_text("collect:\n  max_tokens: 1000\n  batch_size: 2\ntrain:\n  rank: 32\n")
    cfg = load_config(f, {"collect.max_tokens": 500, "train.rank": None})
    assert cfg.collect.max_tokens == 500  # flag beats file
    assert cfg.collect.batch_size == 2  # file beats default
    assert cfg.train.rank == 32  # an unset flag leaves the file's value
    assert cfg.train.epochs == RunConfig().train.epochs  # default


def test_a_file_setting_one_key_leaves_the_others_at_the_shipped_defaults(tmp_path):
    # the shipped file's values (what --help and the README give) stay under a user's file, not the
    # bare dataclass defaults: before, any --config silently moved rank 40 -> 128, lr and export densities
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  seq_len: 128\n")
    shipped, mine = load_config(), load_config(f)
    assert mine.data.seq_len == 128
    for section in ("model", "collect", "train", "export", "runtime"):
        assert getattr(mine, section) == getattr(shipped, section), section
    assert (mine.train.rank, mine.export.head_density) == (40, 1.0)


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("collect:\n  max_tokenz: 10\n")
    with pytest.raises(DejavuError, match="unknown key 'max_tokenz'"):
        load_config(f)
    f.write_text("colect: {}\n")
    with pytest.raises(DejavuError, match="unknown key 'colect'"):
        load_config(f)
    with pytest.raises(DejavuError, match="train.mlp_density must be in"):
        load_config(None, {"train.mlp_density": 1.5})
    with pytest.raises(DejavuError, match="expected an integer"):
        load_config(None, {"collect.max_tokens": "many"})
    with pytest.raises(DejavuError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    # a list's entries are checked as its kind, with the entry named (these raised TypeError deep inside)
    for text, message in (("collect: {mlp_label_densities: [abc]}", r"collect.mlp_label_densities\[0\]: expected a number"),
                          ("runtime: {batch_sizes: [1, a]}", r"runtime.batch_sizes\[1\]: expected an integer"),
                          ("train: {layers: [x]}", r"train.layers\[0\]: expected an integer"),
                          ("train: {layers: [1, null]}", r"train.layers\[1\]: expected an integer, got null")):
        f.write_text(text + "\n")
        with pytest.raises(DejavuError, match=message):
            load_config(f)
    f.write_text("collect: {mlp_label_densities: ['0.3', 0.5]}\nruntime: {batch_sizes: [1.0, '4']}\n")
    cfg = load_config(f)
    assert cfg.collect.mlp_label_densities == [0.3, 0.5] and cfg.runtime.batch_sizes == [1, 4]


def test_round_trip_and_hash():
    cfg = load_config("tiny")
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.hash() == cfg.hash()
    again.train.rank += 1
    assert again.hash() != cfg.hash()


def test_later_stages_start_from_the_earlier_config(tmp_path):
    """flag > --config file > the earlier stage's config > defaults."""
    earlier = load_config(None, {"train.rank": 64, "train.epochs": 7, "model.name": "some/model"}).to_dict()
    cfg = load_config(None, {"train.epochs": 2}, base=earlier)
    assert (cfg.model.name, cfg.train.rank, cfg.train.epochs) == ("some/model", 64, 2)
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  rank: 16\n")
    cfg = load_config(f, {"train.epochs": None}, base=earlier)
    assert (cfg.model.name, cfg.train.rank, cfg.train.epochs) == ("some/model", 16, 7)
    with pytest.raises(DejavuError, match="unknown key"):
        load_config(None, None, base={"train": {"rnak": 3}})


def test_sections_an_earlier_stage_ran_with_stay_as_they_ran(tmp_path, capsys):
    # train-predictors -c FILE must not describe the collected data with the file's seq_len
    earlier = load_config(None, {"data.seq_len": 256, "collect.max_tokens": 2048}).to_dict()
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  seq_len: 512\ncollect:\n  max_tokens: 65536\ntrain:\n  rank: 8\n")
    cfg = load_config(f, {}, base=earlier, base_source="collect manifest's config",
                      fixed=("model", "data", "collect"))
    assert (cfg.data.seq_len, cfg.collect.max_tokens, cfg.train.rank) == (256, 2048, 8)
    err = capsys.readouterr().err
    assert "data.seq_len, collect.max_tokens" in err and "kept as the collect manifest's config has them" in err
    # the shipped corpus saved as an absolute path is the same setting as the file's relative one: no note
    ran = load_config().to_dict()
    ran["data"]["dataset"] = str(beside_repository(DataConfig.dataset))
    load_config("smollm2-135m", {}, base=ran, fixed=("model", "data", "collect"))
    assert "kept as" not in capsys.readouterr().err


def test_export_may_name_another_calibration_corpus_in_its_file(tmp_path):
    # export keeps the run's model/collect/train, but `data` is the corpus thresholds calibrate on
    from dejavu.export.bundle import _export_config

    ran = load_config(None, {"data.dataset": "train.txt"}).to_dict()
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  dataset: calib.jsonl\n  text_field: content\n  split: validation\ntrain:\n  rank: 8\n")
    cfg = _export_config({"config": ran}, f, {})
    assert (cfg.data.dataset, cfg.data.text_field, cfg.data.split) == ("calib.jsonl", "content", "validation")
    assert cfg.train.rank == ran["train"]["rank"]


@pytest.mark.parametrize("per_layer,says", [({2: None}, "must be a density"), ({"abc": 0.3}, "not a layer index"),
                                            ({1: True}, "must be a density")])
def test_per_layer_densities_name_the_bad_entry(per_layer, says):
    with pytest.raises(DejavuError, match=says):
        load_config(None, {"export.mlp_density_per_layer": per_layer})


def test_null_a_repeated_key_and_an_empty_label_list_are_refused(tmp_path):
    """YAML null once passed for keys that cannot be empty (tracebacks later, or a default silently off), a section
    given twice kept only the last, and no label densities gave a collection no training could use."""
    cases = {"train:\n  lr: null\n": r"train\.lr: null is not a value for this key",
             "data:\n  dataset: null\n": r"data\.dataset: null is not a value",
             "collect:\n  record_down_input: null\n": r"collect\.record_down_input: null is not a value",
             "data:\n  seq_len: 64\ncollect:\n  max_tokens: 512\ndata:\n  seed: 3\n": r"the key 'data' is given twice",
             "collect:\n  mlp_label_densities: []\n": r"collect\.mlp_label_densities is empty"}
    for text, says in cases.items():
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(DejavuError, match=says):
            load_config(str(path))
    path.write_text("export:\n  mlp_density: null\n")  # an optional key: null is its "not set"
    assert load_config(str(path)).export.mlp_density is None


def test_a_config_file_that_moves_the_tuning_corpus_says_so(tmp_path, capsys):
    """Every shipped config names a corpus: `tune-predictors -c FILE` took the file's without a word."""
    from dejavu.train.tune import resolve_tune_config

    base = RunConfig().to_dict()
    base["data"]["dataset"] = str(tmp_path / "the-runs-corpus.txt")
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: other.txt\n  seq_len: 64\n")
    cfg = resolve_tune_config(base, str(path), {})
    assert cfg.data.seq_len == 64 and cfg.data.dataset.endswith("other.txt")
    err = capsys.readouterr().err
    assert "sets the tuning's corpus settings: data.dataset = " in err and "(collect: " in err
    assert "data.seq_len = 64 (collect: 2048)" in err or "data.seq_len = 64" in err
    resolve_tune_config(base, str(path), {"data.dataset": "flag.txt", "data.seq_len": 64})  # flags: nothing to say
    assert "corpus settings" not in capsys.readouterr().err


def test_empty_names_out_of_range_seeds_and_repeated_label_densities(tmp_path):
    # '' read the working directory as the corpus; a seed past 64 bits failed after the model loaded; [0.5, 0.5]
    # from a file was another setting than the same flag, which drops repeats
    from dejavu.config import load_config
    from dejavu.errors import DejavuError

    for key in ("data.dataset", "model.name"):
        with pytest.raises(DejavuError, match=rf"{key} \(--.*\) is empty"):
            load_config(None, {key: " "})
    for key in ("data.seed", "train.seed"):
        with pytest.raises(DejavuError, match=rf"{key} must be between -2\*\*63 and 2\*\*64 - 1"):
            load_config(None, {key: 10 ** 20})
    config = tmp_path / "c.yaml"
    config.write_text("collect:\n  mlp_label_densities: [0.5, 0.3, 0.5]\n")
    assert load_config(str(config), {}).collect.mlp_label_densities == [0.5, 0.3]
