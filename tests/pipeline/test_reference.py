"""The Polars pipeline against the plain pandas implementation of the same steps (the benchmark's
baseline, benchmarks/preprocess_pandas.py): same shards, value for value."""

from __future__ import annotations

import polars as pl
from polars.testing import assert_frame_equal

from benchmarks import preprocess_pandas
from pipeline.synth import SynthConfig, generate


def test_polars_pipeline_equals_pandas_reference(cli, tmp_path, capsys):
    src = tmp_path / "raw.parquet"
    # habit loops repeat items at distinct times; duplicates are added below to exercise dedup
    generate(SynthConfig(users=150, items=300, seed=3, mean_len=30), src, log=lambda _: None)
    raw = pl.read_parquet(src)
    pl.concat([raw, raw.sample(200, seed=0)]).write_parquet(src)
    common = ["--input", str(src), "--format", "parquet", "--event-features", "kind", "--num-shards", "3",
              "--min-user-interactions", "6", "--min-item-interactions", "4"]
    code, _, err = cli(*common, "--out", tmp_path / "polars")
    assert code == 0, err
    preprocess_pandas.main([*common, "--out", str(tmp_path / "pandas")])
    for i in range(3):
        name = f"shards/part-{i:05d}.parquet"
        got = pl.read_parquet(tmp_path / "polars" / name)
        want = pl.read_parquet(tmp_path / "pandas" / name).cast(got.schema)
        assert_frame_equal(got, want)
    assert got.height > 0
