"""What a token-budget batch plan (`data.max_tokens`) reads at set-up, on every rank: each user's
event count from the shards' `n_events` column vs from the item lists (datasets written before the
column existed), measured side by side on one dataset.

    python -m benchmarks.plan_read [--root data/processed/ml-1m] [--reps 3]

Reports the compressed bytes of the column chunks each way reads (from the Parquet footers) and
the median seconds of `ShardIndex.read_lengths` over every row group; both plans must be equal.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow.parquet as pq

from pipeline.contract import ITEM_IDX, N_EVENTS
from sinkrec.data.shards import ShardIndex, load_manifest, shard_path


def column_bytes(index: ShardIndex, name: str) -> int:
    total = 0
    for s, g, _ in index.groups:
        meta = pq.ParquetFile(shard_path(index.root, index.manifest["shards"][s])).metadata.row_group(g)
        total += sum(meta.column(c).total_compressed_size for c in range(meta.num_columns)
                     if meta.column(c).path_in_schema.split(".")[0] == name)
    return total


def read_all(index: ShardIndex) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    lengths = [index.read_lengths(s, g, with_ts=False).lengths for s, g, _ in index.groups]
    return time.perf_counter() - t0, np.concatenate(lengths)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="data/processed/ml-1m")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    manifest = load_manifest(args.root)
    index = ShardIndex.build(args.root, manifest, verify="off")
    if not index.counted:
        raise SystemExit(f"{args.root}: its shards have no '{N_EVENTS}' column (written before it existed); "
                         "re-run the pipeline with --overwrite to compare")
    counted = set(index.counted)
    times: dict[str, list[float]] = {"n_events": [], "item lists": []}
    results = {}
    for way in (set(), counted):  # untimed warm-up of both: the first read opens the files cold
        index.counted = way
        read_all(index)
    for _ in range(args.reps):  # interleaved, so both ways see the same machine
        for way, seconds in times.items():
            index.counted = counted if way == "n_events" else set()
            sec, results[way] = read_all(index)
            seconds.append(sec)
    assert np.array_equal(results["n_events"], results["item lists"]), "the two reads disagree"
    sizes = {"n_events": column_bytes(index, N_EVENTS), "item lists": column_bytes(index, ITEM_IDX)}
    users, events = len(results["n_events"]), int(results["n_events"].sum())
    print(f"{args.root}: {users:,} users, {events:,} events, {len(index.groups)} row groups")
    print("| read | compressed bytes | seconds (median) |")
    print("|---|---:|---:|")
    for way, seconds in times.items():
        print(f"| {way} | {sizes[way]:,} | {statistics.median(seconds):.3f} |")
    print(f"ratio (item lists / n_events): bytes {sizes['item lists'] / sizes['n_events']:.0f}x, "
          f"time {statistics.median(times['item lists']) / statistics.median(times['n_events']):.1f}x")


if __name__ == "__main__":
    main()
