"""Training batches bounded by a token budget (`data.max_tokens`; sinkrec.data.stream.cut_sizes)."""
from __future__ import annotations

import pytest
import torch

from sinkrec.data import SeqRecDataModule
from sinkrec.data.stream import cut_sizes
from tests.train.conftest import fit_tiny_cli, make_processed


def test_cut_sizes_fills_each_batch_up_to_the_budget():
    longest_first = [5, 4, 3, 3, 1]
    # packed: the sum of lengths; 5 | 4 + 3 | 3 + 1 (5 + 4 and 4 + 3 + 3 are over 8)
    assert cut_sizes(longest_first, 100, 8, packed=True) == [1, 2, 2]
    # padded: users x the longest; 5 | 2 x 4 | 2 x 3 (2 x 5 and 3 x 4 are over 8)
    assert cut_sizes(longest_first, 100, 8, packed=False) == [1, 2, 2]
    assert cut_sizes(longest_first, 100, 15, packed=True) == [4, 1]  # 5 + 4 + 3 + 3 = 15
    assert cut_sizes(longest_first, 2, 100, packed=True) == [2, 2, 1]  # batch_size still caps users
    assert cut_sizes([20, 2], 100, 8, packed=True) == [1, 1]  # over the budget alone: a batch of its own
    assert cut_sizes(longest_first, 2, None, packed=True) == [2, 2, 1]  # no budget: batch_size users


@pytest.fixture(scope="module")
def heavy_tailed(tmp_path_factory):
    """Lengths 4..120: a few long users among many short ones."""
    return make_processed(tmp_path_factory.mktemp("budget") / "d", n_users=90, max_len=120, n_shards=3, seed=3)


def _cost(batch, packed: bool) -> int:
    if packed:
        return int(batch["cu_seqlens"][-1])
    return batch["items"].shape[0] * batch["items"].shape[1]


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("world", [1, 3])
def test_budget_batches_keep_the_stream_guarantees(heavy_tailed, pack, world):
    budget = 150
    dm = SeqRecDataModule(str(heavy_tailed), max_len=None, batch_size=64, bucket_batches=4, shuffle_buffer=16,
                          pack=pack, max_tokens=budget)
    dm.plan_epochs = lambda: 3  # what trainer.max_epochs sets
    everyone = None
    for epoch in range(3):
        seen, counts = [], []
        for rank in range(world):
            loader = dm.loader("train", rank, world)
            loader.sampler.set_epoch(epoch)
            n = 0
            for batch in loader:
                n += 1
                users = batch["user_idx"][batch["real_row"]].tolist()
                seen += users
                if len(users) > 1:
                    assert _cost(batch, pack) <= budget, "a batch of several users stays within the budget"
            counts.append(n)
            slot, ds = rank, loader.dataset  # no workers: one slot per rank
            real = sum(1 for b in ds._batches(epoch, slot) if b["real_row"].any())
            assert real == sum(1 for _ in ds._batches(epoch, slot, dry=True)), "the plan replays the real cut"
        assert len(set(counts)) == 1, f"unequal batch counts per rank: {counts}"
        assert len(seen) == len(set(seen)), "a user twice in one epoch"
        everyone = everyone or sorted(seen)
        assert sorted(seen) == everyone, "every eligible user once per epoch"
    assert counts[0] > -(-len(everyone) // (64 * world)), "the budget, not batch_size, sets the batch count"


def test_budget_needs_a_finite_max_epochs(heavy_tailed):
    dm = SeqRecDataModule(str(heavy_tailed), max_len=None, max_tokens=100)

    class Trainer:
        max_epochs, global_rank, world_size = -1, 0, 1

    dm.trainer = Trainer()
    with pytest.raises(ValueError, match="data.max_tokens needs a finite trainer.max_epochs"):
        dm.loader("train")
    with pytest.raises(ValueError, match="data.max_tokens=0 must be >= 1"):
        SeqRecDataModule(str(heavy_tailed), max_tokens=0)


def test_fit_with_a_token_budget_from_the_command_line(heavy_tailed, tmp_path):
    ckpt = fit_tiny_cli(heavy_tailed, tmp_path, "--model.config.arch", "gdn", "--data.max_len", "null",
                        "--data.pack", "true", "--data.max_tokens", "200", "--trainer.max_epochs", "2")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()
                                      if v.is_floating_point())


_PLAN_WORKER = r'''
import sys, torch.distributed as dist
from sinkrec.data import SeqRecDataModule
from sinkrec.data.stream import StageStream
dist.init_process_group("gloo")
rank = dist.get_rank()
replayed = []
original = StageStream._batches
def counting(self, epoch, slot, dry=False):
    if dry:
        replayed.append(slot)
    return original(self, epoch, slot, dry)
StageStream._batches = counting
dm = SeqRecDataModule(sys.argv[1], max_len=None, batch_size=64, bucket_batches=4, shuffle_buffer=16,
                      pack=True, max_tokens=150, num_workers=2)
dm.plan_epochs = lambda: 3
ds = dm.stream("train", rank, 2)
print("PLAN", rank, ds.per_slot, sorted(set(replayed)))
dist.destroy_process_group()
'''


@pytest.mark.dist
def test_distributed_plan_replays_own_slots_and_agrees_with_the_full_replay(heavy_tailed, tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    dm = SeqRecDataModule(str(heavy_tailed), max_len=None, batch_size=64, bucket_batches=4, shuffle_buffer=16,
                          pack=True, max_tokens=150, num_workers=2)
    dm.plan_epochs = lambda: 3
    want = dm.stream("train", 0, 2).per_slot  # no process group: every slot replayed here
    script = tmp_path / "worker.py"
    script.write_text(_PLAN_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, str(script), str(heavy_tailed)], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(root), "RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    plans = {}
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        _, rank, per_slot, slots = next(line for line in out.splitlines() if line.startswith("PLAN")).split(" ", 3)
        plans[int(rank)] = (int(per_slot), slots)
    # 2 ranks x 2 workers = 4 slots: each rank replays its own two, and both agree on the global maximum
    assert plans == {0: (want, "[0, 1]"), 1: (want, "[2, 3]")}


def test_plan_reads_the_event_counts_and_equals_the_plan_from_item_lists(heavy_tailed, tmp_path):
    """With the N_EVENTS column, set-up plans from 4 bytes per user (no item list is read); a
    dataset without it (written before the column existed) plans from the item lists: same plan."""
    old = make_processed(tmp_path / "old", n_users=90, max_len=120, n_shards=3, seed=3, counts=False)
    plans = {}
    for name, root in (("counts", heavy_tailed), ("lists", old)):
        dm = SeqRecDataModule(str(root), max_len=None, batch_size=64, bucket_batches=4, shuffle_buffer=16,
                              pack=True, max_tokens=150)
        dm.plan_epochs = lambda: 2
        ds = dm.loader("train", 0, 2).dataset
        assert bool(ds.index.counted) == (name == "counts")
        plans[name] = (ds.per_slot, [list(ds._batches(e, s, dry=True)) for e in range(2) for s in range(ds.slots)])
    assert plans["counts"] == plans["lists"]


def test_a_count_that_disagrees_with_its_list_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.contract import N_EVENTS
    from sinkrec.data.shards import ShardError, ShardIndex, load_manifest

    root = make_processed(tmp_path / "d", n_users=12, n_shards=1)
    path = root / "shards" / "part-00000.parquet"
    table = pq.read_table(path)
    counts = table.column(N_EVENTS).to_pylist()
    counts[5] += 1
    pq.write_table(table.set_column(table.schema.get_field_index(N_EVENTS), N_EVENTS, pa.array(counts, pa.int32())),
                   path)
    index = ShardIndex.build(root, load_manifest(root), verify="off")
    with pytest.raises(ShardError, match=r"part-00000.parquet \(row group 0\): column 'n_events' says \d+ events for user_idx 5, its .item_idx. list has"):
        index.read(index.units(1)[0])
