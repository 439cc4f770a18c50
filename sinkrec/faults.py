"""What the trainer does when the world goes wrong: preemption, a dead rank, an unreachable MLflow store.

* `Preemption` (callback): SIGTERM (SLURM / Kubernetes before they kill a job, torchrun forwarding it)
  only sets a flag. At the next training-step boundary every rank sees it (one all-reduce per step
  when world > 1), the checkpoint `<checkpoint.dirpath>/last.ckpt` is written (rank 0 writes, all ranks
  take part), and `Preempted` is raised: the MLflow run ends KILLED and `python -m sinkrec` exits 143.
  `--ckpt_path last` continues from that step. Outside fit (test, predict) SIGTERM stops at once.
* `RankWatch` (callback, world > 1): every rank writes its step to the process group's store; when a
  collective fails (a rank died or hangs past `--dist_timeout_s`), the error names the rank(s) that
  stopped and the step they reached.
* `check_tracking_store`: before training, the MLflow store must answer within seconds (server: HTTP
  health check; sqlite: a write lock can be taken), else a `UserError` naming the URI. Failing early
  was chosen over training on without MLflow: a run whose metrics went nowhere is easy to miss.
"""

from __future__ import annotations

import datetime
import signal
import sqlite3
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sinkrec.errors import UserError

PREEMPTED_EXIT = 143  # 128 + SIGTERM, what a shell reports for a job ended by SIGTERM


class Preempted(Exception):
    """Raised on every rank at a step boundary after SIGTERM, once the checkpoint is written."""


class KillableMLFlowLogger(MLFlowLogger):
    """MLFlowLogger whose run ends KILLED after a preemption (Lightning would mark it FAILED)."""

    killed = False

    def finalize(self, status: str = "success") -> None:
        super().finalize("KILLED" if self.killed else status)


class Preemption(Callback):
    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.path = str(Path(dirpath) / filename)
        self.requested = False
        self._fitting = False
        self._previous: Any = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.requested = True
        if not self._fitting:  # test / predict: nothing to save, stop now
            raise Preempted("SIGTERM outside training")

    def _install(self, fitting: bool) -> None:
        # replaces Lightning's handler (registered just before these hooks), whose broadcast inside the
        # signal handler can pair with another collective; Lightning restores the original at teardown
        self._fitting = fitting
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(fitting=True)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(fitting=False)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(fitting=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _any_rank(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        if trainer.world_size == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=pl_module.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._any_rank(trainer, pl_module):
            return
        trainer.save_checkpoint(self.path)
        raise Preempted(f"SIGTERM: stopped at step {trainer.global_step} (epoch {trainer.current_epoch}), "
                        f"checkpoint {self.path}; resume with --ckpt_path last")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (Preempted, SIGTERMException)):  # (Lightning's: SIGTERM before training began)
            for logger in trainer.loggers:
                if isinstance(logger, KillableMLFlowLogger):
                    logger.killed = True


class RngState(Callback):
    """Keeps torch's random state (CPU and CUDA) in every checkpoint and restores it on resume, so a
    resumed run draws the same dropout masks and RVQ samples as one that was never interrupted
    (Lightning checkpoints no RNG state). Tensors only: the checkpoint still loads weights-only.

    Restored when the checkpoint is loaded, and, for a mid-epoch checkpoint (a preemption), once more
    at the first resumed batch: creating the training loader's iterator draws a seed from the global
    generator, which the interrupted run did at the start of the epoch, before the checkpoint."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state
        self._apply(state)

    @staticmethod
    def _apply(state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is not None:
            if batch_idx > 0:  # resumed inside an epoch
                self._apply(self._pending)
            self._pending = None


class RankWatch(Callback):
    """Names the rank that died or hangs when a collective fails (see the module docstring)."""

    KEY = "sinkrec/step/{}"
    NOTE = "a collective failed or timed out"

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s

    @staticmethod
    def _store():
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return dist.distributed_c10d._get_default_store()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        store = self._store()
        if store is not None and trainer.world_size > 1:
            store.set(self.KEY.format(trainer.global_rank), str(trainer.global_step))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        store = self._store()
        if store is None or trainer.world_size == 1 or not isinstance(exception, (RuntimeError, dist.DistError)):
            return
        try:
            store.set_timeout(datetime.timedelta(seconds=5))
            steps = {r: int(store.get(self.KEY.format(r))) if store.check([self.KEY.format(r)]) else -1
                     for r in range(trainer.world_size)}
        except Exception:  # noqa: BLE001 (the store may be gone with the rank that hosted it)
            exception.add_note(f"rank {trainer.global_rank}: {self.NOTE} (dist_timeout_s="
                               f"{self.timeout_s:g}); the ranks' progress could not be read")
            return
        ahead = max(steps.values())
        behind = [r for r, s in steps.items() if s < ahead]
        who = (f"rank(s) {', '.join(map(str, behind))} stopped (last step "
               f"{', '.join(str(steps[r]) for r in behind)}; the others reached step {ahead})"
               if behind else f"all ranks reached step {ahead}; a peer died or hung inside that step")
        exception.add_note(f"rank {trainer.global_rank}: {self.NOTE} (dist_timeout_s="
                           f"{self.timeout_s:g}): {who}. Look at that rank's log (killed, out of memory, hung "
                           "node); resume with --ckpt_path last")


def check_tracking_store(uri: str, timeout_s: float = 5.0) -> None:
    """Raise a UserError naming `uri` unless the MLflow store answers within about `timeout_s`."""
    fix = ("start the server / free the store, point --mlflow.tracking_uri (or MLFLOW_TRACKING_URI) at a "
           "reachable store, or pass --mlflow.enabled false to train without MLflow")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
                r.read(64)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"MLflow tracking store {uri} is unreachable ({reason}); nothing was trained. "
                            f"Either {fix}") from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"MLflow tracking store {uri}: cannot create folder {path.parent} ({e}); {fix}") from None
        try:
            con = sqlite3.connect(path, timeout=timeout_s)
            try:
                con.execute("BEGIN IMMEDIATE")  # waits up to timeout_s for another writer, then fails
                con.rollback()
            finally:
                con.close()
        except sqlite3.Error as e:
            raise UserError(f"MLflow tracking store {uri} cannot be written ({e}; waited {timeout_s:g} s): "
                            f"another process holds it locked, or the file is not a database. Either {fix}") \
                from None
