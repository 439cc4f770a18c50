"""Find the input files and scan them lazily, all columns as read plus the input position POS.

Text formats are read with every column as a string (parsing is the next step's job) and one extra
sentinel column: a line with more fields than the header lands something in it (malformed line).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.schema import MOVIELENS_COLUMNS, POS, pos_expr

EXTRA = "_extra_field"  # non-null when a text line has more fields than the header
MOVIELENS_TYPES = dict(zip(MOVIELENS_COLUMNS, (pl.Int64, pl.Int64, pl.Float64, pl.Int64)))


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Each entry is a file, a directory (its visible files, sorted) or a glob (sorted matches)."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        else:
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not found:
            hint = (" (MovieLens: run `make data`; SinkBench: generate it as conf/pipeline/sinkbench.yaml says)"
                    if "data/raw" in pattern else "")
            raise PipelineError(f"input {pattern!r}: no such file, or a directory/glob with no files{hint}")
        files.extend(found)
    return files


@dataclass(frozen=True)
class TextLayout:
    separator: str
    header: tuple[str, ...]  # column names
    skip_rows: int  # 1 when the file's first line is the header


def text_layout(cfg: PipelineConfig, path: Path) -> TextLayout:
    separator = cfg.separator or ("," if cfg.format == "csv" else "\t")
    if cfg.format == "movielens":
        return TextLayout(separator, MOVIELENS_COLUMNS, 0)
    if not cfg.has_header:
        raise PipelineError(f"{path}: format {cfg.format!r} needs a header line naming the columns "
                            "(has_header: false is only meaningful with format: movielens)")
    try:
        header = tuple(pl.scan_csv(path, separator=separator, n_rows=0).collect_schema().names())
    except pl.exceptions.PolarsError as e:
        raise PipelineError(f"{path}: cannot read the header line as {cfg.format}: {e}") from e
    return TextLayout(separator, header, 1)


def scan_file(cfg: PipelineConfig, path: Path, file_index: int) -> tuple[pl.LazyFrame, list[str]]:
    """One file -> (LazyFrame of its columns + POS [+ EXTRA for text], the columns found)."""
    if cfg.format == "parquet":
        try:
            lf = pl.scan_parquet(path)
            columns = lf.collect_schema().names()
        except (pl.exceptions.PolarsError, OSError) as e:
            raise PipelineError(f"{path}: not a readable Parquet file ({e})") from e
    else:
        layout = text_layout(cfg, path)
        columns = list(layout.header)
        # MovieLens columns have known types: read them typed (several times faster than strings);
        # a value that does not parse becomes null and is reported as a bad row by the parse step.
        types = MOVIELENS_TYPES if cfg.format == "movielens" else {}
        schema = {c: types.get(c, pl.String) for c in columns} | {EXTRA: pl.String}
        lf = pl.scan_csv(path, separator=layout.separator, has_header=False, skip_rows=layout.skip_rows,
                         schema=schema, missing_columns="insert", truncate_ragged_lines=True,
                         quote_char='"', ignore_errors=bool(types))
    lf = lf.with_row_index("_record").with_columns(pos_expr(file_index)).drop("_record")
    return lf, columns


def scan(cfg: PipelineConfig, files: list[Path]) -> pl.LazyFrame:
    """All files, concatenated in order, with the columns the config needs checked up front."""
    needed = [cfg.user_col, cfg.item_col, cfg.time_col, *cfg.event_features, *cfg.item_features]
    if cfg.min_rating is not None and cfg.rating_col:
        needed.append(cfg.rating_col)
    needed = list(dict.fromkeys(needed))
    frames = []
    for i, path in enumerate(files):
        lf, columns = scan_file(cfg, path, i)
        missing = [c for c in needed if c not in columns]
        if missing:
            raise PipelineError(f"{path}: missing column(s) {missing}; columns found: {columns}. "
                                "Name the right ones with --user-col/--item-col/--time-col "
                                "(or the config keys of the same names)")
        keep = needed + [POS] + ([EXTRA] if cfg.format != "parquet" else [])
        frames.append(lf.select(keep))
    return pl.concat(frames, how="vertical_relaxed")
