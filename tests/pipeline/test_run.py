"""End-to-end runs on tiny raw logs: golden output, shards, manifest, idempotency, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from pipeline import run as run_module
from pipeline.manifest import sha256_of
from tests.pipeline.conftest import read_shards, write_text

# Ids with commas, quotes, unicode; an exact duplicate (line 4 = line 2); a time tie for "Ann, B."
# (ts 100: "Le ""Film""" before "Zoë" by input order); ISO and integer timestamps.
CSV = '''user,title,ts,rating
"Ann, B.","Le ""Film""",100,5
"Ann, B.",Zoë,100,3
"Ann, B.","Le ""Film""",100,5
bob,"Up, Up",2020-01-01T00:00:00Z,4
"Ann, B.","Up, Up",50,4
bob,Zoë,1577836801,2
'''


@pytest.fixture
def tiny_csv(tmp_path):
    return write_text(tmp_path / "events.csv", CSV, newline="\r\n")


def args(src, out, *extra):
    return ["--input", src, "--format", "csv", "--user-col", "user", "--item-col", "title", "--time-col", "ts",
            "--out", out, "--num-shards", "3", *extra]


def test_golden_output_with_quoted_ids_crlf_duplicates_and_ties(cli, tiny_csv, tmp_path):
    out = tmp_path / "out"
    code, _, err = cli(*args(tiny_csv, out, "--time-format", "unix"))
    assert code == 2 and "line 5" in err  # ISO value under time_format unix: unparseable, line named
    code, _, err = cli(*args(tiny_csv, out, "--time-format", "iso"))
    assert code == 2  # integer values do not parse as ISO either: mixed columns need a choice
    # mixed integer/ISO: the rows that do not fit are dropped when asked to
    code, _, err = cli(*args(tiny_csv, out, "--on-bad-rows", "skip"))
    assert code == 0, err
    items = pl.read_parquet(out / "items.parquet")
    users = pl.read_parquet(out / "users.parquet")
    assert_frame_equal(items, pl.DataFrame({"item_idx": pl.Series([1, 2, 3], dtype=pl.Int32),
                                            "raw_item_id": ['Le "Film"', "Zoë", "Up, Up"]}))
    assert users["raw_user_id"].to_list() == ["Ann, B.", "bob"]
    expected = pl.DataFrame({"user_idx": [1, 2],
                             "item_idx": pl.Series([[3, 1, 2], [2]], dtype=pl.List(pl.Int32)),
                             "ts": [[50, 100, 100], [1577836801]],
                             "n_events": pl.Series([3, 1], dtype=pl.Int32)})
    assert_frame_equal(read_shards(out), expected)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bad_rows_skipped"] == 1
    assert [(s["step"], s["events"]) for s in manifest["steps"]] == [("parse", 5), ("dedup", 4), ("sequences", 4)]


def test_iso_timestamps_are_utc_seconds(cli, tmp_path):
    src = write_text(tmp_path / "e.tsv", "u\ti\tt\nx\ta\t2020-01-01T00:00:01Z\nx\tb\t2020-01-01T01:00:00+01:00\n")
    code, _, err = cli("--input", src, "--format", "tsv", "--user-col", "u", "--item-col", "i", "--time-col", "t",
                       "--out", tmp_path / "o")
    assert code == 0, err
    assert read_shards(tmp_path / "o")["ts"].to_list() == [[1577836800, 1577836801]]


@pytest.fixture
def built(cli, tmp_path):
    """A SinkBench-like parquet log with a side column, processed into 4 shards with a k-core."""
    from pipeline.synth import SynthConfig, generate
    src = tmp_path / "raw.parquet"
    generate(SynthConfig(users=300, items=400, seed=1, mean_len=40), src, log=lambda _: None)
    out = tmp_path / "out"
    flags = ["--input", src, "--format", "parquet", "--out", out, "--num-shards", "4", "--event-features", "kind",
             "--user-col", "user_id", "--item-col", "item_id", "--time-col", "timestamp",
             "--min-user-interactions", "5", "--min-item-interactions", "5", "--row-group-users", "32"]
    code, stdout, err = cli(*flags)
    assert code == 0, err
    return out, flags, stdout


def test_shards_partition_users_and_are_time_sorted(built):
    out, _, _ = built
    shards = [pl.read_parquet(p) for p in sorted((out / "shards").glob("*.parquet"))]
    assert len(shards) == 4
    ids = [set(s["user_idx"]) for s in shards]
    assert sum(len(s) for s in ids) == len(set().union(*ids))  # no user in two shards
    users = pl.read_parquet(out / "users.parquet")
    assert set().union(*ids) == set(users["user_idx"])
    for i, s in enumerate(shards):
        assert s.schema == pl.Schema({"user_idx": pl.Int64, "item_idx": pl.List(pl.Int32),
                                      "ts": pl.List(pl.Int64), "kind": pl.List(pl.Int8), "n_events": pl.Int32})
        assert (s["n_events"] == s["item_idx"].list.len()).all()
        assert s["ts"].list.eval(pl.element().diff().drop_nulls().min()).explode().drop_nulls().min() >= 0
        assert (s["item_idx"].list.len() == s["kind"].list.len()).all()
        assert set(users.filter(pl.col("shard") == i)["user_idx"]) == set(s["user_idx"])
    all_items = pl.concat(shards)["item_idx"].explode()
    assert all_items.min() == 1 and all_items.max() == pl.read_parquet(out / "items.parquet").height


def test_manifest_counts_and_hashes_match_files(built):
    out, _, stdout = built
    m = json.loads((out / "manifest.json").read_text())
    assert [s["step"] for s in m["steps"]] == ["parse", "dedup", "kcore", "sequences"]
    assert "kcore" in stdout and "seconds" in stdout  # progress lines and the summary table
    total_events = total_rows = 0
    for s in m["shards"]:
        df = pl.read_parquet(out / s["path"])
        assert (s["rows"], s["events"]) == (df.height, df["item_idx"].list.len().sum())
        assert s["sha256"] == sha256_of(out / s["path"])
        total_events, total_rows = total_events + s["events"], total_rows + s["rows"]
    assert m["counts"] == {"events": total_events, "users": total_rows, "items": m["num_items"]}
    for t in m["tables"]:
        assert t["sha256"] == sha256_of(out / t["path"]) and t["rows"] == pl.read_parquet(out / t["path"]).height
    assert m["sources"][0]["sha256"] == sha256_of(Path(m["sources"][0]["path"]))
    assert m["side_columns"] == ["kind"] and m["split"] == {"protocol": "leave_one_out"}
    assert max(pq.ParquetFile(out / s["path"]).metadata.num_row_groups for s in m["shards"]) > 1


def test_rerun_is_up_to_date_and_overwrite_reproduces_identical_shards(cli, built):
    out, flags, _ = built
    before = json.loads((out / "manifest.json").read_text())
    code, stdout, _ = cli(*flags)
    assert code == 0 and "up to date" in stdout
    code, _, err = cli(*flags, "--overwrite")
    assert code == 0, err
    after = json.loads((out / "manifest.json").read_text())
    assert [s["sha256"] for s in after["shards"]] == [s["sha256"] for s in before["shards"]]
    assert after["tables"] == before["tables"]
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["out", "raw.parquet"])  # no leftovers


def test_different_config_refuses_without_overwrite(cli, built):
    out, flags, _ = built
    code, _, err = cli(*flags, "--num-shards", "2")
    assert code == 2 and "num_shards: 4 -> 2" in err and "--overwrite" in err
    assert len(list((out / "shards").glob("*.parquet"))) == 4  # untouched
    code, _, err = cli(*flags, "--num-shards", "2", "--overwrite")
    assert code == 0, err
    assert len(list((out / "shards").glob("*.parquet"))) == 2


def test_interrupted_run_leaves_nothing(cli, tiny_csv, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt  # as if Ctrl-C / SIGTERM arrived while shards are written
    monkeypatch.setattr(run_module, "write_shard", boom)
    code, _, err = cli(*args(tiny_csv, tmp_path / "out", "--on-bad-rows", "skip"))
    assert code == 130 and "no output" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv"]


def test_interrupted_overwrite_keeps_the_old_output(cli, tiny_csv, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert cli(*args(tiny_csv, out, "--on-bad-rows", "skip"))[0] == 0
    before = (out / "manifest.json").read_text()
    monkeypatch.setattr(run_module, "write_shard", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    code, _, _ = cli(*args(tiny_csv, out, "--on-bad-rows", "skip", "--num-shards", "1", "--overwrite"))
    assert code == 130
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv", "out"]


def test_time_cutoff_split_is_recorded_and_validated(cli, tmp_path):
    src = write_text(tmp_path / "in.csv", "user_id,item_id,timestamp\nu,a,1\nu,b,2\n")
    base = ["--input", src, "--format", "csv", "--out", tmp_path / "o", "--split", "time_cutoff"]
    code, _, err = cli(*base, "--valid-ts", "20", "--test-ts", "10")
    assert code == 2 and "valid_ts <= test_ts" in err
    code, _, err = cli(*base, "--valid-ts", "10", "--test-ts", "20")
    assert code == 0, err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["split"] == {"protocol": "time_cutoff", "valid_ts": 10, "test_ts": 20}


@pytest.mark.parametrize("form", ["directory", "glob", "files"])
def test_input_as_directory_glob_or_files_concatenates_in_sorted_order(cli, tmp_path, form):
    logs = tmp_path / "logs"
    logs.mkdir()
    # same timestamp in both files: the tie is broken by file order (a before b), then line order
    write_text(logs / "b.csv", "user_id,item_id,timestamp\nu,z,5\nu,y,5\n")
    write_text(logs / "a.csv", "user_id,item_id,timestamp\nu,x,5\n")
    write_text(logs / ".hidden.csv", "user_id,item_id,timestamp\nu,hidden,1\n")
    inputs = {"directory": [logs], "glob": [logs / "*.csv"], "files": [logs / "a.csv", logs / "b.csv"]}[form]
    code, _, err = cli("--input", *inputs, "--format", "csv", "--out", tmp_path / "o")
    assert code == 0, err
    items = pl.read_parquet(tmp_path / "o" / "items.parquet")["raw_item_id"].to_list()
    seq = read_shards(tmp_path / "o")["item_idx"].to_list()
    assert [items[i - 1] for i in seq[0]] == ["x", "z", "y"]
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [Path(s["path"]).name for s in manifest["sources"]] == ["a.csv", "b.csv"]
