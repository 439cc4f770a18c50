"""Fault tests' kit: callbacks injected into the real CLI (`--trainer.callbacks`) and a subprocess driver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class StepMarker(Callback):
    """Prints `[step] <global_step> rank <r>` after every training step, so a test can act on it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        print(f"[step] {trainer.global_step} rank {trainer.global_rank}", flush=True)


class RankFault(Callback):
    """At training step `step`, rank `rank` sends itself `signal` (STOP = hangs, KILL = dies)."""

    def __init__(self, rank: int = 1, step: int = 3, signal_name: str = "SIGSTOP") -> None:
        self.rank, self.step, self.signum = rank, step, getattr(signal, signal_name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


# ---------------------------------------------------------------- driving the real CLI in a subprocess

ROOT = Path(__file__).resolve().parents[2]
ML100K = ROOT / "data" / "processed" / "ml-100k"
HANG_GUARD_S = 600  # only so a broken build cannot hang the suite; no assertion is about time


def smoke_args(out: Path, *extra: str) -> list[str]:
    """`fit` on ML-100K with conf/train/smoke.yaml, everything written under `out`."""
    return ["fit", "--config", str(ROOT / "conf" / "train" / "smoke.yaml"),
            "--trainer.default_root_dir", str(out), "--checkpoint.dirpath", str(out / "ckpt"),
            "--mlflow.tracking_uri", f"sqlite:///{out / 'mlflow.db'}", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def cli(args: list[str], module: str = "sinkrec", **kw) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` to completion (stdout and stderr together in .stdout)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=HANG_GUARD_S, check=False, **kw)


def start(cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **kw)


def wait_for_line(proc: subprocess.Popen, needle: str) -> str:
    """Read the process's output until a line contains `needle` (returns all read so far)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"the process ended (rc {proc.wait()}) before printing {needle!r}:\n{''.join(seen)[-4000:]}")


def finish(proc: subprocess.Popen, so_far: str = "") -> str:
    try:
        rest, _ = proc.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
        raise AssertionError(f"still running after {HANG_GUARD_S} s:\n{(so_far + rest)[-4000:]}") from None
    return so_far + rest


def mlflow_statuses(db: Path) -> list[str]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    return [r.info.status for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]
