"""benchmarks/plan_read.py runs on a dataset with the n_events column and refuses one without it
(no timing is asserted)."""
from __future__ import annotations

import sys

import pytest

from benchmarks import plan_read
from tests.train.conftest import make_processed


def test_plan_read_reports_both_reads(tmp_path, monkeypatch, capsys):
    root = make_processed(tmp_path / "d", n_users=30, n_shards=2)
    monkeypatch.setattr(sys, "argv", ["plan_read", "--root", str(root), "--reps", "1"])
    plan_read.main()  # asserts internally that both reads give the same lengths
    out = capsys.readouterr().out
    assert "| n_events |" in out and "| item lists |" in out and "30 users" in out


def test_plan_read_refuses_a_dataset_without_counts(tmp_path, monkeypatch):
    root = make_processed(tmp_path / "d", n_users=10, n_shards=1, counts=False)
    monkeypatch.setattr(sys, "argv", ["plan_read", "--root", str(root)])
    with pytest.raises(SystemExit, match="no 'n_events' column"):
        plan_read.main()
