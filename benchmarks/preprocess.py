"""Polars pipeline vs a plain pandas implementation of the same steps, side by side.

    python -m benchmarks.preprocess                 # ML-1M x10 and 20M SinkBench events
    python -m benchmarks.preprocess --scale 100M    # also 100M SinkBench events (Polars only)

Each run is its own subprocess; wall time is measured around it and peak RSS is the child's
ru_maxrss from os.wait4. Polars and pandas run alternately `--repeat` times (default 3); the table
shows the fastest wall time and the largest peak RSS of each. Both implementations read the same input file and must produce the same
counts. Results: a table on stdout and bench_results/preprocess.json.
Goals: Polars >= 5x faster and <= 0.5x peak memory than pandas; 100M events within 8 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from pipeline import datasets
from pipeline.synth import SynthConfig, generate

WORK = Path("data/bench")  # inputs and outputs (git-ignored)
RESULTS = Path("bench_results/preprocess.json")
KCORE = ["--min-user-interactions", "5", "--min-item-interactions", "5"]  # exercise every step


@dataclass
class Case:
    name: str
    input: Path
    format: str
    flags: list[str] = field(default_factory=list)  # shared by both implementations
    pandas: bool = True


def ml1m_replicated(copies: int) -> Case:
    """ML-1M concatenated `copies` times with disjoint user ids: a headerless TSV like the original."""
    path = WORK / f"ml-1m-x{copies}.tsv"
    if not path.exists():
        files = datasets.ensure("ml-1m")
        cols = ["user_id", "item_id", "rating", "timestamp"]
        one = pl.concat([pl.read_csv(f, separator="\t", has_header=False, new_columns=cols) for f in files])
        reps = [one.with_columns(pl.col("user_id") + c * 1_000_000) for c in range(copies)]
        path.parent.mkdir(parents=True, exist_ok=True)
        pl.concat(reps).write_csv(path, separator="\t", include_header=False)
    return Case(f"ml-1m x{copies} ({copies}M events, TSV)", path, "movielens", KCORE)


def sinkbench(events_m: int, pandas: bool, num_shards: int = 4) -> Case:
    users = round(events_m * 1_000_000 / 272)  # mean length is ~272 with the defaults
    path = WORK / f"sinkbench-{events_m}M.parquet"
    if not path.exists():
        generate(SynthConfig(users=users, items=50_000, seed=0), path, log=lambda _: None)
    return Case(f"sinkbench {events_m}M (Parquet, {num_shards} shards)", path, "parquet",
                ["--event-features", "kind", "--num-shards", str(num_shards), *KCORE], pandas)


def measure(cmd: list[str]) -> dict:
    """Run cmd; return wall seconds, the child's peak RSS (GiB) and its stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-2000:]}")
    return {"seconds": round(wall, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3), "stdout": stdout}


def run_case(case: Case, repeat: int) -> dict:
    """Polars and pandas alternately, `repeat` times: the fastest wall time and the largest peak RSS
    of each (the machine may be shared; the minimum is the least disturbed run)."""
    common = ["--input", str(case.input), "--format", case.format, *case.flags]
    out = WORK / "out"
    impls = {"polars": [sys.executable, "-m", "pipeline", *common, "--overwrite", "--out", str(out / "polars")]}
    if case.pandas:
        impls["pandas"] = [sys.executable, "-m", "benchmarks.preprocess_pandas", *common, "--out", str(out / "pandas")]
    runs: dict[str, list[dict]] = {name: [] for name in impls}
    shutil.rmtree(out, ignore_errors=True)
    for _ in range(repeat):
        for name, cmd in impls.items():
            shutil.rmtree(out / name, ignore_errors=True)
            runs[name].append(measure(cmd))
    counts = json.loads((out / "polars" / "manifest.json").read_text())["counts"]
    row: dict = {"case": case.name, "counts": counts, "repeats": repeat}
    for name, results in runs.items():
        row[name] = {"seconds": min(r["seconds"] for r in results),
                     "cpu_seconds": min(r["cpu_seconds"] for r in results),
                     "peak_rss_gib": max(r["peak_rss_gib"] for r in results),
                     "all_seconds": [r["seconds"] for r in results]}
    if case.pandas:
        pandas_counts = json.loads(runs["pandas"][-1]["stdout"].strip().splitlines()[-1])
        if pandas_counts != counts:
            raise RuntimeError(f"{case.name}: pandas counts {pandas_counts} != polars {counts}")
        row["speedup"] = round(row["pandas"]["seconds"] / row["polars"]["seconds"], 2)
        row["memory_ratio"] = round(row["polars"]["peak_rss_gib"] / row["pandas"]["peak_rss_gib"], 3)
    shutil.rmtree(out, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    """Wall seconds (fastest run), CPU seconds (user + system) and peak RSS per implementation."""
    head = (f"{'case':<36} {'events out':>12} | {'polars s':>8} {'cpu s':>6} {'GiB':>5} | {'pandas s':>8} "
            f"{'cpu s':>6} {'GiB':>5} | {'speedup':>7} {'mem':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        p, q = r["polars"], r.get("pandas")
        pandas_cols = (f"{q['seconds']:>8.1f} {q['cpu_seconds']:>6.1f} {q['peak_rss_gib']:>5.2f} | "
                       f"{r['speedup']:>6.1f}x {r['memory_ratio']:>5.2f}x"
                       if q else f"{'-':>8} {'-':>6} {'-':>5} | {'-':>7} {'-':>6}")
        lines.append(f"{r['case']:<36} {r['counts']['events']:>12,} | {p['seconds']:>8.1f} {p['cpu_seconds']:>6.1f} "
                     f"{p['peak_rss_gib']:>5.2f} | " + pandas_cols)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["20M", "100M"], default="20M",
                        help="largest SinkBench case; 100M runs Polars only (pandas would need >30 GiB)")
    parser.add_argument("--ml1m-copies", type=int, default=10)
    parser.add_argument("--only", choices=["ml1m", "sinkbench"], help="run one family of cases")
    parser.add_argument("--repeat", type=int, default=3, help="runs per implementation and case (100M: 1)")
    args = parser.parse_args(argv)

    cases = []
    if args.only != "sinkbench":
        cases.append(ml1m_replicated(args.ml1m_copies))
    if args.only != "ml1m":
        cases.append(sinkbench(20, pandas=True))
        if args.scale == "100M":
            cases.append(sinkbench(100, pandas=False, num_shards=16))  # ~6M events per shard in memory
    rows = []
    for case in cases:
        print(f"[bench] {case.name} ...", flush=True)
        rows.append(run_case(case, 1 if "100M" in case.name else args.repeat))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                               "polars": pl.__version__, "loadavg_at_end": os.getloadavg()},
                                   "goals": {"speedup": 5.0, "memory_ratio": 0.5, "peak_rss_gib_100M": 8.0},
                                   "results": rows}, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
