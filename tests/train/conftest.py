"""Fixtures: a tiny processed dataset directory written exactly per docs/CONTRACTS.md §1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.contract import FORMAT_VERSION, ITEM_IDX, MANIFEST, N_EVENTS, TS, USER_IDX, sha256_of

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))


def make_processed(
    root: Path,
    *,
    name: str = "tiny",
    n_users: int = 60,
    num_items: int = 40,
    n_shards: int = 3,
    min_len: int = 4,
    max_len: int = 30,
    kind: bool = False,
    seed: int = 0,
    counts: bool = True,
    ts_step: int = 5000,
) -> Path:
    """Write `root/` with manifest.json, shards/, items.parquet, users.parquet (leave-one-out split).
    `counts`: the shards carry the N_EVENTS column, as the pipeline writes them (False: a dataset
    written before that column existed). `ts_step`: gaps between a user's events are uniform in
    [0, ts_step) seconds (2: about half the neighbours share a timestamp, as on ML-1M).

    Users get a learnable pattern (item i tends to follow item i-1), so a model can beat chance.
    """
    rng = np.random.default_rng(seed)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    rows: list[list[dict]] = [[] for _ in range(n_shards)]
    events = 0
    for u in range(n_users):
        n = int(rng.integers(min_len, max_len + 1))
        start = int(rng.integers(1, num_items + 1))
        items = [(start + t - 1) % num_items + 1 if rng.random() < 0.8 else int(rng.integers(1, num_items + 1))
                 for t in range(n)]
        ts = np.cumsum(rng.integers(0, ts_step, n)).astype(np.int64) + 1_000_000
        row = {USER_IDX: u, ITEM_IDX: items, TS: ts.tolist(), N_EVENTS: n}
        if kind:
            row["kind"] = rng.integers(0, 2, n).tolist()
        rows[u % n_shards].append(row)
        events += n
    fields = [pa.field(USER_IDX, pa.int64()), pa.field(ITEM_IDX, pa.list_(pa.int32())),
              pa.field(TS, pa.list_(pa.int64()))]
    if kind:
        fields.append(pa.field("kind", pa.list_(pa.int8())))
    if counts:
        fields.append(pa.field(N_EVENTS, pa.int32()))
    schema = pa.schema(fields)
    shards = []
    for s, shard_rows in enumerate(rows):
        rel = f"shards/part-{s:05d}.parquet"
        table = pa.Table.from_pylist(shard_rows, schema=schema)
        pq.write_table(table, root / rel)
        shards.append({"path": rel, "rows": len(shard_rows), "events": sum(len(r[ITEM_IDX]) for r in shard_rows),
                       "sha256": sha256_of(root / rel)})
    pq.write_table(pa.table({"item_idx": pa.array(range(1, num_items + 1), pa.int32()),
                             "raw_item_id": [str(i) for i in range(1, num_items + 1)]}), root / "items.parquet")
    pq.write_table(pa.table({"user_idx": pa.array(range(n_users), pa.int64()),
                             "raw_user_id": [str(u) for u in range(n_users)]}), root / "users.parquet")
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "sources": [],
        "config": {"fixture": "tests/train/conftest.py"},
        "steps": [],
        "counts": {"events": events, "users": n_users, "items": num_items},
        "num_items": num_items,
        "side_columns": ["kind"] if kind else [],
        "shards": shards,
        "split": {"protocol": "leave_one_out"},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return root


def fit_tiny_cli(root: Path, out: Path, *flags: str) -> dict:
    """`python -m sinkrec fit` of a 16-wide, one-block model on `root` (no MLflow, no test pass),
    writing under `out`; `flags` add or override keys. Returns the loaded last.ckpt."""
    import torch

    from sinkrec.cli import main

    main(["fit", "--model.config.d_model", "16", "--model.config.n_heads", "2", "--model.config.n_blocks", "1",
          "--model.config.n_loops", "1", "--data.root", str(root), "--data.batch_size", "16",
          "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(out), "--checkpoint.dirpath", str(out / "ckpt"),
          "--mlflow.enabled", "false", "--test_after_fit", "false", *flags])
    return torch.load(out / "ckpt" / "last.ckpt", weights_only=True)


def stored_rows(dm) -> dict[int, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
    """user_idx -> (items, ts, side columns) as stored, read unit by unit through `dm`'s index."""
    dm.setup()
    out = {}
    for unit in dm.index.units(1):
        rows = dm.index.read(unit)
        for r in range(len(rows)):
            out[int(rows.user_idx[r])] = rows.row(r)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_processed(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="session")
def tiny_kind_data(tmp_path_factory) -> Path:
    return make_processed(tmp_path_factory.mktemp("data") / "tiny_kind", name="tiny-kind", kind=True)
