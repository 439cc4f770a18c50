"""Two pipeline runs on the same output at once: the second refuses, the first's output is whole."""

from __future__ import annotations

import fcntl
import os

import pytest

from pipeline.__main__ import main
from pipeline.manifest import files_intact, read
from tests.pipeline.conftest import write_text

CSV = "user,item,ts\n" + "".join(f"u{u},i{(u * 7 + t) % 13},{t}\n" for u in range(20) for t in range(6))


def args(src, out):
    return ["--input", str(src), "--format", "csv", "--user-col", "user", "--item-col", "item", "--time-col", "ts",
            "--out", str(out), "--num-shards", "2"]


def test_second_run_on_a_locked_output_refuses_and_touches_nothing(tmp_path, capsys):
    src = write_text(tmp_path / "events.csv", CSV)
    out = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    with open(lock, "a+") as held:  # what a running `python -m pipeline` holds
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        assert main(args(src, out)) == 2
    err = capsys.readouterr().err
    assert f"output {out} is being written by another pipeline run (pid 4242" in err and "--out" in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_lock_is_released_and_removed_after_a_run(tmp_path):
    src = write_text(tmp_path / "events.csv", CSV)
    out = tmp_path / "out"
    assert main(args(src, out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv", "out"]
    assert files_intact(read(out), out)
    assert main(args(src, out) + ["--overwrite"]) == 0  # not left locked


@pytest.mark.skipif(not hasattr(os, "fork"), reason="posix")
def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path):
    src = write_text(tmp_path / "events.csv", CSV)
    (tmp_path / ".out.lock").write_text("999999")  # the file stays after kill -9; the flock does not
    assert main(args(src, tmp_path / "out")) == 0


def test_overwriting_an_output_that_is_a_symlink_replaces_the_link_and_keeps_its_target(tmp_path):
    # a worktree that links data/processed/<name> to another checkout's copy, then rebuilds it
    src = write_text(tmp_path / "events.csv", CSV)
    elsewhere = tmp_path / "elsewhere"
    assert main(args(src, elsewhere)) == 0
    out = tmp_path / "out"
    out.symlink_to(elsewhere, target_is_directory=True)
    newer = write_text(tmp_path / "newer.csv", CSV + "u0,i1,99\n")  # other inputs: a rebuild, not 'up to date'
    assert main(args(newer, out) + ["--overwrite"]) == 0
    assert out.is_dir() and not out.is_symlink() and files_intact(read(out), out)
    assert files_intact(read(elsewhere), elsewhere)  # the link's target is untouched
    assert not list(tmp_path.glob(".out.old-*"))
