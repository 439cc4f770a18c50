"""benchmarks/layer_ab.py: both cases run in BASE's worktree and here, and a row is printed per case
(no timing is asserted)."""
from __future__ import annotations

import re

from benchmarks import layer_ab


def test_layer_ab_runs_both_trees(capsys):
    assert layer_ab.main(["--base", "HEAD", "--rounds", "1", "--reps", "1", "--tokens", "256",
                          "--seq-lens", "64"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\| (layer|op) \| 64 \|", line)]
    assert len(rows) == 2, out
    for row in rows:
        assert re.search(r"\| [\d.]+ \| [\d.]+ \| [\d.]+x \([\d.]+-[\d.]+\) \|$", row), row
