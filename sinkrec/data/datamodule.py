"""LightningDataModule over a processed directory (CONTRACTS §1): rank/worker split, buckets, batches.

How an epoch is cut (deterministic in (seed, epoch), identical on every rank):
1. Users eligible for the stage (collate.eligible) are ordered shard-major. For training, the shard
   order and the users inside each shard are permuted with rng(seed, epoch); evaluation keeps file order.
2. The list is cut into `world` contiguous blocks whose sizes differ by at most one (np.array_split),
   so a rank touches few shards and, with few shards and many ranks, shards split at user granularity.
3. Ranks whose block is one short repeat one of their users, flagged `valid=False`: every rank then
   runs the same number of batches (DDP needs it), and a flagged row has its targets zeroed, so it
   adds nothing to the loss or to metric counts. Every eligible user counts exactly once per epoch.
4. Within a rank, users are bucketed by length (groups of `bucket_batches * batch_size` sorted by
   length, then cut into batches) to limit padding; training shuffles the batch order.
5. DataLoader workers take whole batches round-robin (torch's batch_sampler semantics), so each
   batch is built by exactly one worker and the order does not depend on `num_workers`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sinkrec.data.collate import Stage, collate_left_pad, eligible, make_example, stage_bounds
from sinkrec.data.shards import UserTable, load_manifest, read_shards, verify_shards

log = logging.getLogger(__name__)


def world_info(trainer: pl.Trainer | None) -> tuple[int, int]:
    """(rank, world_size) of this process: from the trainer, else torch.distributed, else (0, 1)."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank_block(order: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's rows and their `valid` flags, padded to ceil(len/world) by repeating (flag False)."""
    if len(order) < world:
        raise ValueError(f"{len(order)} eligible users cannot be split over {world} ranks")
    block = np.array_split(order, world)[rank]
    size = -(-len(order) // world)
    pad = size - len(block)
    rows = np.concatenate([block, block[:pad]])
    valid = np.concatenate([np.ones(len(block), bool), np.zeros(pad, bool)])
    return rows, valid


class RankUserSampler(Sampler[int]):
    """Yields this rank's user rows for one epoch; padding repeats are encoded as -(row + 1)."""

    def __init__(self, rows: np.ndarray, shards: np.ndarray, rank: int, world: int, seed: int,
                 shuffle: bool) -> None:
        self.rows, self.shards = rows, shards  # eligible rows (shard-major) and their shard ids
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self) -> np.ndarray:
        """All eligible rows of the world in this epoch's order (shard-major)."""
        if not self.shuffle:
            return self.rows
        rng = np.random.default_rng([self.seed, self.epoch])
        parts = [self.rows[self.shards == s] for s in np.unique(self.shards)]
        return np.concatenate([rng.permutation(parts[i]) for i in rng.permutation(len(parts))])

    def __iter__(self) -> Iterator[int]:
        rows, valid = rank_block(self.epoch_order(), self.rank, self.world)
        return iter(np.where(valid, rows, -(rows + 1)).tolist())

    def __len__(self) -> int:
        return (len(self.rows) + self.world - 1) // self.world


class BucketBatchSampler(Sampler[list[int]]):
    """Groups the sampler's users into length buckets; same batch count on every rank."""

    def __init__(self, sampler: RankUserSampler, lengths: np.ndarray, batch_size: int,
                 bucket_batches: int, shuffle: bool) -> None:
        self.sampler = sampler  # Lightning calls sampler.set_epoch through `batch_sampler.sampler`
        self.lengths, self.batch_size = lengths, batch_size
        self.group = max(1, bucket_batches) * batch_size
        self.shuffle = shuffle

    def _batches(self) -> list[list[int]]:
        codes = np.fromiter(iter(self.sampler), dtype=np.int64)
        rows = np.where(codes >= 0, codes, -codes - 1)
        batches = []
        for lo in range(0, len(codes), self.group):
            g = codes[lo : lo + self.group]
            g = g[np.argsort(-self.lengths[rows[lo : lo + self.group]], kind="stable")]
            batches += [g[i : i + self.batch_size].tolist() for i in range(0, len(g), self.batch_size)]
        if self.shuffle:
            perm = np.random.default_rng([self.sampler.seed, self.sampler.epoch, 1]).permutation(len(batches))
            batches = [batches[i] for i in perm]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        # a generator: the epoch's batches are drawn at the first next(), after Lightning's set_epoch
        # (on resume Lightning creates the iterator before it sets the restored epoch)
        yield from self._batches()

    def __len__(self) -> int:
        n = len(self.sampler)
        full, rest = divmod(n, self.group)
        return full * (-(-self.group // self.batch_size)) + (-(-rest // self.batch_size))


class StageDataset(Dataset):
    """Map-style view of one stage: index = row (or -(row+1) for a rank-balancing repeat)."""

    def __init__(self, table: UserTable, end: np.ndarray, first: np.ndarray, max_len: int,
                 kind_column: str | None) -> None:
        self.table, self.end, self.first, self.max_len = table, end, first, max_len
        self.kind_column = kind_column

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, code: int) -> dict[str, Any]:
        valid = code >= 0
        r = code if valid else -code - 1
        items, ts, side = self.table.row(r)
        kind = side.get(self.kind_column) if self.kind_column else None
        return make_example(items, ts, kind, int(self.end[r]), int(self.first[r]), self.max_len,
                            int(self.table.user_idx[r]), valid)


class SeqRecDataModule(pl.LightningDataModule):
    """Batches of left-padded user histories from `data/processed/<name>/` (CONTRACTS §1-§2).

    Args:
        root: processed dataset directory (holds manifest.json).
        max_len: most recent events a model reads per example.
        batch_size: users per training batch and rank.
        eval_batch_size: users per validation/test/predict batch and rank.
        num_workers: DataLoader worker processes per rank.
        bucket_batches: length bucketing spans this many batches (1 = no bucketing across batches).
        seed: seeds the per-epoch shuffle (with the epoch number).
        verify: check the shards' sha256 against the manifest before training.
    """

    def __init__(
        self,
        root: str = "data/processed/ml-1m",
        max_len: int = 200,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        bucket_batches: int = 32,
        seed: int = 1234,
        verify: bool = True,
    ) -> None:
        super().__init__()
        if max_len < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"data.max_len/batch_size/eval_batch_size must be >= 1, got "
                             f"{max_len}/{batch_size}/{eval_batch_size}")
        self.root, self.max_len, self.batch_size = Path(root), max_len, batch_size
        self.eval_batch_size, self.num_workers, self.bucket_batches = eval_batch_size, num_workers, bucket_batches
        self.seed, self.verify = seed, verify
        self.manifest = load_manifest(self.root)  # fails early, naming the file, if root is wrong
        self.table: UserTable | None = None

    # Values the data decides; the CLI links num_items into the model config.
    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def kind_column(self) -> str | None:
        return "kind" if "kind" in self.manifest.get("side_columns", []) else None

    def setup(self, stage: str | None = None) -> None:
        if self.table is not None:
            return
        if self.verify:
            verify_shards(self.root, self.manifest)
        self.table = read_shards(self.root, self.manifest)
        log.info("data: %s, %d users, %d events, %d items", self.root, len(self.table),
                 len(self.table.items), self.num_items)

    def _ts_counts(self) -> dict[str, np.ndarray] | None:
        split = self.manifest["split"]
        if split["protocol"] != "time_cutoff":
            return None
        t = self.table
        user_of_event = np.repeat(np.arange(len(t)), t.lengths)
        return {k: np.bincount(user_of_event[t.ts < int(split[k])], minlength=len(t)).astype(np.int64)
                for k in ("valid_ts", "test_ts")}

    def stage_dataset(self, stage: Stage) -> tuple[StageDataset, np.ndarray, np.ndarray]:
        """(dataset, eligible rows in shard-major order, input length per row)."""
        if self.table is None:
            self.setup()
        t = self.table
        end, first = stage_bounds(t.lengths, self._ts_counts(), stage, self.manifest["split"])
        rows = np.flatnonzero(eligible(end, first, stage))
        inputs = np.minimum(np.maximum(end - 1, 0), self.max_len) if stage != "predict" else \
            np.minimum(t.lengths, self.max_len)
        return StageDataset(t, end, first, self.max_len, self.kind_column), rows, inputs

    def loader(self, stage: Stage, rank: int | None = None, world: int | None = None) -> DataLoader:
        """The DataLoader of `stage` for (rank, world) (defaults: this process in the trainer's world)."""
        if rank is None or world is None:
            rank, world = world_info(self.trainer)
        ds, rows, lengths = self.stage_dataset(stage)
        train = stage == "train"
        sampler = RankUserSampler(rows, self.table.shard[rows], rank, world, self.seed, shuffle=train)
        batch_sampler = BucketBatchSampler(sampler, lengths, self.batch_size if train else self.eval_batch_size,
                                           self.bucket_batches, shuffle=train)
        return DataLoader(ds, batch_sampler=batch_sampler, collate_fn=collate_left_pad,
                          num_workers=self.num_workers, persistent_workers=False,
                          multiprocessing_context="fork" if self.num_workers and os.name == "posix" else None)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("predict")
