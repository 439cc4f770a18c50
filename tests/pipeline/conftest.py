"""Helpers shared by the pipeline tests: write tiny raw logs and run the CLI in-process."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipeline.__main__ import main


def write_text(path: Path, text: str, newline: str = "\n") -> Path:
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return path


@pytest.fixture
def cli(capsys):
    """cli(*args) -> (exit code, stdout, stderr) of `python -m pipeline *args`."""
    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


def read_shards(out: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((out / "shards").glob("part-*.parquet"))).sort("user_idx")
