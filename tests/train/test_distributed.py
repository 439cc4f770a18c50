"""Multi-process runs (torchrun, gloo, CPU): two "nodes" on 127.0.0.1, and DeepSpeed ZeRO-2 vs DDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sinkrec.cli import main
from tests.train.test_cli import write_config

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(args: list[str], nnodes: int = 2) -> None:
    """Start `jobs/torchrun.sh <args>` once per node rank (one process each); fail with their output."""
    port = free_port()
    procs = []
    for rank in range(nnodes):
        env = {**os.environ, "NNODES": str(nnodes), "NPROC": "1", "NODE_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHON": sys.executable,
               "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen(["bash", str(ROOT / "jobs" / "torchrun.sh"), *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            tails = "\n".join(f"--- node {r}:\n{q.communicate()[0][-3000:]}" for r, q in enumerate(procs))
            pytest.fail(f"torchrun timed out after {TIMEOUT}s: {args}\n{tails}")
        outputs.append(out)
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {rank} exited {p.returncode}:\n{out[-6000:]}"
        assert "terminate called" not in out, f"node {rank} aborted at exit:\n{out[-3000:]}"


@pytest.mark.dist
@pytest.mark.trains
def test_two_nodes_disjoint_users_and_same_metrics_as_one_process(tiny_kind_data, tmp_path):
    out = tmp_path / "nodes"
    cfg = write_config(tmp_path / "tiny.yaml", tiny_kind_data, out)
    # train + test on two nodes (DDP over gloo), logged to MLflow by rank 0
    run_nodes(["fit", "--config", str(cfg), "--trainer.max_epochs", "1"])
    two = json.loads((out / "metrics_test.json").read_text())
    assert two["world_size"] == 2 and two["metrics"]["test/count"] == 60
    # the same checkpoint tested by a single process: exact metrics (summed counts, not averaged averages)
    main(["test", "--config", str(cfg), "--ckpt_path", two["best_checkpoint"], "--mlflow.enabled", "false",
          "--trainer.default_root_dir", str(tmp_path / "single")])
    one = json.loads((tmp_path / "single" / "metrics_test.json").read_text())
    assert one["world_size"] == 1
    ranking = [k for k in one["metrics"] if k.split("/")[-1].split("_")[0] in ("hr", "ndcg", "mrr", "count")]
    assert len(ranking) >= 21  # all, habit and dynamic groups
    for k in ranking:
        assert two["metrics"][k] == pytest.approx(one["metrics"][k], rel=1e-12, abs=1e-12), k
    # every user is predicted exactly once, by exactly one of the two ranks
    run_nodes(["predict", "--config", str(cfg), "--ckpt_path", two["best_checkpoint"], "--mlflow.enabled", "false"])
    users = [set(pq.read_table(out / "predictions" / f"rank-{r:03d}.parquet").column("user_idx").to_pylist())
             for r in range(2)]
    assert users[0] and users[1] and not users[0] & users[1]
    assert users[0] | users[1] == set(range(60))


@pytest.mark.dist
@pytest.mark.trains
# ~40 s, plus ~45 s the first time DeepSpeed compiles its C++ ops into TORCH_EXTENSIONS_DIR
def test_deepspeed_zero2_matches_ddp_on_cpu(tiny_data, tmp_path):
    """The real model and conf/deepspeed/zero2.json through deepspeed.initialize (2 ranks, gloo)."""
    out = tmp_path / "parity.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "tests.train.distributed_parity", "--data", str(tiny_data),
           "--deepspeed-config", str(ROOT / "conf" / "deepspeed" / "zero2.json"), "--steps", "4", "--out", str(out)]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"parity run timed out:\n{(e.stdout or '')[-3000:]}")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    ranks = json.loads(out.read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["zero_stage"] == 2 for r in ranks)
    seen = [{u for batch in r["users"] for u in batch} for r in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # each rank trains on its own users
    for r in ranks:
        assert r["ddp"][0] != r["ddp"][-1]  # the optimizer moved the weights
        assert r["deepspeed"] == pytest.approx(r["ddp"], rel=1e-5), r
