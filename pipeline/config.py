"""Pipeline configuration: the dataclass defaults are the single source of truth.

A YAML file in conf/pipeline/ overrides some fields; command-line flags (one per field, read by
jsonargparse from the dataclass: pipeline/cli.py) override the YAML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cli import parse
from pipeline.errors import PipelineError

FORMATS = ("movielens", "csv", "tsv", "parquet")
ON_BAD_ROWS = ("error", "skip")
SPLITS = ("leave_one_out", "time_cutoff")


@dataclass
class PipelineConfig:
    # --- what to read
    name: str | None = None  # dataset name for the manifest; default: the config file's stem
    input: list[str] | str = field(default_factory=list)  # files, directories or globs; concatenated in order
    format: str = "csv"  # movielens (headerless TSV: user, item, rating, timestamp) | csv | tsv | parquet
    separator: str | None = None  # csv/tsv/movielens field separator; default "," for csv, tab otherwise
    has_header: bool = True  # csv/tsv: first line holds the column names (movielens: never)
    user_col: str = "user_id"  # column names as in the file's header
    item_col: str = "item_id"
    time_col: str = "timestamp"
    rating_col: str | None = "rating"  # only read when min_rating is set
    time_format: str = "auto"  # auto | unix (seconds, int or float) | iso (ISO-8601; naive = UTC) | strftime
    on_bad_rows: str = "error"  # error | skip: malformed lines, null ids, bad or negative timestamps
    # --- cleaning
    min_rating: float | None = None  # keep events with rating >= min_rating (None: keep all)
    min_user_interactions: int = 0  # iterative k-core: users with fewer events are dropped (<= 1: off)
    min_item_interactions: int = 0  # ... and items with fewer events, repeated until stable
    # --- side features
    event_features: list[str] = field(default_factory=list)  # kept as list columns in the shards
    item_features: list[str] = field(default_factory=list)  # first value per item, into items.parquet
    # --- output
    out: str | None = None  # output directory; default data/processed/<name>
    num_shards: int = 4  # users are spread over shards by a stable hash of the raw user id
    row_group_users: int = 1024  # users per Parquet row group (streaming reads load one group)
    split: str = "leave_one_out"  # leave_one_out | time_cutoff (recorded in the manifest for training)
    valid_ts: int | None = None  # time_cutoff: validation targets are events at or after this second
    test_ts: int | None = None  # time_cutoff: test targets are events at or after this second
    overwrite: bool = False  # replace an existing output built from a different config or input

    def __post_init__(self) -> None:
        if isinstance(self.input, str):  # one path (`input: data/raw/x.csv` in YAML)
            self.input = [self.input]

    def validate(self) -> None:
        """Raise PipelineError naming the first bad key and what would be right."""
        def bad(key: str, why: str) -> PipelineError:
            return PipelineError(f"config key {key!r} = {getattr(self, key)!r}: {why}")

        if not self.input:
            raise PipelineError("config key 'input' is empty: give --input PATH (a file, directory or glob)")
        if self.format not in FORMATS:
            raise bad("format", f"unknown format; expected one of {', '.join(FORMATS)}")
        if self.on_bad_rows not in ON_BAD_ROWS:
            raise bad("on_bad_rows", f"expected one of {', '.join(ON_BAD_ROWS)}")
        if self.split not in SPLITS:
            raise bad("split", f"expected one of {', '.join(SPLITS)}")
        if self.split == "time_cutoff" and (self.valid_ts is None or self.test_ts is None
                                            or self.valid_ts > self.test_ts):
            raise PipelineError("split 'time_cutoff' needs integer valid_ts <= test_ts (seconds); got "
                                f"valid_ts={self.valid_ts!r}, test_ts={self.test_ts!r}")
        if self.num_shards < 1:
            raise bad("num_shards", "must be >= 1")
        if self.row_group_users < 1:
            raise bad("row_group_users", "must be >= 1")
        if self.min_rating is not None and not self.rating_col:
            raise bad("min_rating", "needs rating_col to name the rating column")
        if self.separator is not None and len(self.separator.encode()) != 1:
            raise bad("separator", "must be a single byte, e.g. ',' or '\\t'")
        for key in ("user_col", "item_col", "time_col"):
            if not getattr(self, key):
                raise bad(key, "must name a column")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("data/processed") / str(self.name)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the output's content (where it goes and overwrite do not)."""
        d = dataclasses.asdict(self)
        for key in ("out", "overwrite"):
            d.pop(key)
        return d


def load(argv: list[str], prog: str = "python -m pipeline") -> PipelineConfig:
    """Dataclass defaults <- `--config` YAML file(s) <- flags (pipeline/cli.py), checked."""
    cfg, configs, _ = parse(PipelineConfig, argv, prog, DESCRIPTION)
    if cfg.name is None:
        cfg.name = configs[-1].stem if configs else "dataset"
    if cfg.out is None:
        cfg.out = str(cfg.out_dir)
    cfg.validate()
    return cfg


def load_file(path: str | Path) -> PipelineConfig:
    """`load` of one YAML file; PipelineError naming it if it is missing."""
    if not Path(path).is_file():
        raise PipelineError(f"config file {path} not found; the configs are in conf/pipeline/")
    return load(["--config", str(path)])


DESCRIPTION = ("Raw interaction logs -> time-ordered per-user sequences in sharded Parquet "
               "(docs/data_format.md). Every config key is a flag; flags override the YAML.")
