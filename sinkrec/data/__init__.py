"""Processed shards -> per-rank, left-padded batches, streamed (docs/CONTRACTS.md §1-§2)."""

from sinkrec.data.datamodule import SeqRecDataModule
from sinkrec.data.shards import ShardError, ShardIndex, load_manifest, verify_shards

__all__ = ["SeqRecDataModule", "ShardError", "ShardIndex", "load_manifest", "verify_shards"]
