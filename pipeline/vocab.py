"""Contiguous ids (1..N, 0 is padding) for users and items, in order of first appearance,
and the stable hash that puts each user in one shard.

The vocab tables keep the raw ids (written as strings whatever their type in the input).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.schema import (
    ITEM,
    ITEM_IDX,
    ITEM_IDX_DTYPE,
    POS,
    RAW_ITEM_ID,
    RAW_USER_ID,
    USER,
    USER_IDX,
    USER_IDX_DTYPE,
)

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


def fnv1a_64_reference(text: str) -> int:
    """64-bit FNV-1a of the UTF-8 bytes: the spec that `fnv1a_64` vectorises."""
    h = int(FNV_OFFSET)
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * int(FNV_PRIME)) & 0xFFFF_FFFF_FFFF_FFFF
    return h


def fnv1a_64(strings: pl.Series | pa.Array) -> np.ndarray:
    """64-bit FNV-1a of each string's UTF-8 bytes, vectorised over strings (uint64[n]).

    Unlike `Series.hash`, this is stable across Polars versions and machines, so a user's shard
    never moves. Strings are visited longest first so step j touches only those longer than j:
    total work is the number of bytes.
    """
    arr = strings.to_arrow() if isinstance(strings, pl.Series) else strings
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.large_string())
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=len(arr) + 1, offset=arr.offset * 8)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")
    starts, lengths = starts[order], lengths[order]
    h = np.full(len(arr), FNV_OFFSET, dtype=np.uint64)
    max_len = int(lengths[0]) if len(lengths) else 0
    active = len(arr)
    with np.errstate(over="ignore"):
        for j in range(max_len):
            while active and lengths[active - 1] <= j:  # lengths are sorted descending
                active -= 1
            h[:active] = (h[:active] ^ data[starts[:active] + j]) * FNV_PRIME
    out = np.empty_like(h)
    out[order] = h
    return out


def shard_of(ids: pl.Expr, num_shards: int) -> pl.Expr:
    """The shard of each raw user id: fnv1a_64(its string form) mod num_shards (int32)."""
    def hash_mod(batch: pl.Series) -> pl.Series:
        # Hash each distinct id of the batch once: events of a user usually come together.
        distinct = batch.unique()
        shards = pl.Series((fnv1a_64(distinct.cast(pl.String)) % np.uint64(num_shards)).astype(np.int32))
        return batch.replace_strict(distinct, shards, default=0, return_dtype=pl.Int32)
    return ids.map_batches(hash_mod, return_dtype=pl.Int32, is_elementwise=True)


def item_vocab(lf: pl.LazyFrame, item_features: list[str]) -> pl.LazyFrame:
    """ITEM -> item_idx (int32, 1..N by first appearance) and the first value of each item feature."""
    firsts = [pl.col(f).sort_by(POS).first() for f in item_features]
    return (lf.group_by(ITEM).agg(pl.col(POS).min(), *firsts)
            .sort(POS)
            .with_row_index(ITEM_IDX, offset=1)
            .select(pl.col(ITEM_IDX).cast(ITEM_IDX_DTYPE), ITEM, *item_features))


def user_vocab(lf: pl.LazyFrame) -> pl.LazyFrame:
    """USER -> user_idx (int64, 1..U by first appearance)."""
    return (lf.group_by(USER).agg(pl.col(POS).min())
            .sort(POS)
            .with_row_index(USER_IDX, offset=1)
            .select(pl.col(USER_IDX).cast(USER_IDX_DTYPE), USER))


def items_table(items: pl.DataFrame) -> pl.DataFrame:
    """items.parquet: item_idx, raw_item_id (string), item features."""
    return items.with_columns(pl.col(ITEM).cast(pl.String)).rename({ITEM: RAW_ITEM_ID})


def users_table(users: pl.DataFrame, num_shards: int) -> pl.DataFrame:
    """users.parquet: user_idx, raw_user_id (string), shard (the shard file holding the user)."""
    raw = pl.col(USER).cast(pl.String)
    return users.select(USER_IDX, raw.alias(RAW_USER_ID), shard_of(raw, num_shards).alias("shard"))


def apply_vocab(lf: pl.LazyFrame, users: pl.DataFrame, items: pl.DataFrame) -> pl.LazyFrame:
    """Events with raw ids -> events with user_idx and item_idx (raw ids dropped)."""
    return (lf.join(users.lazy().select(USER, USER_IDX), on=USER, how="inner")
            .join(items.lazy().select(ITEM, ITEM_IDX), on=ITEM, how="inner")
            .drop(USER, ITEM))
