"""Read a processed dataset directory (docs/CONTRACTS.md §1): manifest, sha256 checks, shard rows.

    manifest = load_manifest(root)          # parsed + validated manifest.json
    verify_shards(root, manifest)           # raises ShardError naming the first bad file
    table = read_shards(root, manifest)     # UserTable: per-user ragged arrays, shard-major order
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.manifest import sha256_of  # one definition of the hash the manifest records
from pipeline.schema import FORMAT_VERSION

REQUIRED_COLUMNS = ("user_idx", "item_idx", "ts")


class ShardError(RuntimeError):
    """A processed directory that does not match its manifest (or the contract)."""


def load_manifest(root: str | Path) -> dict[str, Any]:
    """Parse `<root>/manifest.json` and check the keys training relies on."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ShardError(
            f"{path}: no manifest. Build the directory with "
            f"`python -m pipeline --config conf/pipeline/<name>.yaml` (or `make preprocess DATASET=<name>`)."
        )
    manifest = json.loads(path.read_text())
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ShardError(f"{path}: format_version is {version!r}, this reader understands {FORMAT_VERSION}")
    for key in ("name", "num_items", "shards", "split"):
        if key not in manifest:
            raise ShardError(f"{path}: missing key {key!r} (see docs/CONTRACTS.md §1)")
    protocol = manifest["split"].get("protocol")
    if protocol not in ("leave_one_out", "time_cutoff"):
        raise ShardError(f"{path}: split.protocol is {protocol!r}; expected 'leave_one_out' or 'time_cutoff'")
    if protocol == "time_cutoff" and not {"valid_ts", "test_ts"} <= manifest["split"].keys():
        raise ShardError(f"{path}: split.protocol 'time_cutoff' needs integer 'valid_ts' and 'test_ts'")
    return manifest


def shard_path(root: str | Path, entry: dict[str, Any]) -> Path:
    """The file of one manifest shard entry, refused unless it lies inside `root`: a manifest is
    input, never a way to make the trainer open an arbitrary file."""
    root = Path(root)
    rel = str(entry.get("path", ""))
    path = root / rel
    if Path(rel).is_absolute() or not path.resolve().is_relative_to(root.resolve()):
        raise ShardError(f"{root / 'manifest.json'}: shard path {rel!r} points outside the dataset directory "
                         f"{root}; shard paths must be relative, like 'shards/part-00000.parquet'")
    return path


def verify_shards(root: str | Path, manifest: dict[str, Any]) -> None:
    """Check every shard listed in the manifest exists and has the recorded sha256."""
    root = Path(root)
    for entry in manifest["shards"]:
        path = shard_path(root, entry)
        if not path.is_file():
            raise ShardError(f"{path}: shard listed in {root / 'manifest.json'} is missing")
        digest = sha256_of(path)
        if digest != entry["sha256"]:
            raise ShardError(
                f"{path}: sha256 {digest} does not match {entry['sha256']} recorded in "
                f"{root / 'manifest.json'}; the shard changed after preprocessing. Re-run the pipeline."
            )


@dataclass
class UserTable:
    """All users of a dataset as ragged arrays (CSR layout), in shard-major order.

    Row r's events are `items[offsets[r]:offsets[r+1]]` (oldest first); `shard[r]` is its shard index.
    `side` holds one flat array per side column (same layout as `items`).
    """

    user_idx: np.ndarray  # [U] int64
    shard: np.ndarray  # [U] int32
    offsets: np.ndarray  # [U + 1] int64
    items: np.ndarray  # [E] int64
    ts: np.ndarray  # [E] int64
    side: dict[str, np.ndarray]  # name -> [E]

    def __len__(self) -> int:
        return len(self.user_idx)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        lo, hi = self.offsets[r], self.offsets[r + 1]
        return self.items[lo:hi], self.ts[lo:hi], {k: v[lo:hi] for k, v in self.side.items()}


def _flat(column, path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets relative to this shard, flat values) of a list<...> column."""
    arr = column.combine_chunks()
    if not hasattr(arr, "offsets"):
        raise ShardError(f"{path}: column {name!r} must be a list column, got {arr.type}")
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    values = np.asarray(arr.values.to_numpy(zero_copy_only=False), dtype=np.int64)
    # Sliced list arrays carry a non-zero first offset; normalise to a view starting at 0.
    values = values[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


def read_shards(root: str | Path, manifest: dict[str, Any]) -> UserTable:
    """Load every shard into one UserTable (the whole dataset; ML-1M is ~16 MB in memory)."""
    root = Path(root)
    side_names = list(manifest.get("side_columns", []))
    users, shard_ids, lengths, items, ts = [], [], [], [], []
    side: dict[str, list[np.ndarray]] = {k: [] for k in side_names}
    for s, entry in enumerate(manifest["shards"]):
        path = shard_path(root, entry)
        table = pq.read_table(path)
        missing = [c for c in (*REQUIRED_COLUMNS, *side_names) if c not in table.column_names]
        if missing:
            raise ShardError(f"{path}: missing columns {missing}; has {table.column_names}")
        if table.num_rows != entry.get("rows", table.num_rows):
            raise ShardError(f"{path}: {table.num_rows} rows, manifest says {entry['rows']}")
        off_i, it = _flat(table.column("item_idx"), path, "item_idx")
        off_t, tt = _flat(table.column("ts"), path, "ts")
        if not np.array_equal(off_i, off_t):
            raise ShardError(f"{path}: 'item_idx' and 'ts' lists differ in length for some user")
        for name in side_names:
            off_s, sv = _flat(table.column(name), path, name)
            if not np.array_equal(off_i, off_s):
                raise ShardError(f"{path}: side column {name!r} lists differ in length from 'item_idx'")
            side[name].append(sv)
        users.append(np.asarray(table.column("user_idx").to_numpy(), dtype=np.int64))
        shard_ids.append(np.full(table.num_rows, s, dtype=np.int32))
        lengths.append(np.diff(off_i))
        items.append(it)
        ts.append(tt)
    lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    out = UserTable(
        user_idx=np.concatenate(users) if users else np.zeros(0, np.int64),
        shard=np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32),
        offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        items=np.concatenate(items) if items else np.zeros(0, np.int64),
        ts=np.concatenate(ts) if ts else np.zeros(0, np.int64),
        side={k: np.concatenate(v) for k, v in side.items()},
    )
    num_items = int(manifest["num_items"])
    if len(out.items) and (out.items.min() < 1 or out.items.max() > num_items):
        raise ShardError(
            f"{root}: item ids span [{out.items.min()}, {out.items.max()}], "
            f"the manifest's num_items={num_items} requires 1..{num_items}"
        )
    return out
