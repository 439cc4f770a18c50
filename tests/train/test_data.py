"""Data module: manifest/sha256 checks, the leave-one-out views, and the rank/worker split."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from sinkrec.data import SeqRecDataModule, ShardError
from sinkrec.data.shards import load_manifest, read_shards
from tests.train.conftest import make_processed


def _users(loader) -> tuple[list[int], int]:
    seen, batches = [], 0
    for batch in loader:
        batches += 1
        seen += batch["user_idx"][batch["valid"]].tolist()
    return seen, batches


def test_sha_mismatch_and_missing_shard_name_the_file(tmp_path):
    root = make_processed(tmp_path / "d")
    shard = root / "shards" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="part-00001.parquet.*sha256"):
        SeqRecDataModule(str(root)).setup("fit")
    shard.unlink()
    with pytest.raises(ShardError, match="part-00001.parquet.*missing"):
        SeqRecDataModule(str(root)).setup("fit")
    with pytest.raises(ShardError, match="manifest"):
        SeqRecDataModule(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("bad", ["../outside.parquet", "shards/../../outside.parquet", "/etc/hostname"])
def test_shard_path_outside_the_dataset_is_refused(tmp_path, bad, verify):
    root = make_processed(tmp_path / "d")
    (tmp_path / "outside.parquet").write_bytes((root / "shards" / "part-00000.parquet").read_bytes())
    m = json.loads((root / "manifest.json").read_text())
    m["shards"][1]["path"] = bad
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="outside the dataset directory"):
        SeqRecDataModule(str(root), verify=verify).setup("fit")


def test_manifest_num_items_is_enforced(tmp_path):
    root = make_processed(tmp_path / "d", num_items=40)
    m = json.loads((root / "manifest.json").read_text())
    m["num_items"] = 10
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="num_items=10"):
        read_shards(root, load_manifest(root))


def test_leave_one_out_views_left_padded_with_timestamps(tiny_data):
    dm = SeqRecDataModule(str(tiny_data), max_len=8, batch_size=4, eval_batch_size=4)
    dm.setup()
    t = dm.table
    r = int(np.argmax(t.lengths))  # a user longer than max_len
    items, ts, _ = t.row(r)
    n = len(items)
    assert n > 10
    views = {}
    for stage in ("train", "valid", "test"):
        ds, rows, _ = dm.stage_dataset(stage)
        assert r in rows
        views[stage] = ds[r]
    tr = views["train"]  # all but the last two events; most recent max_len+1 of them
    np.testing.assert_array_equal(tr["items"], items[n - 2 - 9 : n - 3])
    np.testing.assert_array_equal(tr["targets"], items[n - 2 - 8 : n - 2])
    np.testing.assert_array_equal(tr["ts"], ts[n - 2 - 9 : n - 3])
    va, te = views["valid"], views["test"]
    np.testing.assert_array_equal(va["items"], items[n - 10 : n - 2])
    assert va["targets"][-1] == items[n - 2] and not va["targets"][:-1].any()
    np.testing.assert_array_equal(te["items"], items[n - 9 : n - 1])
    assert te["targets"][-1] == items[n - 1] and not te["targets"][:-1].any()
    # a batch: left padding, the most recent event at index -1, ts 0 at pads
    batch = next(iter(dm.loader("test", 0, 1)))
    lens = (batch["items"] > 0).sum(1)
    for b in range(len(lens)):
        L = int(lens[b])
        assert (batch["items"][b, : -L] == 0).all() and (batch["items"][b, -L:] > 0).all()
        assert (batch["ts"][b, : -L] == 0).all() and (batch["targets"][b, :-1] == 0).all()
        assert batch["targets"][b, -1] > 0


@pytest.mark.parametrize("world", [1, 2, 3, 7])
@pytest.mark.parametrize("stage", ["train", "valid", "test", "predict"])
def test_every_user_exactly_once_per_epoch_with_equal_batches(tiny_data, world, stage):
    dm = SeqRecDataModule(str(tiny_data), max_len=8, batch_size=4, eval_batch_size=5, bucket_batches=2)
    _, rows, _ = dm.stage_dataset(stage)
    expected = sorted(dm.table.user_idx[rows].tolist())
    for epoch in (0, 3):
        seen, counts, per_rank = [], [], []
        for rank in range(world):
            loader = dm.loader(stage, rank, world)
            loader.batch_sampler.sampler.set_epoch(epoch)
            users, batches = _users(loader)
            assert batches == len(loader)
            seen += users
            counts.append(batches)
            per_rank.append(set(users))
        assert sorted(seen) == expected, "each eligible user exactly once across the world"
        assert len(set(counts)) == 1, f"unequal batch counts per rank: {counts}"
        for a in range(world):
            for b in range(a + 1, world):
                assert not per_rank[a] & per_rank[b]


def test_train_order_seeded_per_epoch_and_independent_of_workers(tiny_data):
    dm = SeqRecDataModule(str(tiny_data), max_len=8, batch_size=4)

    def order(epoch, seed=1234, workers=0):
        dm.seed, dm.num_workers = seed, workers
        loader = dm.loader("train", 0, 2)
        loader.batch_sampler.sampler.set_epoch(epoch)
        return [b["user_idx"].tolist() for b in loader]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(0) != order(0, seed=7)
    assert order(1, workers=2) == order(1)


def test_bucketing_reduces_padding(tmp_path):
    root = make_processed(tmp_path / "d", n_users=200, min_len=4, max_len=60)
    dm = SeqRecDataModule(str(root), max_len=64, batch_size=8)

    def pads(bucket_batches):
        dm.bucket_batches = bucket_batches
        return sum(int((b["items"] == 0).sum()) for b in dm.loader("train", 0, 1))

    assert pads(16) < 0.5 * pads(1)


def test_few_shards_many_ranks_split_within_shards(tmp_path):
    root = make_processed(tmp_path / "d", n_users=30, n_shards=1)
    dm = SeqRecDataModule(str(root), batch_size=2, eval_batch_size=2)
    per_rank = [Counter(_users(dm.loader("test", r, 4))[0]) for r in range(4)]
    assert all(len(c) >= 7 for c in per_rank)  # 30 users over 4 ranks from a single shard
    assert sum(per_rank, Counter()) == Counter(range(30))


def test_padding_repeats_carry_no_targets(tiny_data):
    dm = SeqRecDataModule(str(tiny_data), batch_size=64, eval_batch_size=64)
    _, rows, _ = dm.stage_dataset("test")
    world = 7
    assert len(rows) % world  # so some ranks pad
    padded = 0
    for rank in range(world):
        for batch in dm.loader("test", rank, world):
            inv = ~batch["valid"]
            padded += int(inv.sum())
            if inv.any():
                assert (batch["targets"][inv] == 0).all() and (batch["items"][inv] > 0).any()
    assert padded == world - len(rows) % world


def test_time_cutoff_protocol_targets_after_the_cutoffs():
    from sinkrec.data.collate import eligible, make_example, stage_bounds

    ts = np.array([10, 20, 30, 40, 50, 60])
    items = np.arange(1, 7)
    split = {"protocol": "time_cutoff", "valid_ts": 35, "test_ts": 55}
    counts = {"valid_ts": np.array([3]), "test_ts": np.array([5])}
    got = {}
    for stage in ("train", "valid", "test"):
        end, first = stage_bounds(np.array([6]), counts, stage, split)
        assert eligible(end, first, stage)[0]
        got[stage] = make_example(items, ts, None, int(end[0]), int(first[0]), 10, 0, True)
    np.testing.assert_array_equal(got["train"]["targets"], [2, 3])  # only events before valid_ts
    np.testing.assert_array_equal(got["valid"]["items"], [1, 2, 3, 4])
    np.testing.assert_array_equal(got["valid"]["targets"], [0, 0, 4, 5])  # events in [valid_ts, test_ts)
    np.testing.assert_array_equal(got["test"]["targets"], [0, 0, 0, 0, 6])  # events at/after test_ts
