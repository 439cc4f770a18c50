"""Cleaning steps, each `LazyFrame -> LazyFrame` over the working columns (see schema.py)."""

from __future__ import annotations

import polars as pl

from pipeline.schema import ITEM, POS, RATING, USER


def drop_duplicates(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Drop exact duplicate events (every column equal but POS); the first in input order stays."""
    keys = [c for c in lf.collect_schema().names() if c != POS]
    return lf.group_by(keys).agg(pl.col(POS).min())


def filter_rating(lf: pl.LazyFrame, min_rating: float | None) -> pl.LazyFrame:
    """Keep events rated at least `min_rating` (a null rating fails the threshold)."""
    if min_rating is None:
        return lf
    return lf.filter(pl.col(RATING) >= min_rating)


KeepTables = tuple[pl.DataFrame, pl.DataFrame]  # (users to keep, items to keep), one column each


def kcore_keep(lf: pl.LazyFrame, min_user: int, min_item: int, max_rounds: int = 1000) -> tuple[KeepTables, int]:
    """Iterative k-core: the users and items that survive, and the number of events left.

    Dropping an item can push a user under min_user and vice versa, so this is a fixed point. Each
    round is one streaming pass counting events per user and per item; only those small count
    tables are collected, the events stay where they are.
    """
    users: pl.DataFrame | None = None
    items: pl.DataFrame | None = None
    for _ in range(max_rounds):
        current = lf if users is None else restrict(lf, (users, items))
        user_counts, item_counts = pl.collect_all(
            [current.group_by(USER).len(), current.group_by(ITEM).len()], engine="streaming")
        keep_users = user_counts.filter(pl.col("len") >= min_user)
        keep_items = item_counts.filter(pl.col("len") >= min_item)
        if keep_users.height == user_counts.height and keep_items.height == item_counts.height:
            return (keep_users.select(USER), keep_items.select(ITEM)), int(user_counts["len"].sum())
        users, items = keep_users.select(USER), keep_items.select(ITEM)
    raise RuntimeError(f"k-core did not converge in {max_rounds} rounds")  # each round removes >= 1 row


def restrict(lf: pl.LazyFrame, keep: KeepTables) -> pl.LazyFrame:
    """Only the events whose user and item are both kept."""
    users, items = keep
    return lf.join(users.lazy(), on=USER, how="semi").join(items.lazy(), on=ITEM, how="semi")
