"""LightningDataModule over a processed directory (CONTRACTS §1): each rank streams its own share.

The split of an epoch over ranks and DataLoader workers, the shuffle and the length bucketing are
in sinkrec.data.stream (module docstring); the shard format and its checks in sinkrec.data.shards.
Nothing here holds the dataset: set-up reads the manifest and the Parquet footers, and batches are
built from one row group at a time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from sinkrec.data.collate import Stage
from sinkrec.data.shards import VERIFY_MODES, ShardIndex, Verify, load_manifest
from sinkrec.data.stream import EpochSampler, StageStream, StreamLoader, identity

log = logging.getLogger(__name__)


def world_info(trainer: pl.Trainer | None) -> tuple[int, int]:
    """(rank, world_size) of this process: from the trainer, else torch.distributed, else (0, 1)."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SeqRecDataModule(pl.LightningDataModule):
    """Batches of left-padded user histories from `data/processed/<name>/` (CONTRACTS §1-§2).

    Args:
        root: processed dataset directory (holds manifest.json).
        max_len: most recent events a model reads per example; null = the whole history (recurrent
            archs; pair it with `model.window` to bound memory).
        batch_size: users per training batch and rank.
        eval_batch_size: users per validation/test/predict batch and rank.
        num_workers: DataLoader worker processes per rank.
        bucket_batches: length bucketing spans this many batches (1 = no bucketing across batches).
        shuffle_buffer: users in a rank's training shuffle pool (bounds its memory; sinkrec.data.stream).
        seed: seeds the per-epoch shuffle (with the epoch number).
        pack: training batches hold their users back to back with `cu_seqlens` instead of left
            padding (SinkRec and GDN only): the same users per batch, no compute on padding.
            Validation and test are packed too; predict stays left-padded (top-k reads [B, T] rows).
        max_tokens: a token budget per training batch instead of a user count: each batch takes as
            many users (up to `batch_size`) as fit, counting real events when packed and users x the
            longest history when padded, so one 10k-event user costs what a hundred 100-event users
            do. Costs: set-up reads every user's event count on every rank (the shards' `n_events`
            column, 4 bytes per user; a dataset written before that column: its item lists, every
            event; time_cutoff splits: the timestamp lists) and plans `trainer.max_epochs` epochs
            (sinkrec.data.stream.StageStream).
        verify: sha256 of the shards against the manifest: "full" (every shard at set-up, on every
            rank: reads the whole dataset once), "own" (each shard this process reads, before its
            first use: a rank hashes only its share), "off" (no hashing; unreadable or truncated files
            and counts that disagree with the manifest are still refused, naming the file).
        shuffle_ties: training reads each user's events in a fresh random order inside every run of
            equal timestamps, each epoch (collate.shuffle_ties); validation and test read the stored
            order. For logs whose timestamps are coarse (ML-1M: seconds, half the neighbours tie).
    """

    def __init__(
        self,
        root: str = "data/processed/ml-1m",
        max_len: int | None = 200,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        bucket_batches: int = 32,
        shuffle_buffer: int = 8192,
        seed: int = 1234,
        verify: Verify = "own",
        pack: bool = False,
        max_tokens: int | None = None,
        shuffle_ties: bool = False,
    ) -> None:
        super().__init__()
        if (max_len is not None and max_len < 1) or batch_size < 1 or eval_batch_size < 1 or shuffle_buffer < 1 or num_workers < 0:
            raise ValueError(f"data.max_len/batch_size/eval_batch_size/shuffle_buffer must be >= 1 and "
                             f"data.num_workers >= 0, got {max_len}/{batch_size}/{eval_batch_size}/"
                             f"{shuffle_buffer} and {num_workers}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"data.max_tokens={max_tokens} must be >= 1 (tokens per training batch) or null")
        if verify not in VERIFY_MODES:
            raise ValueError(f"data.verify={verify!r} must be one of {VERIFY_MODES}")
        self.root, self.max_len, self.batch_size = Path(root), max_len, batch_size
        self.eval_batch_size, self.num_workers, self.bucket_batches = eval_batch_size, num_workers, bucket_batches
        self.shuffle_buffer, self.seed, self.verify, self.pack = shuffle_buffer, seed, verify, pack
        self.max_tokens, self.shuffle_ties = max_tokens, shuffle_ties
        self.manifest = load_manifest(self.root)  # fails early, naming the file, if root is wrong
        self.index: ShardIndex | None = None
        self._train_loader: StreamLoader | None = None
        self._resume: dict[str, int] | None = None  # the training position restored from a checkpoint

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

    def prepare_data(self) -> None:
        """Bring `root` up to date if a shipped pipeline config writes it (conf/pipeline/<name>.yaml;
        fetching the raw data first); any other root is left as it is (pipeline/prepare.py). Lightning
        runs this on local rank 0 of every node while the other ranks wait; concurrent runs on a
        shared file system wait for one another on the output's lock."""
        from pipeline.prepare import prepare

        prepare(self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.index is not None:
            return
        self.index = ShardIndex.build(self.root, self.manifest, self.verify)
        log.info("data: %s, %d users in %d row groups, %d items (verify=%s)", self.root, self.index.num_users,
                 len(self.index.groups), self.num_items, self.verify)

    def stream(self, stage: Stage, rank: int, world: int) -> StageStream:
        if self.index is None:
            self.setup()
        train = stage == "train"
        return StageStream(self.index, stage, rank, world, self.num_workers,
                           self.batch_size if train else self.eval_batch_size, self.bucket_batches,
                           self.shuffle_buffer, self.max_len, self.seed, self.kind_column, self.pack,
                           self.max_tokens, self.plan_epochs() if train and self.max_tokens else 1,
                           self.shuffle_ties)

    def plan_epochs(self) -> int:
        """Epochs a token-budget plan covers: the trainer's max_epochs (1 without a trainer)."""
        trainer = self.trainer
        if trainer is None:
            return 1
        if trainer.max_epochs is None or trainer.max_epochs < 1:
            raise ValueError(f"data.max_tokens needs a finite trainer.max_epochs (got {trainer.max_epochs}): "
                             "the per-rank batch counts are planned for that many epochs")
        return int(trainer.max_epochs)

    def loader(self, stage: Stage, rank: int | None = None, world: int | None = None) -> DataLoader:
        """The DataLoader of `stage` for (rank, world) (defaults: this process in the trainer's world)."""
        if rank is None or world is None:
            rank, world = world_info(self.trainer)
        ds = self.stream(stage, rank, world)
        workers = {"num_workers": self.num_workers, "persistent_workers": False,
                   "multiprocessing_context": "fork" if self.num_workers and os.name == "posix" else None}
        if stage == "train":  # stateful: a mid-epoch checkpoint resumes at the next batch
            loader = StreamLoader(ds, **workers)
            if self._resume is not None:
                loader.load_state_dict(self._resume)
            self._train_loader = loader
            return loader
        return DataLoader(ds, sampler=EpochSampler(len(ds)), batch_size=None, collate_fn=identity, **workers)

    # Lightning stores this in every checkpoint and hands it back on `--ckpt_path`. (The loader is also
    # stateful itself, but Lightning builds the training loader before restoring loop state when the
    # LR schedule asks for `estimated_stepping_batches`, and then never hands the loader its state.)
    def state_dict(self) -> dict[str, dict[str, int]]:
        return {"train_position": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict[str, dict[str, int]]) -> None:
        self._resume = state.get("train_position")
        if self._resume is not None and self._train_loader is not None:
            self._train_loader.load_state_dict(self._resume)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("predict")
