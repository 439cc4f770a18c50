"""Vocab ids, the stable shard hash and the per-user sequence step on golden frames."""

from __future__ import annotations

import polars as pl
from polars.testing import assert_frame_equal

from pipeline.schema import ITEM, ITEM_IDX, POS, TS, USER, USER_IDX
from pipeline.sequences import to_sequences
from pipeline.vocab import fnv1a_64, fnv1a_64_reference, item_vocab, items_table, user_vocab, users_table


def test_fnv1a_vectorised_equals_reference():
    strings = ["", "a", "1", "10", "hello, world", 'say "hi"', "ünïcödé ✓", "x" * 300, "a\r\nb", "10"]
    got = fnv1a_64(pl.Series(strings)).tolist()
    assert got == [fnv1a_64_reference(s) for s in strings]
    assert fnv1a_64_reference("a") == 0xAF63DC4C8601EC8C  # published FNV-1a 64 test vector


def test_vocab_ids_follow_first_appearance_and_start_at_one():
    lf = pl.LazyFrame({USER: [20, 10, 20], ITEM: ["b", "a", "c"], POS: [0, 1, 2], "genre": ["x", "y", "z"]})
    items = item_vocab(lf, ["genre"]).collect()
    assert_frame_equal(items_table(items), pl.DataFrame(
        {ITEM_IDX: pl.Series([1, 2, 3], dtype=pl.Int32), "raw_item_id": ["b", "a", "c"], "genre": ["x", "y", "z"]}))
    users = users_table(user_vocab(lf).collect(), num_shards=3)
    expected_shards = [fnv1a_64_reference(s) % 3 for s in ("20", "10")]  # integer ids hash as their digits
    assert_frame_equal(users, pl.DataFrame({USER_IDX: [1, 2], "raw_user_id": ["20", "10"],
                                            "shard": pl.Series(expected_shards, dtype=pl.Int32)}))


def test_sequences_sort_by_time_and_keep_input_order_on_ties():
    lf = pl.LazyFrame({
        USER_IDX: [2, 1, 1, 1, 1],
        ITEM_IDX: pl.Series([9, 5, 6, 7, 8], dtype=pl.Int32),
        TS: [5, 30, 10, 10, 20],
        POS: [0, 1, 3, 2, 4],  # items 7 (pos 2) and 6 (pos 3) tie at ts 10: 7 first
        "kind": pl.Series([1, 0, 1, 0, 1], dtype=pl.Int8),
    })
    expected = pl.DataFrame({
        USER_IDX: [1, 2],
        ITEM_IDX: pl.Series([[7, 6, 8, 5], [9]], dtype=pl.List(pl.Int32)),
        TS: [[10, 10, 20, 30], [5]],
        "kind": pl.Series([[0, 1, 1, 0], [1]], dtype=pl.List(pl.Int8)),
    })
    assert_frame_equal(to_sequences(lf, ["kind"]).collect(), expected)
