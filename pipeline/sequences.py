"""One row per user: the full, time-ordered sequence (truncation to max_len is the trainer's job)."""

from __future__ import annotations

import polars as pl

from pipeline.schema import ITEM_IDX, ITEM_IDX_DTYPE, POS, TS, TS_DTYPE, USER_IDX, USER_IDX_DTYPE


def to_sequences(lf: pl.LazyFrame, event_features: list[str]) -> pl.LazyFrame:
    """Events (user_idx, item_idx, ts, POS, features) -> user_idx, item_idx list, ts list, feature lists.

    Stable time order: equal timestamps keep input order (POS is unique, so the order is total).
    Users come out sorted by user_idx.
    """
    # Rows in input order, then a stable sort by time inside each group (group_by keeps the row
    # order within a group): cheaper than sorting by (user, ts, POS) as three keys.
    in_time_order = [pl.col(c).sort_by(TS, maintain_order=True) for c in (ITEM_IDX, TS, *event_features)]
    return (lf.sort(POS)
            .group_by(USER_IDX).agg(in_time_order)
            .sort(USER_IDX)
            .select(pl.col(USER_IDX).cast(USER_IDX_DTYPE),
                    pl.col(ITEM_IDX).cast(pl.List(ITEM_IDX_DTYPE)),
                    pl.col(TS).cast(pl.List(TS_DTYPE)),
                    *event_features))
