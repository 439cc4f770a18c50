"""pipeline.prepare: a shipped root is built (raw data fetched first), then found up to date; a run
that holds the output's lock is waited for, not refused; any other root is left alone."""

from __future__ import annotations

import fcntl
import threading
import time

from pipeline.manifest import read
from pipeline.prepare import prepare
from tests.pipeline.conftest import write_text

CSV = "user,item,ts\n" + "".join(f"u{u},i{(u * 7 + t) % 13},{t}\n" for u in range(20) for t in range(6))


def shipped(tmp_path):
    src = write_text(tmp_path / "events.csv", CSV)
    root = tmp_path / "processed" / "demo"
    conf = tmp_path / "conf"
    conf.mkdir()
    write_text(conf / "demo.yaml", f"input: {src}\nuser_col: user\nitem_col: item\ntime_col: ts\n"
                                   f"num_shards: 2\nout: {root}\n")
    return root, conf


def test_builds_a_shipped_root_then_finds_it_up_to_date(tmp_path):
    root, conf = shipped(tmp_path)
    lines: list[str] = []
    assert prepare(root, lines.append, conf) == root
    assert read(root)["counts"]["users"] == 20
    lines.clear()
    prepare(root, lines.append, conf)
    assert any("up to date" in line for line in lines)


def test_waits_for_a_run_that_holds_the_lock(tmp_path):
    root, conf = shipped(tmp_path)
    root.parent.mkdir(parents=True)
    lock = root.parent / ".demo.lock"
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)

        def release() -> None:  # what a finishing run does: remove the file, then let go
            time.sleep(0.5)
            lock.unlink()
            fcntl.flock(held, fcntl.LOCK_UN)

        t = threading.Thread(target=release)
        t.start()
        t0 = time.perf_counter()
        prepare(root, lambda _: None, conf)
        t.join()
    assert time.perf_counter() - t0 >= 0.5 and read(root) is not None and not lock.exists()


def test_leaves_other_roots_alone(tmp_path):
    _, conf = shipped(tmp_path)
    other = tmp_path / "elsewhere" / "demo"  # same name, not the shipped config's out
    assert prepare(other, lambda _: None, conf) == other and not other.exists()
    assert prepare(tmp_path / "nameless", lambda _: None, conf) == tmp_path / "nameless"
