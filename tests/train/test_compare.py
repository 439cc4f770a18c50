"""`python -m sinkrec.compare`: trains every (config, seed) through the real CLI, one table, nested MLflow runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from test_cli import write_config

ROOT = Path(__file__).resolve().parents[2]


def test_compare_trains_each_config_and_seed_into_one_table_and_nested_runs(tiny_data, tmp_path):
    configs = []
    for arch in ("sasrec",):  # one cheap config x two seeds: nesting and the seed table, in ~1 min
        path = write_config(tmp_path / f"tiny_{arch}.yaml", tiny_data, tmp_path / arch, arch=arch,
                            trainer={"max_epochs": 1})
        cfg = yaml.safe_load(path.read_text())
        cfg.pop("mlflow")  # compare decides the store for every child
        path.write_text(yaml.safe_dump(cfg))
        configs.append(str(path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "sinkrec.compare", "--configs", *configs, "--seeds", "1", "2", "--name", "t",
           "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work"), "--tracking-uri", uri,
           "--", "--mlflow.log_checkpoint", "false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    (md,) = (tmp_path / "results").glob("t-*.md")
    text = md.read_text()
    for tag in ("tiny_sasrec-s1", "tiny_sasrec-s2"):
        assert f"| {tag} |" in text
    assert "Mean ± std over seeds" in text and "- machine: " in text and "- command: " in text
    rows = json.loads(md.with_suffix(".json").read_text())["rows"]
    assert [r["epochs"] for r in rows] == [1, 1] and all(r["peak_rss_gib"] > 0.05 for r in rows)
    assert all(len(r["val_curves"]["val_seen_excluded/ndcg_10"]) == 1 for r in rows)  # one epoch, one value
    assert all("test_seen_excluded/ndcg_10" in r["metrics"] for r in rows)

    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "compare-t"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["tiny_sasrec-s1", "tiny_sasrec-s2"]
    assert {r.info.run_id for r in children} == {r["run_id"] for r in rows}
