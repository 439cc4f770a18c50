"""Every kind of bad input: exit status 2, a one-line message naming what/where/what is right,
and no output directory left behind."""

from __future__ import annotations

import pytest

from tests.pipeline.conftest import write_text

GOOD = "user_id,item_id,timestamp\nu1,a,10\nu1,b,11\nu2,a,12\n"


def run_bad(cli, tmp_path, text: str | None, *extra: str, fmt: str = "csv") -> str:
    src = tmp_path / "in.csv"
    if text is not None:
        write_text(src, text)
    out = tmp_path / "out"
    code, _, err = cli("--input", src, "--format", fmt, "--out", out, *extra)
    assert code == 2, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no hidden build left
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def test_good_input_passes(cli, tmp_path):
    code, _, err = cli("--input", write_text(tmp_path / "in.csv", GOOD), "--format", "csv", "--out", tmp_path / "o")
    assert code == 0, err


def test_missing_file(cli, tmp_path):
    assert "no such file" in run_bad(cli, tmp_path, None)


def test_unknown_format(cli, tmp_path):
    err = run_bad(cli, tmp_path, GOOD, fmt="xlsx")
    assert "'format'" in err and "movielens, csv, tsv, parquet" in err


def test_missing_columns_lists_the_columns_found(cli, tmp_path):
    err = run_bad(cli, tmp_path, GOOD, "--time-col", "when")
    assert "missing column(s) ['when']" in err and "['user_id', 'item_id', 'timestamp']" in err


def test_null_ids(cli, tmp_path):
    err = run_bad(cli, tmp_path, GOOD + ",c,13\nu3,,14\n")
    assert "null or empty user id (movielens: or not an integer) in column 'user_id'" in err
    assert "in.csv:line 5" in err and "in.csv:line 6" in err and "item id" in err


def test_movielens_ids_must_be_integers(cli, tmp_path):
    err = run_bad(cli, tmp_path, "1\t10\t5\t100\nx\t11\t5\t101\n", fmt="movielens")
    assert "1 row(s) with null or empty user id" in err and "in.csv:line 2" in err


@pytest.mark.parametrize("value,what", [("yesterday", "unparseable"), ("-5", "negative")])
def test_bad_timestamps(cli, tmp_path, value, what):
    err = run_bad(cli, tmp_path, GOOD + f"u3,c,{value}\n")
    assert f"{what} timestamp in column 'timestamp'" in err and "in.csv:line 5" in err
    assert "integer seconds or ISO-8601" in err


def test_malformed_lines_report_count_and_first_lines(cli, tmp_path):
    err = run_bad(cli, tmp_path, GOOD + "u3,c,13,extra\nu4,d,14\nu5,e,15,x,y\n")
    assert "2 row(s) with malformed line" in err and "in.csv:line 5, " in err and "in.csv:line 7" in err
    assert "--on-bad-rows skip" in err


def test_skip_drops_malformed_lines(cli, tmp_path):
    src = write_text(tmp_path / "in.csv", GOOD + "u3,c,13,extra\n")
    code, out, err = cli("--input", src, "--format", "csv", "--out", tmp_path / "o", "--on-bad-rows", "skip")
    assert code == 0 and "skipping 1 bad row" in out, err


def test_nothing_left_after_filtering(cli, tmp_path):
    err = run_bad(cli, tmp_path, GOOD, "--min-user-interactions", "5")
    assert "nothing left after step 'kcore'" in err and "min_user_interactions" in err


def test_unknown_config_key(cli, tmp_path):
    cfg = write_text(tmp_path / "c.yaml", "input: x.csv\nnum_shard: 3\n")
    code, _, err = cli("--config", cfg)
    assert code == 2 and "unknown config key 'num_shard'" in err and "did you mean 'num_shards'" in err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_not_parquet(cli, tmp_path):
    assert "not a readable Parquet file" in run_bad(cli, tmp_path, GOOD, fmt="parquet")


def test_movielens_bad_timestamp_and_extra_field(cli, tmp_path):
    err = run_bad(cli, tmp_path, "1\t10\t5\t100\n2\t11\t5\t1e\n3\t12\t5\t102\t9\n", fmt="movielens")
    assert "unparseable timestamp in column 'timestamp' (first: " in err and "in.csv:line 2" in err
    assert "1 row(s) with malformed line" in err and "in.csv:line 3" in err
