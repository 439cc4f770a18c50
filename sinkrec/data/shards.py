"""Read a processed dataset directory (docs/CONTRACTS.md section 1) without holding it in memory.

    manifest = load_manifest(root)              # parsed + validated manifest.json
    index = ShardIndex.build(root, manifest)     # Parquet footers only: the row groups and their sizes
    rows = index.read(unit)                     # one slice of one row group: UserRows (CSR arrays)

A `Unit` (a slice of one row group of one shard) is what ranks and workers are dealt
(sinkrec.data.stream). Verification (`data.verify`):
    full  sha256 of every shard at set-up, on every rank (today's cost: reads the whole dataset once)
    own   sha256 of a shard the first time THIS process opens it, before any of its rows are used
          (a rank reads only the shards it is dealt; a corrupt one fails before a step trains on it)
    off   no hashing; a truncated or unreadable file still fails, naming the file, and every row
          group is checked against its footer and the manifest's counts
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.contract import (
    FORMAT_VERSION,
    ITEM_DTYPE,
    ITEM_IDX,
    MANIFEST,
    N_EVENTS,
    PROTOCOLS,
    REQUIRED_COLUMNS,
    TS,
    TS_DTYPE,
    USER_DTYPE,
    USER_IDX,
    sha256_of,
)

Verify = Literal["full", "own", "off"]
VERIFY_MODES = ("full", "own", "off")


class ShardError(RuntimeError):
    """A processed directory that does not match its manifest (or the contract)."""


def load_manifest(root: str | Path) -> dict[str, Any]:
    """Parse `<root>/manifest.json` and check the keys training relies on."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ShardError(
            f"{path}: no manifest. Training builds the shipped datasets itself (data/processed/<name> for each "
            f"conf/pipeline/<name>.yaml; `make preprocess DATASET=<name>` builds one by hand); build any "
            f"other directory with `python -m pipeline --config <your pipeline yaml> --out {Path(root)}`."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e}); re-run the pipeline to rewrite it") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ShardError(f"{path}: format_version is {version!r}, this reader understands {FORMAT_VERSION}")
    for key in ("name", "num_items", "shards", "split"):
        if key not in manifest:
            raise ShardError(f"{path}: missing key {key!r} (see docs/CONTRACTS.md §1)")
    protocol = manifest["split"].get("protocol")
    if protocol not in PROTOCOLS:
        raise ShardError(f"{path}: split.protocol is {protocol!r}; expected one of {PROTOCOLS}")
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
        raise ShardError(f"{root / MANIFEST}: shard path {rel!r} points outside the dataset directory "
                         f"{root}; shard paths must be relative, like 'shards/part-00000.parquet'")
    return path


def verify_shard(root: Path, entry: dict[str, Any]) -> None:
    path = shard_path(root, entry)
    if not path.is_file():
        raise ShardError(f"{path}: shard listed in {root / MANIFEST} is missing")
    digest = sha256_of(path)
    if digest != entry["sha256"]:
        raise ShardError(
            f"{path}: sha256 {digest} does not match {entry['sha256']} recorded in "
            f"{root / MANIFEST}; the shard changed after preprocessing. Re-run the pipeline."
        )


def verify_shards(root: str | Path, manifest: dict[str, Any]) -> None:
    """Check every shard listed in the manifest exists and has the recorded sha256."""
    for entry in manifest["shards"]:
        verify_shard(Path(root), entry)


@dataclass(frozen=True)
class Unit:
    """Rows [lo, hi) of row group `row_group` of shard `shard`."""

    shard: int
    row_group: int
    lo: int
    hi: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


@dataclass
class UserRows:
    """Users of one unit as ragged arrays (CSR): user r's events are `items[offsets[r]:offsets[r+1]]`,
    oldest first. Items stay int32 (the contract's dtype); side columns keep their written dtype."""

    user_idx: np.ndarray  # [U] int64
    offsets: np.ndarray  # [U + 1] int64
    items: np.ndarray  # [E] int32
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


def _flat(column, where: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, flat values) of a list<...> column, values in their stored dtype."""
    arr = column.combine_chunks()
    if not hasattr(arr, "offsets"):
        raise ShardError(f"{where}: column {name!r} must be a list column, got {arr.type}")
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


class ShardIndex:
    """The row groups of every shard, from the Parquet footers (no data pages are read)."""

    def __init__(self, root: Path, manifest: dict[str, Any], groups: list[tuple[int, int, int]],
                 verify: Verify, counted: set[int] | None = None) -> None:
        self.root, self.manifest, self.verify = root, manifest, verify
        self.groups = groups  # (shard, row group, rows)
        self.counted = counted or set()  # the shards that carry the N_EVENTS column
        self.side_names = list(manifest.get("side_columns", []))
        self.num_items = int(manifest["num_items"])
        self._verified: set[int] = set()

    @classmethod
    def build(cls, root: str | Path, manifest: dict[str, Any], verify: Verify = "own") -> ShardIndex:
        if verify not in VERIFY_MODES:
            raise ShardError(f"data.verify={verify!r} must be one of {VERIFY_MODES}")
        root = Path(root)
        if verify == "full":
            verify_shards(root, manifest)
        groups, counted = [], set()
        for s, entry in enumerate(manifest["shards"]):
            path = shard_path(root, entry)
            if not path.is_file():
                raise ShardError(f"{path}: shard listed in {root / MANIFEST} is missing")
            try:
                meta = pq.ParquetFile(path).metadata
            except (OSError, pa.ArrowException) as e:  # a truncated or foreign footer
                raise ShardError(f"{path}: not a readable Parquet file ({e}); the file is truncated or "
                                 "corrupt. Re-run the pipeline.") from None
            names = meta.schema.to_arrow_schema().names
            missing = [c for c in (*REQUIRED_COLUMNS, *cls._side(manifest)) if c not in names]
            if missing:
                raise ShardError(f"{path}: missing columns {missing}; has {names}")
            if "rows" in entry and meta.num_rows != entry["rows"]:
                raise ShardError(f"{path}: {meta.num_rows} rows, {root / MANIFEST} says {entry['rows']}")
            groups += [(s, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
            if N_EVENTS in names:
                counted.add(s)
        return cls(root, manifest, groups, verify, counted)

    @staticmethod
    def _side(manifest: dict[str, Any]) -> list[str]:
        return list(manifest.get("side_columns", []))

    @property
    def num_users(self) -> int:
        return sum(g[2] for g in self.groups)

    def units(self, min_units: int) -> list[Unit]:
        """Row groups cut into equal slices so that there are at least `min_units` units (a few per
        rank and worker, so that few shards or unequal shards still split evenly)."""
        if not self.groups:
            return []
        cuts = max(1, -(-min_units // len(self.groups)))
        out = []
        for s, g, rows in self.groups:
            bounds = np.linspace(0, rows, min(cuts, max(rows, 1)) + 1).round().astype(int)
            for lo, hi in itertools.pairwise(bounds):
                if hi > lo:
                    out.append(Unit(s, g, int(lo), int(hi)))
        return out

    def read_lengths(self, shard: int, row_group: int, with_ts: bool) -> UserRows:
        """Only what a batch plan needs (data.max_tokens): every user's event count, plus the
        timestamps when `with_ts` (time_cutoff splits). The counts come from the N_EVENTS column
        (4 bytes per user) where the shard has it, else from the item lists (every event). No hash
        check, no item check: nothing trains on these rows; the checks run when read() decodes them
        for a batch (and refuse a count that disagrees with its list)."""
        path = shard_path(self.root, self.manifest["shards"][shard])
        where = f"{path} (row group {row_group})"
        source = TS if with_ts else N_EVENTS if shard in self.counted else ITEM_IDX
        try:
            table = pq.ParquetFile(path).read_row_group(row_group, columns=[source])
        except (OSError, pa.ArrowException) as e:
            raise ShardError(f"{where}: cannot be read ({e}); the file is truncated or corrupt. "
                             "Re-run the pipeline.") from None
        ts = np.zeros(0, TS_DTYPE)
        if source == N_EVENTS:
            counts = table.column(N_EVENTS).to_numpy()
            offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        else:
            offsets, values = _flat(table.column(source), where, source)
            if with_ts:
                ts = values.astype(TS_DTYPE, copy=False)
        return UserRows(user_idx=np.zeros(len(offsets) - 1, USER_DTYPE), offsets=offsets,
                        items=np.zeros(0, ITEM_DTYPE), ts=ts, side={})

    def read(self, unit: Unit) -> UserRows:
        """The unit's users. Checks the shard's hash first under verify='own', and every item id."""
        entry = self.manifest["shards"][unit.shard]
        path = shard_path(self.root, entry)
        if self.verify == "own" and unit.shard not in self._verified:
            verify_shard(self.root, entry)
            self._verified.add(unit.shard)
        where = f"{path} (row group {unit.row_group})"
        try:
            count_column = [N_EVENTS] if unit.shard in self.counted else []
            table = pq.ParquetFile(path).read_row_group(unit.row_group,
                                                        columns=[*REQUIRED_COLUMNS, *self.side_names, *count_column])
        except (OSError, pa.ArrowException) as e:
            raise ShardError(f"{where}: cannot be read ({e}); the file is truncated or corrupt. "
                             "Re-run the pipeline.") from None
        table = table.slice(unit.lo, unit.rows)
        off_i, items = _flat(table.column(ITEM_IDX), where, ITEM_IDX)
        off_t, ts = _flat(table.column(TS), where, TS)
        if not np.array_equal(off_i, off_t):
            raise ShardError(f"{where}: '{ITEM_IDX}' and '{TS}' lists differ in length for some user")
        if unit.shard in self.counted:  # the counts a batch plan read must be these lists' lengths
            counts = table.column(N_EVENTS).to_numpy()
            wrong = np.flatnonzero(counts != np.diff(off_i))
            if len(wrong):
                r = int(wrong[0])
                raise ShardError(
                    f"{where}: column '{N_EVENTS}' says {int(counts[r])} events for user_idx "
                    f"{table.column(USER_IDX)[r].as_py()}, its '{ITEM_IDX}' list has {int(np.diff(off_i)[r])}; "
                    "the shard was edited after preprocessing. Re-run the pipeline.")
        side = {}
        for name in self.side_names:
            off_s, side[name] = _flat(table.column(name), where, name)
            if not np.array_equal(off_i, off_s):
                raise ShardError(f"{where}: side column {name!r} lists differ in length from '{ITEM_IDX}'")
        if len(items) and (items.min() < 1 or items.max() > self.num_items):
            bad = int(np.flatnonzero((items < 1) | (items > self.num_items))[0])
            user = int(np.searchsorted(off_i, bad, side="right") - 1)
            raise ShardError(
                f"{where}: item id {int(items[bad])} of user_idx {table.column(USER_IDX)[user].as_py()} is "
                f"outside 1..{self.num_items} (the manifest's num_items); the shard and manifest disagree. "
                "Re-run the pipeline.")
        return UserRows(
            user_idx=np.asarray(table.column(USER_IDX).to_numpy(), dtype=USER_DTYPE),
            offsets=off_i,
            items=items.astype(ITEM_DTYPE, copy=False),
            ts=ts.astype(TS_DTYPE, copy=False),
            side=side,
        )
