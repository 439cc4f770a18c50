"""Shards: events partitioned by the user's shard, so that every per-user step runs one shard at a
time (peak memory ~ events / num_shards), and the final one-row-per-user files.

Staged (intermediate) events are uncompressed Arrow IPC: written and scanned without encoding cost.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl

from pipeline.contract import N_EVENTS
from pipeline.errors import PipelineError
from pipeline.schema import ITEM_IDX, SHARD, TS, USER_IDX


def shard_path(index: int) -> str:
    return f"shards/part-{index:05d}.parquet"


class Partitioned:
    """Staged events in `base/_shard=<i>/*.ipc` (the layout of a partitioned sink)."""

    def __init__(self, base: Path, num_shards: int) -> None:
        self.base, self.num_shards = base, num_shards

    def files(self, shard: int) -> list[Path]:
        return sorted((self.base / f"{SHARD}={shard}").glob("*.ipc"))

    def scan(self, shard: int) -> pl.LazyFrame | None:
        """The events of one shard, or None if no user hashed there."""
        files = self.files(shard)
        return pl.scan_ipc(files) if files else None

    def scan_all(self) -> pl.LazyFrame:
        files = [f for i in range(self.num_shards) for f in self.files(i)]
        if not files:
            raise PipelineError("the input has no events (every file is empty)")
        return pl.scan_ipc(files)


def partition(lf: pl.LazyFrame, base: Path, num_shards: int) -> Partitioned:
    """Sink events carrying a SHARD column into one folder per shard (SHARD itself is dropped)."""
    lf.sink_ipc(pl.PartitionBy(base, key=SHARD, include_key=False, approximate_bytes_per_file=None),
                mkdir=True, engine="streaming")
    return Partitioned(base, num_shards)


def stage_per_shard(source: Partitioned, step: Callable[[pl.LazyFrame], pl.LazyFrame], base: Path) -> Partitioned:
    """Apply a `LazyFrame -> LazyFrame` step to each shard alone; the result is staged like the source."""
    for i in range(source.num_shards):
        lf = source.scan(i)
        if lf is not None:
            (base / f"{SHARD}={i}").mkdir(parents=True)
            # One shard fits in memory by design; the in-memory engine is faster than streaming here.
            step(lf).collect().write_ipc(base / f"{SHARD}={i}" / "part.ipc")
    return Partitioned(base, source.num_shards)


def empty_shard(schema: pl.Schema, event_features: list[str]) -> pl.DataFrame:
    """A zero-row shard with the output schema (from the schema of the vocab-mapped events)."""
    columns = {USER_IDX: schema[USER_IDX], ITEM_IDX: pl.List(schema[ITEM_IDX]), TS: pl.List(schema[TS])}
    columns |= {f: pl.List(schema[f]) for f in event_features}
    return pl.DataFrame(schema=columns)


def write_shard(sequences: pl.DataFrame, path: Path, row_group_users: int) -> dict:
    """Write one shard file, with each user's event count as the last column (N_EVENTS); returns
    {rows, events}."""
    sequences = sequences.with_columns(pl.col(ITEM_IDX).list.len().cast(pl.Int32).alias(N_EVENTS))
    sequences.write_parquet(path, compression="zstd", statistics=True, row_group_size=row_group_users)
    events = int(sequences[N_EVENTS].sum()) if sequences.height else 0
    return {"rows": sequences.height, "events": events}
