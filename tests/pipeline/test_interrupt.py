"""A real process interrupted by SIGTERM mid-build leaves nothing; leftovers of a SIGKILLed one are
cleaned by the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import pipeline.__main__ as cli_main
from pipeline.synth import SynthConfig, generate
from tests.pipeline.conftest import write_text


def test_sigterm_mid_build_leaves_no_output(tmp_path):
    src = tmp_path / "raw.parquet"
    generate(SynthConfig(users=6000, items=2000, seed=0), src, log=lambda _: None)  # ~1.6M events
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--input", str(src), "--format", "parquet",
                             "--out", str(out), "--num-shards", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "no output written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.parquet"]


def test_sigterm_inside_a_polars_callback_still_reports_an_interrupt(monkeypatch, capsys):
    """SIGTERM while Polars' Rust code runs a Python callback: pyo3 turns the KeyboardInterrupt into a
    PanicException (a BaseException); the run must still end as interrupted (130), not crash (1)."""
    class PanicException(BaseException):  # what pyo3 raises; not importable from polars
        pass

    def run_in_rust(cfg):
        try:
            signal.raise_signal(signal.SIGTERM)  # the handler runs here, as in a Polars callback
        except KeyboardInterrupt as e:
            raise PanicException("called `Result::unwrap()` on an `Err` value: KeyboardInterrupt") from e

    def failing_run(cfg):
        raise PanicException("a real panic")

    previous = signal.getsignal(signal.SIGTERM)
    try:
        monkeypatch.setattr(cli_main, "run", run_in_rust)
        assert cli_main.main(["--input", "x.csv"]) == 130
        assert "interrupted: no output written" in capsys.readouterr().err
        monkeypatch.setattr(cli_main, "run", failing_run)  # no SIGTERM: a panic is not an interrupt
        with pytest.raises(PanicException, match="a real panic"):
            cli_main.main(["--input", "x.csv"])
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_build_dirs_of_dead_processes_are_removed(cli, tmp_path):
    src = write_text(tmp_path / "in.csv", "user_id,item_id,timestamp\nu,a,1\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is now free: a build directory named after it is stale
    stale = tmp_path / f".out.tmp-{dead.pid}"
    (stale / "shards").mkdir(parents=True)
    alive = tmp_path / f".out.tmp-{os.getpid()}x"  # not a pid suffix: left alone
    alive.mkdir()
    code, _, err = cli("--input", src, "--format", "csv", "--out", tmp_path / "out")
    assert code == 0, err
    assert not stale.exists() and alive.exists()
