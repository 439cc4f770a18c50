"""Data module: manifest/sha256 checks, the leave-one-out views, and the streamed rank/worker split."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DataLoader

from sinkrec.data import SeqRecDataModule, ShardError
from sinkrec.data.stream import EpochSampler, StageStream, identity, stage_examples
from tests.train.conftest import make_processed, stored_rows


def _users(loader) -> tuple[list[int], int]:
    seen, batches = [], 0
    for batch in loader:
        batches += 1
        seen += batch["user_idx"][batch["real_row"]].tolist()
    return seen, batches


def _all_rows(dm: SeqRecDataModule) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """user_idx -> (items, ts), read unit by unit."""
    return {u: (items, ts) for u, (items, ts, _) in stored_rows(dm).items()}


def _manifest_edit(root, fn) -> None:
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m))


def test_sha_mismatch_and_missing_shard_name_the_file(tmp_path):
    root = make_processed(tmp_path / "d")
    shard = root / "shards" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[8] ^= 0xFF  # inside the first data page: the footer still parses, the hash differs
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="part-00001.parquet.*sha256"):
        SeqRecDataModule(str(root), verify="full").setup("fit")
    with pytest.raises(ShardError, match="part-00001.parquet.*sha256"):  # "own": before its rows are used
        _users(SeqRecDataModule(str(root), verify="own").loader("test", 0, 1))
    shard.unlink()
    for verify in ("full", "own", "off"):
        with pytest.raises(ShardError, match="part-00001.parquet.*missing"):
            SeqRecDataModule(str(root), verify=verify).setup("fit")
    with pytest.raises(ShardError, match="manifest"):
        SeqRecDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="data.verify='yes' must be one of"):
        SeqRecDataModule(str(root), verify="yes")


def test_verify_own_hashes_only_the_shards_a_rank_reads(tmp_path):
    root = make_processed(tmp_path / "d", n_users=40, n_shards=2)  # 2 shards, 2 ranks, no shuffle (test)
    shard = root / "shards" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[8] ^= 0xFF  # inside the first data page: the footer still parses, the hash differs
    shard.write_bytes(bytes(data))
    dm = SeqRecDataModule(str(root), verify="own", eval_batch_size=4)
    plan = [{u.shard for u in dm.stream("test", r, 2).slot_plan(0, r)} for r in range(2)]
    clean = next(r for r in range(2) if 1 not in plan[r])
    _users(dm.loader("test", clean, 2))  # this rank never opens the corrupt shard: no error, no hashing of it
    with pytest.raises(ShardError, match="part-00001.parquet.*sha256"):
        _users(dm.loader("test", 1 - clean, 2))


@pytest.mark.parametrize("verify", ["full", "own", "off"])
def test_truncated_shard_and_wrong_counts_name_the_file(tmp_path, verify):
    root = make_processed(tmp_path / "d")
    _manifest_edit(root, lambda m: m["shards"][2].update(rows=m["shards"][2]["rows"] + 1))
    with pytest.raises(ShardError, match="part-00002.parquet: .* rows, .*manifest.json says"):
        SeqRecDataModule(str(root), verify="off").setup()
    root = make_processed(tmp_path / "e")
    shard = root / "shards" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])  # cut off the footer
    with pytest.raises(ShardError, match="part-00000.parquet"):
        SeqRecDataModule(str(root), verify=verify).setup()


@pytest.mark.parametrize("verify", ["full", "own", "off"])
@pytest.mark.parametrize("bad", ["../outside.parquet", "shards/../../outside.parquet", "/etc/hostname"])
def test_shard_path_outside_the_dataset_is_refused(tmp_path, bad, verify):
    root = make_processed(tmp_path / "d")
    (tmp_path / "outside.parquet").write_bytes((root / "shards" / "part-00000.parquet").read_bytes())
    _manifest_edit(root, lambda m: m["shards"][1].update(path=bad))
    with pytest.raises(ShardError, match="outside the dataset directory"):
        SeqRecDataModule(str(root), verify=verify).setup("fit")


def test_item_ids_outside_the_catalogue_name_file_row_group_and_user(tmp_path):
    root = make_processed(tmp_path / "d", num_items=40)
    _manifest_edit(root, lambda m: m.update(num_items=10))
    with pytest.raises(ShardError, match=r"part-0000\d.parquet \(row group 0\): item id \d+ of user_idx \d+ "
                                         r"is outside 1..10"):
        _users(SeqRecDataModule(str(root), verify="off").loader("train", 0, 1))


def test_ids_stay_small_and_side_columns_keep_their_dtype(tmp_path):
    root = make_processed(tmp_path / "d", kind=True)
    dm = SeqRecDataModule(str(root))
    dm.setup()
    rows = dm.index.read(dm.index.units(1)[0])
    assert rows.items.dtype == np.int32 and rows.side["kind"].dtype == np.int8


def test_leave_one_out_views_left_padded_with_timestamps(tiny_data):
    dm = SeqRecDataModule(str(tiny_data), max_len=8, batch_size=4, eval_batch_size=4)
    users = _all_rows(dm)
    u = max(users, key=lambda k: len(users[k][0]))  # a user longer than max_len
    items, ts = users[u]
    n = len(items)
    assert n > 10
    views = {}
    for stage in ("train", "val", "test"):
        for unit in dm.index.units(1):
            for ex in stage_examples(dm.index.read(unit), stage, dm.manifest["split"], 8, None):
                if ex["user_idx"] == u:
                    views[stage] = ex
    tr = views["train"]  # all but the last two events; most recent max_len+1 of them
    np.testing.assert_array_equal(tr["items"], items[n - 2 - 9 : n - 3])
    np.testing.assert_array_equal(tr["targets"], items[n - 2 - 8 : n - 2])
    np.testing.assert_array_equal(tr["ts"], ts[n - 2 - 9 : n - 3])
    va, te = views["val"], views["test"]
    np.testing.assert_array_equal(va["items"], items[n - 10 : n - 2])
    assert va["targets"][-1] == items[n - 2] and not va["targets"][:-1].any()
    np.testing.assert_array_equal(te["items"], items[n - 9 : n - 1])
    batch = next(b for b in dm.loader("test", 0, 1) if u in b["user_idx"].tolist())
    row = batch["user_idx"].tolist().index(u)
    assert batch["items"][row, -1] == items[n - 2] and batch["targets"][row, -1] == items[n - 1]
    assert batch["ts"][row, -1] == ts[n - 2]


@pytest.mark.parametrize("world", [1, 2, 3, 7])
@pytest.mark.parametrize("stage", ["train", "val", "test", "predict"])
def test_every_user_exactly_once_per_epoch_with_equal_batches(tiny_data, world, stage):
    dm = SeqRecDataModule(str(tiny_data), max_len=8, batch_size=4, eval_batch_size=5, bucket_batches=2)
    expected = sorted(_all_rows(dm))  # every tiny user has >= 4 events: eligible in every stage
    for epoch in (0, 3):
        seen, counts, per_rank = [], [], []
        for rank in range(world):
            loader = dm.loader(stage, rank, world)
            loader.sampler.set_epoch(epoch)  # what Lightning calls
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


def test_a_rank_reads_only_its_share(tmp_path, monkeypatch):
    root = make_processed(tmp_path / "d", n_users=120, n_shards=4)
    dm = SeqRecDataModule(str(root), batch_size=4)
    dm.setup()
    read = []
    original = dm.index.read
    monkeypatch.setattr(dm.index, "read", lambda unit: read.append(unit) or original(unit))
    per_rank = []
    for rank in range(4):
        read.clear()
        _users(dm.loader("train", rank, 4))
        per_rank.append(sum(u.rows for u in read))
    assert per_rank == [30, 30, 30, 30]  # rows decoded per rank: a quarter each, never the whole dataset


def _order(dm, epoch, workers=0, rank=0, world=2, direct=False):
    dm.num_workers = workers
    if direct:  # the same plan (`workers` slots per rank) read in this process
        ds = StageStream(dm.index, "train", rank, world, workers, dm.batch_size, dm.bucket_batches,
                         dm.shuffle_buffer, dm.max_len, dm.seed, None)
        loader = DataLoader(ds, sampler=EpochSampler(len(ds)), batch_size=None, collate_fn=identity)
    else:
        loader = dm.loader("train", rank, world)
    loader.sampler.set_epoch(epoch)
    return [b["user_idx"].tolist() for b in loader]


def test_train_order_seeded_per_epoch_and_the_same_with_workers(tiny_data):
    dm = SeqRecDataModule(str(tiny_data), max_len=8, batch_size=4)
    dm.setup()
    assert _order(dm, 0) == _order(dm, 0)
    assert _order(dm, 0) != _order(dm, 1)
    dm.seed = 7
    other_seed = _order(dm, 0)
    dm.seed = 1234
    assert _order(dm, 0) != other_seed
    # worker processes build exactly what the same plan builds in one process: no timing dependence
    assert _order(dm, 1, workers=2) == _order(dm, 1, workers=2, direct=True)


def test_shuffle_pool_bounds_memory_but_still_mixes_units(tmp_path):
    root = make_processed(tmp_path / "d", n_users=200, n_shards=2)
    dm = SeqRecDataModule(str(root), batch_size=4, bucket_batches=1)
    dm.setup()

    def first_batch_users(buffer):
        dm.shuffle_buffer = buffer
        return _order(dm, 0, world=1)[0]

    assert first_batch_users(1) != first_batch_users(64)  # a pool of 1 = unit order; 64 mixes users


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


def test_rank_balancing_batches_carry_no_targets(tiny_data):
    dm = SeqRecDataModule(str(tiny_data), batch_size=64, eval_batch_size=4)
    n_users = len(_all_rows(dm))
    world = 7
    assert n_users % world  # so some ranks run short
    empty = 0
    for rank in range(world):
        for batch in dm.loader("test", rank, world):
            inv = ~batch["real_row"]
            if inv.any():
                empty += 1
                assert inv.all() and (batch["targets"] == 0).all() and (batch["items"] == 0).all()
    assert empty > 0


def test_time_cutoff_protocol_targets_after_the_cutoffs():
    from sinkrec.data.collate import eligible, make_example, stage_bounds

    ts = np.array([10, 20, 30, 40, 50, 60])
    items = np.arange(1, 7)
    split = {"protocol": "time_cutoff", "valid_ts": 35, "test_ts": 55}
    counts = {"valid_ts": np.array([3]), "test_ts": np.array([5])}
    got = {}
    for stage in ("train", "val", "test"):
        end, first = stage_bounds(np.array([6]), counts, stage, split)
        assert eligible(end, first, stage)[0]
        got[stage] = make_example(items, ts, None, int(end[0]), int(first[0]), 10, 0, True)
    np.testing.assert_array_equal(got["train"]["targets"], [2, 3])  # only events before valid_ts
    np.testing.assert_array_equal(got["val"]["items"], [1, 2, 3, 4])
    np.testing.assert_array_equal(got["val"]["targets"], [0, 0, 4, 5])  # events in [valid_ts, test_ts)
    np.testing.assert_array_equal(got["test"]["targets"], [0, 0, 0, 0, 6])  # events at/after test_ts


def test_a_mid_epoch_checkpoint_resumes_at_the_next_batch(tiny_data):
    """The training loader's state (what Lightning stores in a checkpoint) continues the epoch where it
    stopped, in the same order; a state from an epoch's end starts the next epoch from its beginning."""
    dm = SeqRecDataModule(str(tiny_data), max_len=8, batch_size=4)
    full = dm.loader("train", 1, 2)
    full.sampler.set_epoch(2)
    reference = [b["user_idx"].tolist() for b in full]
    first = dm.loader("train", 1, 2)
    first.sampler.set_epoch(2)
    it = iter(first)
    done = [next(it)["user_idx"].tolist() for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 2, "consumed": 3}
    resumed = dm.loader("train", 1, 2)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # Lightning sets the restored epoch again before iterating
    rest = [b["user_idx"].tolist() for b in resumed]
    assert done + rest == reference
    assert len(resumed) == len(full)  # Lightning counts the epoch's batches from the restored progress
    after = [b["user_idx"].tolist() for b in resumed]  # the next pass is a whole epoch again
    assert after == reference
    ended = dm.loader("train", 1, 2)
    ended.load_state_dict({"epoch": 2, "consumed": len(reference)})
    ended.sampler.set_epoch(3)
    assert len([b for b in ended]) == len(reference)


def test_the_trainer_reads_the_contract_without_polars():
    """The data contract (pipeline/contract.py) is standard library only: importing the trainer must
    not pull in the preprocessing stack."""
    import subprocess
    import sys

    code = "import sys, sinkrec.cli, sinkrec.data; print('polars' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
