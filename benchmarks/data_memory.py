"""Peak RSS per training rank vs dataset size: does a rank hold only its share? (`make bench-data`)

    python -m benchmarks.data_memory --events 10000000 100000000 [--baseline /path/to/old/checkout]

For each size: a SinkBench log with that many events (`pipeline.synth`, users = events / 272), the
normal pipeline (16 shards), then 2-rank DDP training on CPU (`python -m sinkrec fit ... --trainer.devices
2`, 20 steps + 2 validation batches, no test, no MLflow) while the process tree is sampled every
0.2 s for each rank's resident memory. `--windows 0 128` trains each size once in one pass (0) and
once window by window (`--model.window 128`: activations of one 32 x 128 window at a time,
sinkrec/windows.py), so the data path's share and the activations' share of the peak are told apart.
`--baseline` runs the same command in another checkout (e.g. a `git worktree` of the commit before
streaming, which loaded every shard on every rank), in the same run, so the two columns compare like
for like. Results go to bench_results/data_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MEAN_LEN = 272  # events per user of SinkBench's default length distribution (pipeline.synth)


def prepare(events: int, root: Path) -> Path:
    users = max(100, events // MEAN_LEN)
    raw = root / "raw" / f"sinkbench-{events}" / "events.parquet"
    out = root / "processed" / f"sinkbench-{events}"
    if not (out / "manifest.json").exists():
        if not raw.exists():
            subprocess.run([sys.executable, "-m", "pipeline.synth", "--users", str(users), "--items", "2000",
                            "--seed", "0", "--out", str(raw)], check=True)
        subprocess.run([sys.executable, "-m", "pipeline", "--config", "conf/pipeline/sinkbench.yaml",
                        "--input", str(raw), "--out", str(out), "--name", out.name, "--num-shards", "16",
                        "--overwrite"], check=True)
    return out.resolve()


def tree_rss(pid: int) -> dict[int, int]:
    """{pid: RSS bytes} of pid and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[p] = int(line.split()[1]) * 1024
        except OSError:
            pass
        todo += children.get(p, [])
    return out


def train_peak(data: Path, cwd: Path, python: str, window: int = 0) -> dict:
    """Peak RSS of each training rank (the two largest processes of the tree) and the wall time.
    window > 0: train window by window (model.window), else in one pass over each batch."""
    cmd = [python, "-m", "sinkrec", "fit", "--config", "conf/train/sinkbench.yaml", "--data.root", str(data),
           "--trainer.devices", "2", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "20",
           "--trainer.limit_val_batches", "2", "--test_after_fit", "false", "--mlflow.enabled", "false",
           "--model.evaluation.diagnostics", "false", "--trainer.enable_progress_bar", "false",
           "--trainer.default_root_dir", "/tmp/bench_data_memory", "--checkpoint.dirpath", "/tmp/bench_data_memory/ck"]
    if window:
        cmd += ["--model.window", str(window)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(cwd)})
    peak: dict[int, int] = {}
    while proc.poll() is None:
        for p, rss in tree_rss(proc.pid).items():
            peak[p] = max(peak.get(p, 0), rss)
        time.sleep(0.2)
    err = proc.stderr.read()
    ranks = sorted(peak.values(), reverse=True)[:2]
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "rank_peak_gib": [r / 2**30 for r in ranks],
            "stderr_tail": err[-1500:] if proc.returncode else ""}


def import_floor(python: str) -> float:
    """Peak RSS (GiB) of a process that only imports the trainer (torch, Lightning, MLflow, ...): the part
    of every rank's peak that neither data nor activations cause."""
    code = "import resource, sinkrec.cli; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) * 1024 / 2**30


def column(window: int) -> str:
    return f"streaming, window {window}" if window else "streaming"


def cell(row: dict, key: str) -> str:
    if key not in row:
        return "-"
    return "FAILED" if row[key]["rc"] else " / ".join(f"{x:.2f}" for x in row[key]["rank_peak_gib"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, nargs="+", default=[10_000_000, 100_000_000])
    p.add_argument("--data", type=Path, default=Path("data/bench"), help="where the generated logs go")
    p.add_argument("--windows", type=int, nargs="+", default=[0],
                   help="model.window per training run (0 = one pass); several: side by side")
    p.add_argument("--baseline", type=Path, default=None, help="another checkout to run the same training in")
    p.add_argument("--out", type=Path, default=Path("bench_results/data_memory.json"))
    args = p.parse_args(argv)
    floor = import_floor(sys.executable)
    print(f"imports alone (python -c 'import sinkrec.cli'): peak RSS {floor:.2f} GiB", flush=True)
    rows = []
    for events in args.events:
        data = prepare(events, args.data)
        manifest = json.loads((data / "manifest.json").read_text())
        row = {"events": manifest["counts"]["events"], "users": manifest["counts"]["users"]}
        for w in args.windows:
            row[column(w)] = train_peak(data, Path.cwd(), sys.executable, w)
        if args.baseline:
            row["baseline"] = train_peak(data, args.baseline.resolve(), sys.executable)
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = [column(w) for w in args.windows] + (["baseline"] if args.baseline else [])
    print("\n| events | users | " + " | ".join(f"{c}: peak RSS per rank (GiB)" for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['events']:,} | {r['users']:,} | " + " | ".join(cell(r, c) for c in cols) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"import_floor_gib": floor, "rows": rows}, indent=2))
    return 0 if all(r[column(w)]["rc"] == 0 for r in rows for w in args.windows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
