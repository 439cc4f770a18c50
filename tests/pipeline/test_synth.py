"""SinkBench generator: deterministic per seed, both behaviour kinds, heavy-tailed lengths."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipeline.synth import SynthConfig, generate, sequence_lengths


def test_deterministic_per_seed_and_row_groups(tmp_path):
    cfg = SynthConfig(users=200, items=300, seed=7, batch_events=5_000)
    a, b, c = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet"
    for path, seed in ((a, 7), (b, 7), (c, 8)):
        generate(SynthConfig(**{**cfg.__dict__, "seed": seed}), path, log=lambda _: None)
    assert pl.read_parquet(a).equals(pl.read_parquet(b))
    assert not pl.read_parquet(a).equals(pl.read_parquet(c))
    assert pq.ParquetFile(a).metadata.num_row_groups > 1


def test_kinds_items_and_time_order(tmp_path):
    path = tmp_path / "e.parquet"
    stats = generate(SynthConfig(users=300, items=500, seed=0, repeat_ratio=0.4), path, log=lambda _: None)
    df = pl.read_parquet(path)
    assert df.height == stats["events"]
    share = df["kind"].mean()
    assert 0.25 < share < 0.45  # about repeat_ratio, minus skipped slots
    assert df["item_id"].min() >= 1 and df["item_id"].max() <= 500
    assert df.group_by("user_id").agg(pl.col("timestamp").diff().min())["timestamp"].min() > 0
    # habit events re-consume few distinct items; dynamic ones roam
    per_user = df.group_by("user_id", "kind").agg(pl.col("item_id").n_unique() / pl.len())
    ratios = per_user.group_by("kind").agg(pl.col("item_id").mean()).sort("kind")["item_id"].to_list()
    assert ratios[1] < ratios[0]
    none = tmp_path / "n.parquet"
    generate(SynthConfig(users=50, items=500, seed=0, repeat_ratio=0.0), none, log=lambda _: None)
    assert pl.read_parquet(none)["kind"].sum() == 0


def test_lengths_are_heavy_tailed():
    lengths = sequence_lengths(SynthConfig(users=20_000, items=2000, mean_len=300), np.random.default_rng(0))
    assert 150 < lengths.mean() < 350 and lengths.max() >= 10_000 and np.median(lengths) < lengths.mean() / 2


def _generate_once(path: str) -> None:
    generate(SynthConfig(users=400, items=300, seed=3, batch_events=2_000), Path(path), log=lambda _: None)


def test_two_processes_writing_the_same_log_do_not_collide(tmp_path):
    """Two `study --part`s prepare the same log at once: each writes its own partial file and renames it
    into place, so both succeed and the result is the one log (a shared partial name made one fail)."""
    out = tmp_path / "raw" / "events.parquet"
    ctx = multiprocessing.get_context("spawn")  # not fork: a fork after Arrow's threads started can deadlock
    procs = [ctx.Process(target=_generate_once, args=(str(out),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert list(out.parent.iterdir()) == [out]  # no partial file left behind
    ref = tmp_path / "ref.parquet"
    _generate_once(str(ref))
    assert pl.read_parquet(out).equals(pl.read_parquet(ref))
