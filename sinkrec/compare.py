"""`python -m sinkrec.compare --configs A.yaml B.yaml --seeds 1 2 [--name ml1m] [-- fit overrides]`.

Trains each (config, seed) one after another with `python -m sinkrec fit` under the same overrides,
then writes ONE table: test metrics under both ranking conventions (`test/` keeps the user's history
as candidates; `test_seen_excluded/` removes it, as HSTU, SASRec+ and eSASRec do), epochs trained, wall time,
training events/s and peak RSS of the training process. In MLflow the comparison is a parent run
with one child run per training (`mlflow.parentRunId`); the table is also kept as a file under
`--out` (default docs/results/) with the command, the machine and the date, because an MLflow
store does not travel between machines.

`make compare [CONFIGS="..."] [SEEDS="..."] [ARGS="..."]` is the front door.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from sinkrec.hardware import machine


def dataset_name(config: Path) -> str:
    """The experiment a config's runs land in: its dataset's manifest name (as `sinkrec fit` picks it).

    data.root is read from the config as the CLI resolves it (a config may include a base with
    `config:`), and prepared as training would (fetched and preprocessed if a shipped config writes it)."""
    from pipeline.prepare import prepare

    res = subprocess.run([sys.executable, "-m", "sinkrec", "fit", "--config", str(config), "--print_config"],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{config}: {res.stderr.strip()[-1000:]}")
    root = Path((yaml.safe_load(res.stdout) or {}).get("data", {}).get("root") or "")
    prepare(root)
    manifest = root / "manifest.json"
    if not manifest.exists():
        raise SystemExit(f"{config}: {manifest} is missing and {root} is not a shipped dataset (no "
                         f"conf/pipeline/{root.name}.yaml writes it); build it with "
                         f"`python -m pipeline --config <your pipeline yaml> --out {root}`")
    return str(json.loads(manifest.read_text())["name"])


def run_one(config: Path, seed: int, tag: str, parent: str, experiment: str, uri: str, extra: list[str],
            work: Path) -> dict:
    """One `sinkrec fit` in a child process; returns its metrics, wall time and peak RSS."""
    out = work / tag
    cmd = [sys.executable, "-m", "sinkrec", "fit", "--config", str(config), "--seed_everything", str(seed),
           "--data.seed", str(seed), "--mlflow.tracking_uri", uri, "--mlflow.experiment", experiment, "--mlflow.run_name", tag,
           "--mlflow.parent_run_id", parent, "--trainer.default_root_dir", str(out),
           "--checkpoint.dirpath", str(out / "checkpoints"), *extra]
    print(f"[compare] {tag}: {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    row = {"tag": tag, "config": str(config), "seed": seed, "wall_s": wall, "rc": rc,
           "peak_rss_gib": usage.ru_maxrss / 2**20}  # Linux reports KiB
    metrics_file = out / "metrics_test.json"
    if rc != 0 or not metrics_file.exists():
        print(f"[compare] {tag} FAILED (exit {rc}); its row is marked failed", flush=True)
        return row
    final = json.loads(metrics_file.read_text())
    row.update(run_id=final["run_id"], metrics=final["metrics"])
    return row


def add_training_stats(rows: list[dict], uri: str) -> None:
    """Epochs trained and mean epoch throughput, read back from each child run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for row in rows:
        if not row.get("run_id"):
            continue
        seconds = client.get_metric_history(row["run_id"], "train/epoch_seconds")
        rate = client.get_metric_history(row["run_id"], "train/epoch_events_per_s")
        row["epochs"] = len(seconds)
        row["events_per_s"] = statistics.fmean(m.value for m in rate) if rate else float("nan")
        row["train_s"] = sum(m.value for m in seconds)
        # the validation curves, so a later run (on another machine, another store) can be compared epoch by epoch
        row["val_curves"] = {name: [m.value for m in sorted(client.get_metric_history(row["run_id"], name),
                                                            key=lambda m: m.step)]
                             for name in VAL_CURVES}


VAL_CURVES = ("val_seen_excluded/ndcg_10", "val/ndcg_10")
COLUMNS = [("test/ndcg_10", "NDCG@10"), ("test/hr_10", "HR@10"), ("test/mrr", "MRR"),
           ("test_seen_excluded/ndcg_10", "NDCG@10 (seen excl.)"), ("test_seen_excluded/hr_10", "HR@10 (seen excl.)")]


def table(rows: list[dict]) -> str:
    head = ["run", "seed", "epochs", "wall min", "events/s", "peak RSS GiB", *(c for _, c in COLUMNS), "MLflow run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r.get("metrics")
        cells = [r["tag"], str(r["seed"]), str(r.get("epochs", "-")), f"{r['wall_s'] / 60:.1f}",
                 f"{r.get('events_per_s', float('nan')):,.0f}", f"{r['peak_rss_gib']:.2f}"]
        cells += [f"{m[k]:.4f}" if m and k in m else ("FAILED" if not m else "-") for k, _ in COLUMNS]
        cells.append(f"`{r['run_id'][:8]}`" if r.get("run_id") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    by_config: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("metrics"):
            by_config.setdefault(r["config"], []).append(r)
    multi = {c: rs for c, rs in by_config.items() if len(rs) > 1}
    if multi:
        lines += ["", "Mean ± std over seeds (sample std):", "",
                  "| config | seeds | " + " | ".join(c for _, c in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
        for c, rs in multi.items():
            stats = [f"{statistics.fmean(r['metrics'][k] for r in rs):.4f} ± "
                     f"{statistics.stdev(r['metrics'][k] for r in rs):.4f}" for k, _ in COLUMNS]
            lines.append(f"| {Path(c).stem} | {len(rs)} | " + " | ".join(stats) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m sinkrec.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", type=Path, required=True, help="training YAMLs, trained in this order")
    p.add_argument("--seeds", nargs="+", type=int, default=[1234], help="every config runs once per seed")
    p.add_argument("--name", default="compare", help="names the table file and the parent MLflow run")
    p.add_argument("--out", type=Path, default=Path("docs/results"), help="where the markdown/JSON table goes")
    p.add_argument("--work", type=Path, default=Path("outputs/compare"), help="per-run outputs and checkpoints")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    args = p.parse_args(argv)
    for c in args.configs:
        if not c.exists():
            raise SystemExit(f"--configs: {c} does not exist (configs live in conf/train/)")
    experiments = {dataset_name(c) for c in args.configs}
    if len(experiments) != 1:
        raise SystemExit(f"--configs read different datasets {sorted(experiments)}; compare one dataset at a time")
    experiment = experiments.pop()

    import mlflow

    from sinkrec.cli import ensure_experiment, tracking_uri

    uri = tracking_uri(args.tracking_uri)
    mlflow.set_tracking_uri(uri)
    ensure_experiment(uri, experiment)
    mlflow.set_experiment(experiment)
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M")
    command = shlex.join(["python", "-m", "sinkrec.compare", *argv, *(["--", *extra] if extra else [])])
    work = args.work / f"{args.name}-{stamp}"
    rows = []
    with mlflow.start_run(run_name=f"compare-{args.name}") as parent:
        mlflow.set_tags({"compare.configs": " ".join(map(str, args.configs)),
                         "compare.seeds": " ".join(map(str, args.seeds)), "compare.overrides": shlex.join(extra)})
        for config in args.configs:
            for seed in args.seeds:
                tag = f"{config.stem}-s{seed}"
                rows.append(run_one(config, seed, tag, parent.info.run_id, experiment, uri, extra, work))
        add_training_stats(rows, uri)
        md = "\n".join([
            f"# {args.name}: {experiment}, {len(args.configs)} config(s) x {len(args.seeds)} seed(s)", "",
            f"- command: `{command}`",
            f"- date: {dt.datetime.now().isoformat(timespec='minutes')}",
            f"- machine: {machine()}",
            f"- torch {__import__('torch').__version__}, threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
            f"- MLflow parent run: `{parent.info.run_id}` (experiment `{experiment}`, store `{uri}`)",
            "- `test/` keeps history items as candidates; `seen excl.` removes them, the protocol of HSTU,",
            "  SASRec+ and eSASRec (compare published numbers with those columns).",
            "  Runs were selected on validation only (checkpoint.monitor); the test split was read once per run.", "",
            table(rows), ""])
        mlflow.log_text(md, "compare.md")
        mlflow.log_dict({"rows": rows, "command": command}, "compare.json")
        for r in rows:
            if r.get("metrics"):
                mlflow.log_metric(f"{r['tag']}/test_ndcg_10", r["metrics"]["test/ndcg_10"])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}-{stamp}.md"
    path.write_text(md)
    path.with_suffix(".json").write_text(json.dumps({"rows": rows, "command": command}, indent=2))
    print(md)
    print(f"[compare] wrote {path}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
