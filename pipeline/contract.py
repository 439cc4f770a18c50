"""The processed-dataset contract (docs/CONTRACTS.md section 1), shared by the pipeline that writes
it, the trainer that reads it and the test fixtures that fake it. Standard library only: the trainer
imports this module without pulling in Polars.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# Shard columns: one row per user; the list columns hold that user's events, oldest first.
USER_IDX = "user_idx"  # int64
ITEM_IDX = "item_idx"  # list<int32>: contiguous ids 1..num_items, 0 = padding (never stored)
TS = "ts"  # list<int64>: seconds since the Unix epoch, non-decreasing per user
REQUIRED_COLUMNS = (USER_IDX, ITEM_IDX, TS)
# int32: len(item_idx), the user's event count. A batch plan under a token budget (data.max_tokens)
# reads this one small column instead of every item list. Optional: a dataset written before it
# existed is planned from its item lists (same numbers, O(events) read instead of O(users)).
N_EVENTS = "n_events"
ITEM_DTYPE, TS_DTYPE, USER_DTYPE = "int32", "int64", "int64"  # numpy names of the dtypes above
# Side columns (`manifest.side_columns`, e.g. SinkBench's `kind`): list<integer> or list<float>,
# read in the type they were written in (a float feature is never truncated to an integer).

# Split protocols (`manifest.split.protocol`) and the stages the trainer cuts from them.
PROTOCOLS = ("leave_one_out", "time_cutoff")
STAGES = ("train", "val", "test", "predict")  # "val": Lightning's name


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """The file hash the manifest records for every shard and table."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
