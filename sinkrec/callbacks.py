"""Callbacks: throughput, MLflow artifacts (config, manifest, best checkpoint, the model, metrics, sink
plots), MLflow system metrics, predictions. The CLI lists its defaults in `trainer.callbacks`.

Everything that writes to MLflow runs on global rank 0 only; metric logging itself goes through
Lightning's MLFlowLogger, which is rank-0-only as well. Artifacts are written with MLflow's
`log_dict` / `log_text` / `log_figure` (no temp files); the learning curves are the UI's own charts.
"""

from __future__ import annotations

import json
import logging
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
        client = logger.experiment
        client.log_text(logger.run_id, self.parser.dump(self.config, skip_none=False), "config.yaml")
        client.log_text(logger.run_id, yaml.safe_dump(_plain(resolved), sort_keys=False), "resolved_model.yaml")


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


class NextItemScorer(torch.nn.Module):
    """The trained model as MLflow logs and serves it: one int64 tensor in, scores out.

    inputs [B, 2, T]: channel 0 = item indices (left-padded, 0 = padding), channel 1 = their unix
    timestamps in seconds -> scores [B, N + 1] of every item for the next event (column 0 = padding).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        items, ts = inputs[:, 0], inputs[:, 1]  # [B, T] each
        hidden = self.model(items, ts).hidden[:, -1]  # [B, D], after the most recent event
        return hidden @ self.model.item_embeddings().T  # [B, N + 1]


class MLflowArtifacts(Callback):
    """Rank 0: data manifest and dataset input, best checkpoint, the model, final metrics, sink plots.

    Args:
        log_checkpoint: upload the best checkpoint at the end of fit (the CLI's
            `mlflow.log_checkpoint false` turns it off too).
        log_model: log the trained model (best checkpoint's weights) as an MLflow model
            (`mlflow.pytorch.load_model("runs:/<run>/model")`; a `NextItemScorer`).
    """

    def __init__(self, log_checkpoint: bool = True, log_model: bool = True) -> None:
        self.log_checkpoint, self.log_model = log_checkpoint, log_model
        self._manifest_logged = False

    def _log_manifest(self, trainer: pl.Trainer) -> None:
        logger = mlflow_logger(trainer)
        root = getattr(trainer.datamodule, "root", None)
        if logger is None or self._manifest_logged or root is None or not trainer.is_global_zero:
            return
        manifest = Path(root) / "manifest.json"
        logger.experiment.log_artifact(logger.run_id, str(manifest), "data")
        log_dataset_input(logger.experiment, logger.run_id, logger.experiment_id, manifest)
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
        if self.log_model and not trainer.interrupted:
            self._log_model(trainer, pl_module, logger, best)
        self._log_sink_plots(logger)

    def _log_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule, logger: MLFlowLogger,
                   best: str) -> None:
        """The best checkpoint's weights (else the final ones) as the run's logged model `model`, with an
        input example (two users of the validation data) and its signature."""
        import copy

        import mlflow
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        model = copy.deepcopy(pl_module.model).cpu().float().eval()
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        batch = next(iter(trainer.datamodule.loader("val", rank=0, world=1)))
        example = torch.stack([batch["items"][:2], batch["ts"][:2]], dim=1).long()  # [2, 2, T]
        scorer = NextItemScorer(model).eval()
        with torch.no_grad():
            scores = scorer(example)
        # log_model is fluent-only: point it at this run's store and experiment (it ends no run)
        mlflow.set_tracking_uri(logger.experiment.tracking_uri)
        mlflow.set_experiment(experiment_id=logger.experiment_id)
        mlflow.pytorch.log_model(scorer, name="model", run_id=logger.run_id, input_example=example.numpy(),
                                 signature=ModelSignature(  # any batch size and history length
                                     Schema([TensorSpec(np.dtype(np.int64), (-1, 2, -1), "inputs")]),
                                     Schema([TensorSpec(np.dtype(np.float32), (-1, scores.shape[1]), "scores")])),
                                 code_paths=[str(Path(__file__).parent)],  # the package, for loading elsewhere
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "einops"],
                                 serialization_format="pickle")  # (torch.export cannot trace the recurrent ops)

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
        out = Path(trainer.default_root_dir) / f"metrics_{stage}.json"  # read by `make compare`
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2, sort_keys=True))
        log.info("wrote %s", out)
        if logger is not None:
            logger.experiment.log_dict(logger.run_id, payload, out.name)

    def _log_sink_plots(self, logger: MLFlowLogger) -> None:
        """The sink diagnostics (val/sink/*), one panel each, as plots/sink_diagnostics.png."""
        client, run_id = logger.experiment, logger.run_id
        sink = sorted(k for k in client.get_run(run_id).data.metrics if k.startswith("val/sink/"))
        if not sink:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(sink), figsize=(4 * len(sink), 3.4), squeeze=False)
        for ax, k in zip(axes[0], sink):
            h = sorted(client.get_metric_history(run_id, k), key=lambda m: (m.step, m.timestamp))
            ax.plot([m.step for m in h], [m.value for m in h], marker="o")
            ax.set_title(k.removeprefix("val/sink/"))
            ax.set_xlabel("optimizer step")
        fig.tight_layout()
        client.log_figure(run_id, fig, "plots/sink_diagnostics.png")
        plt.close(fig)


class MLflowSystemMetrics(Callback):
    """Rank 0: MLflow's system metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes,
    disk, network; GPU ones when pynvml is installed) sampled every `interval_s` seconds into the run.

    (MLflow starts this monitor for runs it starts itself; Lightning's logger creates its run through
    the client, so the monitor is started here.)
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._monitor: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        logger = mlflow_logger(trainer)
        if logger is None or not trainer.is_global_zero or self._monitor is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(logger.run_id, sampling_interval=self.interval_s,
                                             resume_logging=True, tracking_uri=logger.experiment.tracking_uri)
        self._monitor.start()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


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
            v = p["real_row"]
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
