"""`python -m pipeline --config conf/pipeline/<name>.yaml [--any-config-key VALUE ...]` (pipeline/cli.py)"""

from __future__ import annotations

import signal
import sys

from pipeline.config import load
from pipeline.errors import PipelineError
from pipeline.run import run

_terminated = False


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (e.g. a cancelled job) unwinds like Ctrl-C, so the hidden build directory is removed.

    The KeyboardInterrupt can be raised inside a Python callback that Polars' Rust code is calling;
    it then reaches `main` as a pyo3 PanicException or a Polars error instead (1 run in ~12 here,
    `tests/pipeline/test_interrupt.py`), so `main` recognises an interrupted run by this flag."""
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    global _terminated
    _terminated = False
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(load(argv))
    except BaseException as e:  # re-raised below unless it is the interrupt or a PipelineError
        if isinstance(e, KeyboardInterrupt) or _terminated:
            print("interrupted: no output written", file=sys.stderr)
            return 130
        if isinstance(e, PipelineError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
