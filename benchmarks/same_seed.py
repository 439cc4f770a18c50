"""Same seed, two commits: does a refactor move a number? (`make bench-same-seed BASE=<rev>`)

Checks out BASE into a temporary git worktree, runs the same short `python -m sinkrec fit` there and
in this checkout (one after the other, one thread each, so the float reductions run in the same
order), and compares every test metric of the two runs (both ranking conventions). A refactor that
only moves code must give equal numbers; anything else is printed with both values.

    python -m benchmarks.same_seed --base 56427c6                  # SinkRec, GDN, SASRec on ML-100K
    python -m benchmarks.same_seed --base HEAD~3 --archs gdn --epochs 2
    python -m benchmarks.same_seed --base fb3b89f^ --head 0d70416   # two commits, neither this checkout

The run is conf/train/smoke.yaml (ML-100K, a small model) with the per-step delta-rule reference
and the reference gates (`kernel_backend=recurrent`, `gate_backend=reference`), so a change in a
fast path's numerics (e.g. the chunk size) does not count as a refactor moving numbers; set
--backend chunk to compare the default path too. The data is built once, in this checkout, and
the base reads the same directory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = "data/processed/ml-100k"


def fit(tree: Path, arch: str, epochs: int, backend: str, work: Path) -> dict[str, float]:
    """One smoke fit in `tree`; its test metrics (metrics_test.json)."""
    out = work / arch
    cmd = [sys.executable, "-m", "sinkrec", "fit", "--config", "conf/train/smoke.yaml",
           f"--model.config.arch={arch}", f"--model.config.kernel_backend={backend}",
           "--model.config.gate_backend=reference", f"--trainer.max_epochs={epochs}",
           f"--trainer.default_root_dir={out}", f"--checkpoint.dirpath={out}/ckpt",
           f"--data.root={ROOT / DATA}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree),
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{tree} ({arch}): fit failed with exit {res.returncode}:\n{res.stderr[-3000:]}")
    return json.loads((out / "metrics_test.json").read_text())["metrics"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the commit to compare this checkout with")
    ap.add_argument("--head", default=None, help="compare BASE with this commit instead of this checkout")
    ap.add_argument("--archs", nargs="+", default=["sinkrec", "gdn", "sasrec"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--backend", default="recurrent", help="model.config.kernel_backend of both runs")
    args = ap.parse_args(argv)
    subprocess.run([sys.executable, "-c", f"from pipeline.prepare import prepare; prepare({DATA!r})"],
                   cwd=ROOT, check=True)
    moved = 0
    with tempfile.TemporaryDirectory(prefix="same-seed-") as tmp:
        trees = {"base": args.base, **({"head": args.head} if args.head else {})}
        for name, rev in trees.items():
            subprocess.run(["git", "worktree", "add", "--detach", str(Path(tmp) / name), rev], cwd=ROOT, check=True,
                           capture_output=True)
        base, head = Path(tmp) / "base", (Path(tmp) / "head" if args.head else ROOT)
        try:
            for arch in args.archs:
                old = fit(base, arch, args.epochs, args.backend, Path(tmp) / "runs-base")
                new = fit(head, arch, args.epochs, args.backend, Path(tmp) / "runs-here")
                diff = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
                        if old.get(k) != new.get(k)}
                moved += bool(diff)
                ndcg = new.get("test/ndcg_10")
                print(f"{arch}: {len(new)} test metrics, test/ndcg_10 {ndcg}: "
                      + ("equal" if not diff else f"{len(diff)} differ"))
                for k, (a, b) in diff.items():
                    print(f"    {k}: base {a}  here {b}")
        finally:
            for name in trees:
                subprocess.run(["git", "worktree", "remove", "--force", str(Path(tmp) / name)], cwd=ROOT, check=False)
    print("same numbers" if not moved else f"{moved} of {len(args.archs)} archs moved")
    return 1 if moved else 0


if __name__ == "__main__":
    raise SystemExit(main())
