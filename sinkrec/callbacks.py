"""Callbacks: throughput, MLflow artifacts (config, manifest, best checkpoint, metrics, plots), predictions.

Everything that writes to MLflow runs on global rank 0 only; metric logging itself goes through
Lightning's MLFlowLogger, which is rank-0-only as well.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from sinkrec.lit_module import ranking_names

log = logging.getLogger(__name__)


def mlflow_logger(trainer: pl.Trainer) -> MLFlowLogger | None:
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            return logger
    return None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


class EventThroughput(Callback):
    """Logs training throughput in events (non-pad input positions) per second.

    `train/events_per_s` per step = this rank's rate x world size (ranks run in lock-step under DDP);
    `train/epoch_events_per_s` = events summed over all ranks / the slowest rank's epoch time (exact).
    """

    def __init__(self) -> None:
        self._t0 = 0.0
        self._epoch_t0 = 0.0
        self._epoch_events = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_t0, self._epoch_events = time.perf_counter(), 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dt = time.perf_counter() - self._t0
        events = int((batch["items"] > 0).sum())
        self._epoch_events += events
        pl_module.log("train/events_per_s", events * trainer.world_size / max(dt, 1e-9), on_step=True,
                      on_epoch=False, prog_bar=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._epoch_t0
        stats = torch.tensor([float(self._epoch_events), seconds], dtype=torch.float64, device=pl_module.device)
        events = trainer.strategy.reduce(stats[:1].clone(), reduce_op="sum")
        slowest = seconds if trainer.world_size == 1 else float(_all_max(stats[1:].clone()))
        pl_module.log("train/epoch_seconds", slowest, sync_dist=False)
        pl_module.log("train/epoch_events_per_s", float(events) / max(slowest, 1e-9), sync_dist=False)


def _all_max(t: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


class MLflowSaveConfig(SaveConfigCallback):
    """Logs the fully resolved config: every key as an MLflow param, and config.yaml as an artifact."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        logger = mlflow_logger(trainer)
        if logger is None:
            return
        import yaml

        params = flatten(self.config.clone().as_dict())
        # values linked at instantiation (model.config.num_items) are absent from the parsed config;
        # the module's hyper-parameters hold the resolved model/optim/evaluation values
        resolved = {"model": dict(pl_module.hparams)}
        params.update(flatten(resolved))
        logger.log_hyperparams(params)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(self.parser.dump(self.config, skip_none=False))
            logger.experiment.log_artifact(logger.run_id, str(path))
            path = Path(tmp) / "resolved_model.yaml"
            path.write_text(yaml.safe_dump(_plain(resolved), sort_keys=False))
            logger.experiment.log_artifact(logger.run_id, str(path))


def log_dataset_input(client, run_id: str, experiment_id: str, manifest: Path) -> None:
    """Make the run's data visible in MLflow's UI: the processed dataset as a run input (name from the
    manifest, digest = sha256 of manifest.json, which pins every shard's hash; source = the dataset
    directory), and the experiment tagged as model training (the UI's model-training view instead of
    its GenAI view) with a description."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    from pipeline.contract import sha256_of

    m = json.loads(manifest.read_text())
    dataset = MetaDataset(resolve_dataset_source(str(manifest.parent.resolve())), name=str(m["name"]),
                          digest=sha256_of(manifest)[:16])
    tags = [InputTag("mlflow.data.context", "train"),
            InputTag("events", str(m.get("counts", {}).get("events", "?"))),
            InputTag("users", str(m.get("counts", {}).get("users", "?")))]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    client.set_experiment_tag(experiment_id, "mlflow.note.content",
                              f"SinkRec pipeline runs on the processed dataset `{m['name']}` "
                              f"({m.get('counts', {}).get('events', '?')} events). One run per training; "
                              "`make compare` / `make study` runs are children of a parent run.")


class MLflowArtifacts(Callback):
    """Rank 0: data manifest, best checkpoint, final metrics JSON, learning-curve and sink plots.

    Args:
        manifest: path of the dataset's manifest.json (the CLI fills it from `data.root`).
        log_checkpoint: upload the best checkpoint to MLflow at the end of fit.
    """

    def __init__(self, manifest: str | None = None, log_checkpoint: bool = True) -> None:
        self.manifest, self.log_checkpoint = manifest, log_checkpoint
        self._manifest_logged = False

    def _log_manifest(self, trainer: pl.Trainer) -> None:
        logger = mlflow_logger(trainer)
        if logger is None or self._manifest_logged or not self.manifest or not trainer.is_global_zero:
            return
        logger.experiment.log_artifact(logger.run_id, self.manifest, "data")
        log_dataset_input(logger.experiment, logger.run_id, logger.experiment_id, Path(self.manifest))
        self._manifest_logged = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_manifest(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_manifest(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = mlflow_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if self.log_checkpoint and best:
            logger.experiment.log_artifact(logger.run_id, best, "checkpoints")
        self._log_plots(logger)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_metrics(trainer, "test")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write_metrics(trainer, "val")

    def _write_metrics(self, trainer: pl.Trainer, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        names = ranking_names(stage)  # both ranking conventions
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.split("/")[0] in names}
        # ranking metrics at full float64 precision (callback_metrics holds float32 copies)
        final = getattr(trainer.lightning_module, "final_metrics", {})
        for name in names:
            metrics.update(final.get(name, {}))
        logger = mlflow_logger(trainer)
        payload = {"stage": stage, "metrics": metrics,
                   "run_id": logger.run_id if logger else None,
                   "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None) or None,
                   "world_size": trainer.world_size}
        out = Path(trainer.default_root_dir) / f"metrics_{stage}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2, sort_keys=True))
        log.info("wrote %s", out)
        if logger is not None:
            logger.experiment.log_artifact(logger.run_id, str(out))

    def _log_plots(self, logger: MLFlowLogger) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        client, run_id = logger.experiment, logger.run_id
        keys = list(client.get_run(run_id).data.metrics)

        def history(key: str) -> tuple[list[int], list[float]]:
            h = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
            return [m.step for m in h], [m.value for m in h]

        panels = [("loss", ["train/loss_step", "train/loss_epoch", "val/loss"]),
                  ("validation ranking", ["val/hr_10", "val/ndcg_10", "val/mrr"]),
                  ("learning rate", [k for k in keys if k.startswith("lr-")])]
        sink = sorted(k for k in keys if k.startswith("val/sink/"))
        with tempfile.TemporaryDirectory() as tmp:
            fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
            for ax, (title, names) in zip(axes, panels):
                for k in names:
                    if k in keys:
                        ax.plot(*history(k), label=k, marker="." if not k.endswith("_step") else None)
                ax.set_title(title)
                ax.set_xlabel("optimizer step")
                if ax.lines:
                    ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(Path(tmp) / "learning_curves.png", dpi=110)
            plt.close(fig)
            client.log_artifact(run_id, str(Path(tmp) / "learning_curves.png"), "plots")
            if sink:
                fig, axes = plt.subplots(1, len(sink), figsize=(4 * len(sink), 3.4), squeeze=False)
                for ax, k in zip(axes[0], sink):
                    ax.plot(*history(k), marker="o")
                    ax.set_title(k.removeprefix("val/sink/"))
                    ax.set_xlabel("optimizer step")
                fig.tight_layout()
                fig.savefig(Path(tmp) / "sink_diagnostics.png", dpi=110)
                plt.close(fig)
                client.log_artifact(run_id, str(Path(tmp) / "sink_diagnostics.png"), "plots")


class PredictionWriter(BasePredictionWriter):
    """`predict` writes the top-k items per user to `<out>/predictions/rank-<r>.parquet` (one file per rank).

    Args:
        output_dir: folder for the files; default `<trainer.default_root_dir>/predictions`.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           predictions: Sequence[Any], batch_indices: Sequence[Any]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        users, items, scores = [], [], []
        for p in predictions:
            v = p["valid"]
            users.append(p["user_idx"][v])
            items.append(p["items"][v])
            scores.append(p["scores"][v].float())
        out = Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")
        out.mkdir(parents=True, exist_ok=True)
        u = torch.cat(users) if users else torch.zeros(0, dtype=torch.long)
        i = torch.cat(items) if items else torch.zeros(0, 0, dtype=torch.long)
        s = torch.cat(scores) if scores else torch.zeros(0, 0)
        table = pa.table({"user_idx": u.numpy(), "items": i.int().tolist(), "scores": s.tolist()})
        pq.write_table(table, out / f"rank-{trainer.global_rank:03d}.parquet")
