"""Column names and dtypes: one source of truth for every step and for the output contract.

Internal (working) columns while events flow through the steps:
    USER, ITEM   raw ids as strings (any content)
    TS           int64 seconds since the Unix epoch
    POS          int64 input position: (file index << POS_FILE_SHIFT) | record index in that file.
                 It is the tie-breaker that keeps input order among equal timestamps and lets an
                 error point back at the file and line.
Output columns (docs/data_format.md, docs/CONTRACTS.md section 1) are the *_IDX / RAW_* names.
"""

from __future__ import annotations

import polars as pl

from pipeline.contract import FORMAT_VERSION, ITEM_IDX, TS, USER_IDX  # noqa: F401 (the output contract)

# Working columns.
USER = "user"
ITEM = "item"
RATING = "rating"
POS = "_pos"
SHARD = "_shard"

POS_FILE_SHIFT = 40  # 2**40 records per file, 2**23 files: far beyond any real log.

# Output columns (USER_IDX, ITEM_IDX, TS: pipeline.contract).
RAW_USER_ID = "raw_user_id"
RAW_ITEM_ID = "raw_item_id"

USER_IDX_DTYPE = pl.Int64
ITEM_IDX_DTYPE = pl.Int32
TS_DTYPE = pl.Int64

# The column names of a headerless MovieLens-style file (user, item, rating, timestamp).
MOVIELENS_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


def pos_expr(file_index: int) -> pl.Expr:
    """POS for the records of file `file_index`, built from a 0-based `_record` row index."""
    return (pl.lit(file_index, pl.Int64) * (1 << POS_FILE_SHIFT) + pl.col("_record").cast(pl.Int64)).alias(POS)


def split_pos(pos: int) -> tuple[int, int]:
    """POS -> (file index, 0-based record index in that file)."""
    return pos >> POS_FILE_SHIFT, pos & ((1 << POS_FILE_SHIFT) - 1)
