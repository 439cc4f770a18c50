"""Per-rank streaming batches: each rank (and each DataLoader worker) reads only its own share.

How an epoch is cut (deterministic in (seed, epoch, world, workers); every rank computes the same
plan from the Parquet footers alone, sinkrec.data.shards.ShardIndex):
1. The dataset is a list of units (slices of row groups; several per rank and worker, so that few
   or unequal shards still split evenly). Training permutes the units with rng(seed, epoch);
   evaluation keeps file order.
2. Concatenated in that order, the units' users form one virtual list, cut into `world * workers`
   contiguous slots whose sizes differ by at most one user (rank r's workers own slots
   r * workers .. r * workers + workers - 1). A slot reads only the units its range overlaps, one row
   group at a time. Every user belongs to exactly one slot per epoch.
3. Within a slot, users stream through a bounded shuffle pool (`shuffle_buffer` users, training
   only), are grouped `bucket_batches * batch_size` at a time, sorted by length inside the group and
   cut into batches (less padding), and the group's batch order is shuffled (training). With
   `data.pack` a batch (training, validation, test) holds the same users back to back
   (collate_packed): no padding.
   With `data.max_tokens` a training batch takes as many users as fit in that many tokens
   (cut_sizes) instead of `batch_size`; the batch count per slot is then planned at set-up from the
   users' lengths (StageStream).
4. Every slot yields the same number of batches, ceil(ceil(users / slots) / batch_size) (with a token
   budget: the most any slot cuts in the planned epochs): a slot whose
   users run out early (a short slot, users without a target in this stage) yields empty batches
   (one pad row flagged `real_row=False`: no loss, no metric counts). DDP sees equal step counts.
5. The DataLoader is map-style over (epoch, batch number) with a sampler that Lightning's
   `set_epoch` reaches; worker w receives batch numbers i = w, w + W, ... in order (torch's
   round-robin), and builds them from its own slot's stream. The order does not depend on timing.
Memory per rank: O(shuffle_buffer + one row group + one batch), independent of the dataset's size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from sinkrec.data.collate import (
    Stage,
    collate_left_pad,
    collate_packed,
    eligible,
    make_example,
    shuffle_ties,
    stage_bounds,
)
from sinkrec.data.shards import ShardIndex, Unit, UserRows

UNITS_PER_SLOT = 8  # units per (rank, worker) slot: the granularity of the split


def slot_ranges(sizes: list[int], slots: int) -> list[tuple[int, int]]:
    """[lo, hi) of each slot in the virtual user list of total sum(sizes): np.array_split sizes."""
    total = sum(sizes)
    if total < slots:
        raise ValueError(f"{total} users cannot be split over {slots} rank x worker slots")
    base, extra = divmod(total, slots)
    bounds = np.cumsum([0] + [base + (s < extra) for s in range(slots)])
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def slot_units(units: list[Unit], lo: int, hi: int) -> list[Unit]:
    """The parts of `units` (in order) that fall in [lo, hi) of their concatenation."""
    out, start = [], 0
    for u in units:
        end = start + u.rows
        a, b = max(lo, start), min(hi, end)
        if a < b:
            out.append(Unit(u.shard, u.row_group, u.lo + a - start, u.lo + b - start))
        start = end
        if start >= hi:
            break
    return out


def stage_rows(rows: UserRows, stage: Stage, split: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user of `rows`: (end, first, eligible) of `stage` (collate.stage_bounds)."""
    ts_counts = None
    if split["protocol"] == "time_cutoff":
        user_of_event = np.repeat(np.arange(len(rows)), rows.lengths)
        ts_counts = {k: np.bincount(user_of_event[rows.ts < int(split[k])], minlength=len(rows)).astype(np.int64)
                     for k in ("valid_ts", "test_ts")}
    end, first = stage_bounds(rows.lengths, ts_counts, stage, split)
    return end, first, eligible(end, first, stage)


def stage_examples(rows: UserRows, stage: Stage, split: dict[str, Any], max_len: int | None,
                   kind_column: str | None, tie_rng: np.random.Generator | None = None) -> Iterator[dict[str, Any]]:
    """The examples (collate.make_example) of the users of `rows` that have a target in `stage`;
    with `tie_rng`, each user's events before `end` in a random order inside equal timestamps."""
    end, first, ok = stage_rows(rows, stage, split)
    for r in np.flatnonzero(ok):
        items, ts, side = rows.row(r)
        kind = side.get(kind_column) if kind_column else None
        if tie_rng is not None:
            items, kind = shuffle_ties(items, ts, kind, int(end[r]), tie_rng)
        yield make_example(items, ts, kind, int(end[r]), int(first[r]), max_len, int(rows.user_idx[r]), True)


def example_lengths(rows: UserRows, stage: Stage, split: dict[str, Any], max_len: int | None) -> np.ndarray:
    """Per user of `rows`: the input length of its `stage` example (make_example), -1 if it has none."""
    end, _, ok = stage_rows(rows, stage, split)
    n = end - 1 if max_len is None else np.minimum(end - 1, max_len)
    return np.where(ok, n, -1).astype(np.int32)


def cut_sizes(lengths: list[int], batch_size: int, max_tokens: int | None, packed: bool) -> list[int]:
    """How many users each batch of a group takes, the group sorted longest first: `batch_size` each;
    with a token budget, as many (up to `batch_size`) as fit in `max_tokens` tokens: the sum of their
    lengths when packed, users x the longest when left-padded. A user longer than the budget alone
    fills a batch (pair long histories with `model.window` to bound its memory)."""
    if max_tokens is None:
        return [min(batch_size, len(lengths) - i) for i in range(0, len(lengths), batch_size)]
    sizes, n, total, longest = [], 0, 0, 0
    for length in lengths:
        length = max(1, length)  # a row costs at least one position
        new_total, new_longest = total + length, max(longest, length)
        cost = new_total if packed else (n + 1) * new_longest
        if n and (n == batch_size or cost > max_tokens):
            sizes.append(n)
            n, new_total, new_longest = 0, length, length
        n, total, longest = n + 1, new_total, new_longest
    return sizes + [n] if n else sizes


def empty_batch(pack: bool = False) -> dict[str, torch.Tensor]:
    """One pad row with real_row=False: a step that trains and counts nothing (rank balancing)."""
    return (collate_packed if pack else collate_left_pad)([{"items": np.zeros(1, np.int64), "ts": np.zeros(1, np.int64),
                              "targets": np.zeros(1, np.int64), "kind": None, "input_kind": None,
                              "user_idx": -1, "real_row": False}])


class EpochSampler(Sampler):
    """Yields (epoch, batch number) for this rank; Lightning calls set_epoch before each epoch.
    `resume(epoch, start)` makes the next pass over `epoch` begin at batch `start`."""

    def __init__(self, num_batches: int) -> None:
        self.num_batches, self.epoch = num_batches, 0
        self._resume: tuple[int, int] | None = None  # (epoch, first batch) for one pass

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, start: int) -> None:
        self.epoch = epoch
        self._resume = (epoch, start) if 0 < start < self.num_batches else None

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # a generator: the epoch is read at the first next(), after Lightning's set_epoch
        # (on resume Lightning creates the iterator before it sets the restored epoch)
        epoch, start = self.epoch, 0
        if self._resume is not None and self._resume[0] == epoch:
            start = self._resume[1]
        self._resume = None
        yield from ((epoch, i) for i in range(start, self.num_batches))

    def __len__(self) -> int:
        return self.num_batches


class StreamLoader(DataLoader):
    """The training DataLoader, stateful for Lightning: a checkpoint records the epoch and the batches
    consumed in it, so `--ckpt_path` from a mid-epoch checkpoint (preemption) continues at the next
    batch of the same epoch, in the same order; from an end-of-epoch checkpoint, the next epoch."""

    def __init__(self, dataset: StageStream, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=EpochSampler(len(dataset)), batch_size=None, collate_fn=identity,
                         **kwargs)
        self._consumed = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        resume = self.sampler._resume
        self._consumed = resume[1] if resume is not None and resume[0] == self.sampler.epoch else 0
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(int(state["epoch"]), int(state["consumed"]))


class StageStream(Dataset):
    """Batches of one stage for one rank, built from that rank's slots (module docstring).

    With `max_tokens` (training only) a batch holds as many users as fit in that many tokens
    (cut_sizes), so a slot's batch count depends on its users' lengths. Set-up then reads every
    user's length once (`ShardIndex.read_lengths`: each shard's `n_events` column, 4 bytes per user,
    or its item lists where a dataset predates that column; O(users) memory)
    and replays the epoch plan of its slots on lengths alone (the shuffle's random draws do not
    depend on the content, so the replay cuts exactly the batches the real stream cuts) for epochs
    0 .. plan_epochs - 1; every slot then yields the largest count over all ranks (`_plan`), short
    slots padded with empty batches as without a budget."""

    def __init__(self, index: ShardIndex, stage: Stage, rank: int, world: int, workers: int, batch_size: int,
                 bucket_batches: int, shuffle_buffer: int, max_len: int | None, seed: int,
                 kind_column: str | None, pack: bool = False, max_tokens: int | None = None,
                 plan_epochs: int = 1, shuffle_ties: bool = False) -> None:
        self.index, self.stage, self.rank, self.world = index, stage, rank, world
        self.shuffle_ties = shuffle_ties and stage == "train"  # data.shuffle_ties
        self.packed = pack and stage != "predict"  # data.pack (predict keeps [B, T] rows for top-k)
        self.collate = collate_packed if self.packed else collate_left_pad
        self.workers = max(1, workers)  # slots per rank (0 workers = the main process = one slot)
        self.batch_size, self.max_len, self.seed = batch_size, max_len, seed
        self.max_tokens = max_tokens if stage == "train" else None  # data.max_tokens
        self.group = max(1, bucket_batches) * batch_size
        self.shuffle = stage == "train"
        self.shuffle_buffer = shuffle_buffer
        self.kind_column = kind_column
        self.slots = world * self.workers
        self.units = index.units(UNITS_PER_SLOT * self.slots)
        self.ranges = slot_ranges([u.rows for u in self.units], self.slots)
        self._streams: dict[int, tuple[int, Iterator, int]] = {}  # slot -> (epoch, batches, next number)
        self.plan_epochs = plan_epochs
        if self.max_tokens is None:
            self.per_slot = -(-(self.ranges[0][1] - self.ranges[0][0]) // batch_size)  # the largest slot is first
            return
        split = index.manifest["split"]
        with_ts = split["protocol"] == "time_cutoff"
        self._lengths = {(s, g): example_lengths(index.read_lengths(s, g, with_ts), stage, split, max_len)
                         for s, g, _ in index.groups}
        self.per_slot = max(1, self._plan())

    def _plan(self) -> int:
        """The most batches any slot cuts in epochs 0 .. plan_epochs - 1 under the token budget.

        In a distributed run whose process group is this stream's (rank, world), each rank replays
        only its own slots and the ranks exchange their maxima (one all_gather_object): the replay
        costs ~5 us per user and epoch in Python, so every rank replaying every slot would cost
        O(all users x epochs) per rank. Without such a group (one process, or a test that builds
        every rank's stream in one process) every slot is replayed here: the same number."""
        import torch.distributed as dist

        grouped = (self.world > 1 and dist.is_available() and dist.is_initialized()
                   and dist.get_world_size() == self.world and dist.get_rank() == self.rank)
        slots = range(self.rank * self.workers, (self.rank + 1) * self.workers) if grouped else range(self.slots)
        most = max(sum(1 for _ in self._batches(e, slot, dry=True)) for e in range(self.plan_epochs) for slot in slots)
        if grouped:
            every: list[Any] = [None] * self.world
            dist.all_gather_object(every, most)
            most = max(every)
        return most

    def __len__(self) -> int:
        return self.per_slot * self.workers

    def epoch_units(self, epoch: int) -> list[Unit]:
        if not self.shuffle:
            return self.units
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        return [self.units[i] for i in perm]

    def slot_plan(self, epoch: int, slot: int) -> list[Unit]:
        return slot_units(self.epoch_units(epoch), *self.ranges[slot])

    def _examples(self, epoch: int, slot: int, rng: np.random.Generator, dry: bool) -> Iterator[Any]:
        """The slot's examples in stream order; `dry`: only their lengths, in the same order."""
        split = self.index.manifest["split"]
        pool: list[Any] = []
        # its own generator: the dry replay (lengths only) draws nothing for ties and must stay in step
        tie_rng = np.random.default_rng([self.seed, epoch, slot, 2]) if self.shuffle_ties and not dry else None
        for unit in self.slot_plan(epoch, slot):
            if dry:
                lengths = self._lengths[unit.shard, unit.row_group][unit.lo : unit.hi]
                source: Iterator[Any] = (int(n) for n in lengths if n >= 0)
            else:
                source = stage_examples(self.index.read(unit), self.stage, split, self.max_len, self.kind_column,
                                        tie_rng)
            for ex in source:
                if not self.shuffle:
                    yield ex
                    continue
                pool.append(ex)
                if len(pool) >= self.shuffle_buffer:  # emit a random member, keep the pool bounded
                    j = int(rng.integers(len(pool)))
                    pool[j], pool[-1] = pool[-1], pool[j]
                    yield pool.pop()
        for j in rng.permutation(len(pool)) if pool else ():
            yield pool[j]

    def _batches(self, epoch: int, slot: int, dry: bool = False) -> Iterator[Any]:
        """The slot's batches of `epoch`, padded to per_slot; `dry`: the users' lengths of each batch
        (not padded), from the same random draws."""
        rng = np.random.default_rng([self.seed, epoch, slot, 1])
        size = (lambda n: n) if dry else (lambda e: len(e["items"]))
        group: list[Any] = []

        def cut(g: list[Any]) -> Iterator[Any]:
            g = sorted(g, key=lambda e: -size(e))  # stable: equal lengths keep stream order
            bs, i = [], 0
            for n in cut_sizes([size(e) for e in g], self.batch_size, self.max_tokens, self.packed):
                bs.append(g[i : i + n])
                i += n
            order = rng.permutation(len(bs)) if self.shuffle else range(len(bs))
            for i in order:
                yield bs[i] if dry else self.collate(bs[i])

        n = 0
        for ex in self._examples(epoch, slot, rng, dry):
            group.append(ex)
            if len(group) == self.group:
                for b in cut(group):
                    n += 1
                    yield b
                group = []
        for b in cut(group) if group else ():
            n += 1
            yield b
        if dry:
            return
        if n > self.per_slot:
            raise RuntimeError(
                f"epoch {epoch}: slot {slot} cut {n} batches under data.max_tokens={self.max_tokens}, but the "
                f"loader was planned for {self.per_slot} (epochs 0..{self.plan_epochs - 1}); raise "
                "trainer.max_epochs to cover every epoch that runs")
        while n < self.per_slot:
            n += 1
            yield empty_batch(self.packed)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Batch number i of this rank in `epoch`: batch i // W of slot rank * W + i % W (W workers),
        which is what torch's round-robin hands worker i % W; read in one process, the same order."""
        epoch, i = key
        info = get_worker_info()
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"StageStream planned for {self.workers} workers, runs in {info.num_workers}")
        slot, number = self.rank * self.workers + i % self.workers, i // self.workers
        state = self._streams.get(slot)
        if state is None or state[0] != epoch or state[2] != number:
            batches = self._batches(epoch, slot)
            for _ in range(number):  # only on a jump (a reader that skips ahead)
                next(batches)
            state = (epoch, batches, number)
        batch = next(state[1])
        self._streams[slot] = (epoch, state[1], number + 1)
        return batch


def identity(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch
