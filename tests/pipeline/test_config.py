"""Every config field is a flag (jsonargparse reads them from the dataclass); flags override YAML;
YAML overrides the dataclass defaults; the old flag spellings still work."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.cli import parser
from pipeline.config import PipelineConfig, load
from pipeline.errors import PipelineError
from tests.pipeline.conftest import write_text


def test_every_field_has_a_flag():
    flags = {a.dest for a in parser(PipelineConfig, "p", "")._actions}
    assert {f.name for f in dataclasses.fields(PipelineConfig)} <= flags


def test_precedence_and_types(tmp_path):
    cfg_file = write_text(tmp_path / "demo.yaml", "input: a.csv\nnum_shards: 8\nmin_rating: 4\n")
    cfg = load(["--config", cfg_file, "--num-shards", "2", "--min-rating", "none", "--event-features", "kind",
                "genre", "--overwrite", "--input", "b.csv", "c.csv"])
    assert cfg.num_shards == 2 and cfg.min_rating is None and cfg.overwrite is True
    assert cfg.event_features == ["kind", "genre"] and cfg.input == ["b.csv", "c.csv"]
    assert cfg.name == "demo" and cfg.out == "data/processed/demo"  # derived from the file name
    assert cfg.min_item_interactions == PipelineConfig.min_item_interactions  # default untouched
    assert load(["--config", cfg_file]).input == ["a.csv"]  # a single path in YAML is a list of one
    assert load(["--config", cfg_file]).min_rating == 4.0


@pytest.mark.parametrize("argv,key,value", [
    (["--num_shards", "3"], "num_shards", 3),  # jsonargparse's own spellings
    (["--input", "[x.csv, y.csv]"], "input", ["x.csv", "y.csv"]),
    (["--input+", "y.csv"], "input", ["x.csv", "y.csv"]),
    (["--overwrite", "true"], "overwrite", True),
    (["--overwrite", "--no-overwrite"], "overwrite", False),
    (["--has-header=false"], "has_header", False),
    (["--min_rating", "null"], "min_rating", None),
    (["--event-features"], "event_features", []),  # a list flag alone empties the list
])
def test_flag_spellings(argv, key, value):
    assert getattr(load(["--input", "x.csv", *argv]), key) == value


def test_later_config_files_win(tmp_path):
    a = write_text(tmp_path / "a.yaml", "input: a.csv\nnum_shards: 8\nformat: tsv\n")
    b = write_text(tmp_path / "b.yaml", "num_shards: 3\n")
    cfg = load(["--config", a, "--config", b])
    assert (cfg.num_shards, cfg.format, cfg.name) == (3, "tsv", "b")


def test_a_bad_value_names_the_key():
    with pytest.raises(PipelineError, match="num_shards"):
        load(["--input", "x.csv", "--num-shards", "many"])


def test_shipped_configs_load():
    for name in ("ml-1m", "ml-100k", "sinkbench"):
        cfg = load(["--config", f"conf/pipeline/{name}.yaml"])
        assert cfg.name == name and cfg.out == f"data/processed/{name}"
    ml1m = load(["--config", "conf/pipeline/ml-1m.yaml"])
    assert ml1m.min_user_interactions <= 1 and ml1m.min_item_interactions <= 1 and ml1m.split == "leave_one_out"
