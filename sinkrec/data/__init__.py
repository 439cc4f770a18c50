"""Processed shards -> per-rank, left-padded batches (docs/CONTRACTS.md §1-§2)."""

from sinkrec.data.datamodule import SeqRecDataModule
from sinkrec.data.shards import ShardError, load_manifest, read_shards, verify_shards

__all__ = ["SeqRecDataModule", "ShardError", "load_manifest", "read_shards", "verify_shards"]
