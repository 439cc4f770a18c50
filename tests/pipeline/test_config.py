"""Every config field is a CLI flag; flags override YAML; YAML overrides the dataclass defaults."""

from __future__ import annotations

import argparse
import dataclasses

from pipeline.config import PipelineConfig, add_config_flags, load
from tests.pipeline.conftest import write_text


def parse(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return vars(parser.parse_args(list(argv)))


def test_every_field_has_a_flag():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(PipelineConfig)} <= flags


def test_precedence_and_types(tmp_path):
    cfg_file = write_text(tmp_path / "demo.yaml", "input: [a.csv]\nnum_shards: 8\nmin_rating: 4\n")
    overrides = parse("--num-shards", "2", "--min-rating", "none", "--event-features", "kind", "genre",
                      "--overwrite", "--input", "b.csv", "c.csv")
    cfg = load(cfg_file, overrides)
    assert cfg.num_shards == 2 and cfg.min_rating is None and cfg.overwrite is True
    assert cfg.event_features == ["kind", "genre"] and cfg.input == ["b.csv", "c.csv"]
    assert cfg.name == "demo" and cfg.out == "data/processed/demo"  # derived from the file name
    assert cfg.min_item_interactions == PipelineConfig.min_item_interactions  # default untouched
    assert parse() == {}  # flags not given do not override anything


def test_shipped_configs_load():
    for name in ("ml-1m", "ml-100k", "sinkbench"):
        cfg = load(f"conf/pipeline/{name}.yaml", {})
        assert cfg.name == name and cfg.out == f"data/processed/{name}"
    ml1m = load("conf/pipeline/ml-1m.yaml", {})
    assert ml1m.min_user_interactions <= 1 and ml1m.min_item_interactions <= 1 and ml1m.split == "leave_one_out"
