"""Parse step: raw columns -> typed working columns (USER, ITEM, TS, ...) plus per-row problem flags.

Ids keep their values: integer ids (and MovieLens ids) become Int64, anything else a string.
Timestamps become int64 seconds from integer or float seconds, ISO-8601 datetimes (naive ones are
UTC) or a strftime format. Rows with a problem are flagged here; `bad_row_report` turns the flags into an error naming file, line and column, or
`drop_bad_rows` removes them when the config says `on_bad_rows: skip`.
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.scan import EXTRA
from pipeline.schema import ITEM, POS, RATING, TS, USER, split_pos

# flag column -> what is wrong with a row that has it set
FLAGS: dict[str, str] = {
    "_bad_fields": "malformed line: more fields than the header has columns",
    "_null_user": "null or empty user id (movielens: or not an integer)",
    "_null_item": "null or empty item id (movielens: or not an integer)",
    "_bad_ts": "missing or unparseable timestamp",
    "_negative_ts": "negative timestamp",
}
_NUMBER = re.compile(r"^\s*[-+]?\d+(\.\d*)?([eE][-+]?\d+)?\s*$")


def resolve_time_format(raw: pl.LazyFrame, cfg: PipelineConfig) -> str:
    """'auto' -> 'unix' or 'iso', decided by the time column's type or its first non-null value."""
    if cfg.time_format != "auto":
        return cfg.time_format
    dtype = raw.collect_schema()[cfg.time_col]
    if dtype.is_numeric():
        return "unix"
    if dtype.is_temporal():
        return "iso"
    first = raw.select(cfg.time_col).drop_nulls().head(1).collect()  # reads only the first chunk
    return "unix" if first.height == 0 or _NUMBER.match(str(first.item())) else "iso"


def _timestamp_seconds(col: str, dtype: pl.DataType, time_format: str) -> pl.Expr:
    c = pl.col(col)
    if dtype.is_temporal():
        return c.cast(pl.Datetime("us")).dt.epoch("s") if dtype == pl.Date else c.dt.epoch("s")
    if dtype.is_integer():
        return c.cast(pl.Int64)
    if dtype.is_float():
        return c.floor().cast(pl.Int64, strict=False)
    s = c.cast(pl.String).str.strip_chars()
    if time_format == "unix":
        # Integers parse exactly; floats (e.g. "881250949.0") are floored to whole seconds.
        return pl.coalesce(s.str.to_integer(strict=False),
                           s.cast(pl.Float64, strict=False).floor().cast(pl.Int64, strict=False))
    fmt = None if time_format == "iso" else time_format
    return s.str.to_datetime(format=fmt, strict=False, time_zone="UTC", time_unit="us").dt.epoch("s")


def _id(col: str, dtype: pl.DataType) -> pl.Expr:
    """Integer ids stay Int64 (fast keys; their raw id string is the decimal form), others String.

    (MovieLens ids are read as integers by the scan: a non-integer arrives here as null.)
    """
    return pl.col(col).cast(pl.Int64 if dtype.is_integer() else pl.String)


def _null_or_empty(col: str) -> pl.Expr:
    c = pl.col(col)
    return c.is_null() | (c.cast(pl.String).str.len_bytes() == 0)


def parse(raw: pl.LazyFrame, cfg: PipelineConfig, time_format: str) -> pl.LazyFrame:
    """Raw scan -> USER, ITEM, TS [, RATING], event/item features, POS and the FLAGS columns."""
    schema = raw.collect_schema()
    ts = _timestamp_seconds(cfg.time_col, schema[cfg.time_col], time_format)
    columns = [_id(cfg.user_col, schema[cfg.user_col]).alias(USER),
               _id(cfg.item_col, schema[cfg.item_col]).alias(ITEM), ts.alias(TS)]
    if cfg.min_rating is not None:
        columns.append(pl.col(cfg.rating_col).cast(pl.Float64, strict=False).alias(RATING))
    features = list(dict.fromkeys([*cfg.event_features, *cfg.item_features]))
    columns += [pl.col(f) for f in features if f not in (cfg.user_col, cfg.item_col, cfg.time_col)]
    columns.append(pl.col(POS))
    bad_fields = pl.col(EXTRA).is_not_null() if EXTRA in schema else pl.lit(False)
    return raw.select(*columns, bad_fields.alias("_bad_fields")).with_columns(
        _null_or_empty(USER).alias("_null_user"),
        _null_or_empty(ITEM).alias("_null_item"),
        pl.col(TS).is_null().alias("_bad_ts"),
        (pl.col(TS) < 0).fill_null(False).alias("_negative_ts"),
    )


def any_bad() -> pl.Expr:
    return pl.any_horizontal(*FLAGS)


def drop_bad_rows(lf: pl.LazyFrame) -> pl.LazyFrame:
    return lf.filter(~any_bad()).drop(*FLAGS)


def bad_row_report(lf: pl.LazyFrame, cfg: PipelineConfig, files: list[Path], first: int = 5) -> tuple[int, str]:
    """(number of bad rows, a message naming each problem's count, column and first file:line)."""
    counts = lf.select(*(pl.col(f).sum() for f in FLAGS), any_bad().sum().alias("total")) \
               .collect(engine="streaming").row(0, named=True)
    total = counts["total"]
    if total == 0:
        return 0, ""
    column = {"_null_user": cfg.user_col, "_null_item": cfg.item_col,
              "_bad_ts": cfg.time_col, "_negative_ts": cfg.time_col}
    header_lines = 1 if cfg.format in ("csv", "tsv") else 0
    parts = []
    for flag, what in FLAGS.items():
        if not counts[flag]:
            continue
        rows = lf.filter(pl.col(flag)).select(POS).sort(POS).head(first).collect().to_series().to_list()
        where = ", ".join(_location(files, p, header_lines, cfg.format) for p in rows)
        col = f" in column {column[flag]!r}" if flag in column else ""
        parts.append(f"{counts[flag]:,} row(s) with {what}{col} (first: {where})")
    hint = ("expected integer seconds or ISO-8601 datetimes (or set time_format); "
            if counts["_bad_ts"] or counts["_negative_ts"] else "")
    return total, "; ".join(parts) + f". {hint}Fix the input or pass --on-bad-rows skip to drop such rows"


def _location(files: list[Path], pos: int, header_lines: int, fmt: str) -> str:
    file_index, record = split_pos(pos)
    unit = "row" if fmt == "parquet" else "line"
    return f"{files[file_index]}:{unit} {record + 1 + header_lines}"


def check_bad_rows(lf: pl.LazyFrame, cfg: PipelineConfig, files: list[Path]) -> int:
    """Raise on bad rows unless on_bad_rows is 'skip'; return how many there are."""
    total, message = bad_row_report(lf, cfg, files)
    if total and cfg.on_bad_rows == "error":
        raise PipelineError(message)
    return total
