"""Training throughput of two commits, side by side on ML-1M: did a data-path change cost speed?

    python -m benchmarks.throughput                                   # streaming (2c63fa8) vs the in-memory path before it
    python -m benchmarks.throughput --base HEAD~1 --head here --epochs 2

Checks both commits out into temporary git worktrees (`--head here` uses this checkout), builds each
one's own processed data with its own pipeline (the format may differ between commits), then runs
the same `python -m sinkrec fit` in both **at the same time**, one torch thread each, so the two
share the machine alike. Reported per tree: `train/epoch_events_per_s` of every epoch (events summed
over the epoch / its wall time, sinkrec/callbacks.py), their mean, head / base, and the test NDCG@10
of both ranking conventions. Equal seeds need not give equal metrics when the data path deals
batches in another order. Results go to bench_results/throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_fit(tree: Path, config: str, epochs: int, work: Path, extra: list[str]) -> subprocess.Popen:
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "sinkrec", "fit", "--config", config, f"--trainer.max_epochs={epochs}",
           f"--trainer.default_root_dir={work}", f"--checkpoint.dirpath={work}/ckpt", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree),
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    with open(work / "fit.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)


def read_run(work: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    if not runs:
        raise SystemExit(f"no MLflow run in {work}; see {work / 'fit.log'}")
    run = runs[0]
    rates = [m.value for m in client.get_metric_history(run.info.run_id, "train/epoch_events_per_s")]
    m = run.data.metrics
    return {"run_id": run.info.run_id, "epoch_events_per_s": rates, "mean_events_per_s": statistics.fmean(rates),
            "test/ndcg_10": m.get("test/ndcg_10"), "test_seen_excluded/ndcg_10": m.get("test_seen_excluded/ndcg_10")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="2c63fa8~1", help="the commit measured first (default: before streaming)")
    ap.add_argument("--head", default="2c63fa8", help="the commit measured beside it, or 'here' for this checkout")
    ap.add_argument("--config", default="conf/train/ml1m_sasrec.yaml")
    ap.add_argument("--pipeline-config", default="conf/pipeline/ml-1m.yaml")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default="bench_results/throughput.json")
    ap.add_argument("extra", nargs="*", help="more `sinkrec fit` overrides for both runs (after --)")
    args = ap.parse_args(argv)
    raw = ROOT / "data" / "raw"
    if not raw.exists():
        raise SystemExit(f"{raw} is missing: run `make data` first")
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        trees = {"base": args.base, "head": args.head}
        paths: dict[str, Path] = {}
        try:
            for name, rev in trees.items():
                if rev == "here":
                    paths[name] = ROOT
                    continue
                paths[name] = Path(tmp) / name
                subprocess.run(["git", "worktree", "add", "--detach", str(paths[name]), rev], cwd=ROOT, check=True,
                               capture_output=True)
                (paths[name] / "data").mkdir(exist_ok=True)
                (paths[name] / "data" / "raw").symlink_to(raw)
            for name, tree in paths.items():  # each commit reads data its own pipeline wrote
                subprocess.run([sys.executable, "-m", "pipeline", "--config", args.pipeline_config], cwd=tree,
                               env={**os.environ, "PYTHONPATH": str(tree)}, check=True, capture_output=True)
            procs = {n: start_fit(t, args.config, args.epochs, Path(tmp) / f"runs-{n}", args.extra)
                     for n, t in paths.items()}
            for name, proc in procs.items():
                if proc.wait() != 0:
                    log = (Path(tmp) / f"runs-{name}" / "fit.log").read_text()[-3000:]
                    raise SystemExit(f"{trees[name]}: fit failed with exit {proc.returncode}:\n{log}")
            res = {n: {"rev": trees[n], **read_run(Path(tmp) / f"runs-{n}")} for n in trees}
        finally:
            for name, tree in paths.items():
                if tree != ROOT:
                    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    print(f"{args.config}, {args.epochs} epochs, both at once, one thread each")
    print("| tree | commit | events/s per epoch | mean | vs base | test NDCG@10 | seen excl. |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, r in res.items():
        per = ", ".join(f"{x:,.0f}" for x in r["epoch_events_per_s"])
        ratio = r["mean_events_per_s"] / res["base"]["mean_events_per_s"]
        print(f"| {name} | {r['rev']} | {per} | {r['mean_events_per_s']:,.0f} | {ratio:.3f} | "
              f"{r['test/ndcg_10']:.4f} | {r['test_seen_excluded/ndcg_10']:.4f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
