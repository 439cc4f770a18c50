"""Cleaning steps on tiny golden frames; the k-core against a brute-force reference."""

from __future__ import annotations

import random

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from pipeline.clean import drop_duplicates, filter_rating, kcore_keep, restrict
from pipeline.schema import ITEM, POS, RATING, TS, USER


def events(rows: list[tuple]) -> pl.LazyFrame:
    return pl.LazyFrame(rows, schema={USER: pl.String, ITEM: pl.String, TS: pl.Int64, POS: pl.Int64},
                        orient="row")


def test_drop_duplicates_keeps_first_position_of_exact_duplicates():
    lf = events([("u", "a", 1, 0), ("u", "a", 1, 1), ("u", "a", 2, 2), ("v", "a", 1, 3), ("u", "a", 1, 4)])
    got = drop_duplicates(lf).collect().sort(POS)
    assert_frame_equal(got, events([("u", "a", 1, 0), ("u", "a", 2, 2), ("v", "a", 1, 3)]).collect())


def test_filter_rating_threshold_is_inclusive_and_drops_null_ratings():
    lf = pl.LazyFrame({USER: ["u"] * 4, RATING: [3.0, 4.0, None, 5.0]})
    assert filter_rating(lf, 4.0).collect()[RATING].to_list() == [4.0, 5.0]
    assert filter_rating(lf, None).collect().height == 4


def kcore(lf: pl.LazyFrame, min_user: int, min_item: int) -> pl.LazyFrame:
    """The k-core as pipeline/run.py applies it: the kept users and items, then the events of both."""
    keep, _ = kcore_keep(lf, min_user, min_item)
    return restrict(lf, keep)


def kcore_reference(rows: list[tuple[str, str]], min_user: int, min_item: int) -> set[tuple[str, str]]:
    """Literal spec: remove under-threshold users and items one pass at a time until nothing changes."""
    kept = list(rows)
    while True:
        users, items = {}, {}
        for u, i in kept:
            users[u] = users.get(u, 0) + 1
            items[i] = items.get(i, 0) + 1
        nxt = [(u, i) for u, i in kept if users[u] >= min_user and items[i] >= min_item]
        if len(nxt) == len(kept):
            return set(nxt)
        kept = nxt


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k_user,k_item", [(2, 2), (3, 2), (5, 5), (1, 4)])
def test_kcore_matches_brute_force(seed, k_user, k_item):
    rng = random.Random(seed)
    # skewed random bipartite log: some users/items are rare so the filter cascades
    pairs = {(f"u{int(rng.paretovariate(1.2)) % 40}", f"i{int(rng.paretovariate(1.0)) % 60}") for _ in range(400)}
    rows = sorted(pairs)
    lf = events([(u, i, 0, n) for n, (u, i) in enumerate(rows)])
    got = kcore(lf, k_user, k_item).collect()
    assert set(zip(got[USER], got[ITEM])) == kcore_reference(rows, k_user, k_item)


def test_kcore_cascades_across_rounds():
    # dropping item "x" (1 event) leaves user "b" with 1 event, which then must go too
    lf = events([("a", "y", 0, 0), ("a", "z", 0, 1), ("b", "x", 0, 2), ("b", "y", 0, 3), ("c", "y", 0, 4),
                 ("c", "z", 0, 5)])
    got = kcore(lf, 2, 2).collect()
    assert sorted(set(got[USER])) == ["a", "c"]
    assert sorted(set(got[ITEM])) == ["y", "z"]


def test_kcore_thresholds_of_one_keep_every_event():
    lf = events([("a", "y", 0, 0), ("b", "y", 0, 1), ("b", "z", 0, 2)])
    keep, kept_events = kcore_keep(lf, 1, 1)
    assert kept_events == 3 and keep[0].height == 2 and keep[1].height == 2
