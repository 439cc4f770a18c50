"""data.shuffle_ties: training reads equal-timestamp events in a fresh random order; nothing else moves."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise, permutations

import numpy as np

from sinkrec.data import SeqRecDataModule
from sinkrec.data.collate import shuffle_ties
from tests.train.conftest import make_processed, stored_rows


def _runs(ts: np.ndarray, end: int) -> list[tuple[int, int]]:
    """[lo, hi) of each run of equal timestamps in ts[:end]."""
    cut = [0] + [i for i in range(1, end) if ts[i] != ts[i - 1]] + [end]
    return list(pairwise(cut))


def test_only_events_of_one_timestamp_before_end_trade_places():
    ts = np.array([5, 5, 7, 9, 9, 9, 11, 11, 11])
    items = np.arange(1, 10)
    kind = items * 10
    end = 7  # the run of 11s is cut by `end`: positions 7 and 8 are validation / test, never moved
    orders = set()
    for seed in range(300):
        got, got_kind = shuffle_ties(items, ts, kind, end, np.random.default_rng(seed))
        assert (got_kind == got * 10).all()  # the side column travels with its event
        assert (got[end:] == items[end:]).all() and got[2] == 3 and got[6] == 7
        for lo, hi in _runs(ts, end):
            assert sorted(got[lo:hi]) == list(items[lo:hi])
        orders.add((tuple(got[:2]), tuple(got[3:6])))
    assert items.tolist() == list(range(1, 10)) and kind[0] == 10  # inputs are not touched
    # every order of each tie comes up: 2 x 6 combinations
    assert orders == {(a, b) for a in permutations((1, 2)) for b in permutations((4, 5, 6))}


def test_no_ties_no_change():
    ts, items = np.arange(6) * 3, np.arange(1, 7)
    got, kind = shuffle_ties(items, ts, None, 6, np.random.default_rng(0))
    assert kind is None and (got == items).all() and got is not items


def _read(dm, stage, epoch=0):
    loader = dm.loader(stage, 0, 1)
    if stage == "train":
        loader.sampler.set_epoch(epoch)
    return list(loader)


def test_training_shuffles_ties_each_epoch_validation_and_test_do_not(tmp_path):
    root = make_processed(tmp_path / "d", ts_step=2, kind=True, max_len=40)
    plain = SeqRecDataModule(str(root), max_len=64, batch_size=8)
    tied = SeqRecDataModule(str(root), max_len=64, batch_size=8, shuffle_ties=True)
    a, b = _read(plain, "train"), _read(tied, "train")
    moved = 0
    for x, y in zip(a, b, strict=True):
        assert (x["user_idx"] == y["user_idx"]).all() and (x["ts"] == y["ts"]).all()  # same users, batches, times
        moved += int((x["items"] != y["items"]).sum())
    assert moved > 0
    # deterministic in (seed, epoch), fresh each epoch
    again = _read(SeqRecDataModule(str(root), max_len=64, batch_size=8, shuffle_ties=True), "train")
    assert all((x["items"] == y["items"]).all() for x, y in zip(b, again))
    epoch1 = _read(tied, "train", epoch=1)
    plain1 = _read(plain, "train", epoch=1)
    assert any((x["items"] != y["items"]).any() for x, y in zip(epoch1, plain1))
    for stage in ("val", "test"):
        for x, y in zip(_read(plain, stage), _read(tied, stage), strict=True):
            for k in ("items", "ts", "targets", "user_idx"):
                assert (x[k] == y[k]).all(), (stage, k)


def test_each_users_events_before_end_are_a_permutation_within_each_second(tmp_path):
    """Against the stored rows: the shuffled sequence seq[:end] (inputs + last target) holds, for every
    timestamp, exactly the stored events of that timestamp, with their kind."""
    root = make_processed(tmp_path / "d", ts_step=2, kind=True, max_len=40)
    dm = SeqRecDataModule(str(root), max_len=64, batch_size=8, shuffle_ties=True)
    stored = {u: (items.astype(np.int64), ts, side["kind"].astype(np.int64))
              for u, (items, ts, side) in stored_rows(dm).items()}
    checked = 0
    for batch in _read(dm, "train"):
        for r in np.flatnonzero(batch["real_row"].numpy()):
            items, ts, kind = stored[int(batch["user_idx"][r])]
            end = len(items) - 2  # leave-one-out training stops before the validation target
            m = batch["items"][r] > 0
            seq = np.r_[batch["items"][r][m].numpy(), int(batch["targets"][r][-1])]
            assert len(seq) == end
            for lo, hi in _runs(ts, end):
                assert sorted(seq[lo:hi]) == sorted(items[lo:hi])
            k_in = batch["input_kind"][r][m].numpy()
            assert Counter(zip(seq[:-1].tolist(), k_in.tolist())) <= Counter(zip(items[:end].tolist(), kind[:end].tolist()))
            checked += 1
    assert checked == 60
