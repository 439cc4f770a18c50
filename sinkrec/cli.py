"""`python -m sinkrec {fit,validate,test,predict} --config conf/train/<name>.yaml [--key value ...]`.

LightningCLI over `SeqRecModule` and `SeqRecDataModule`: their typed `__init__` signatures are
the config schema. Top-level config groups:

    model       SeqRecModule (config: SinkRecConfig, evaluation: EvalConfig)
    data        SeqRecDataModule (root, max_len, batch sizes, workers, seed)
    optimizer   OptimConfig (AdamW + warm-up/cosine), linked into model.optim
    trainer     lightning Trainer (strategy "auto" is resolved by sinkrec.distributed.choose_strategy)
    checkpoint  ModelCheckpoint: best by val/ndcg_10 (a second one keeps last.ckpt = the latest epoch)
    early_stopping  EarlyStopping on val/ndcg_10
    mlflow      MLflowConfig (tracking URI, experiment = dataset name by default)

Linked from the data: data.num_items -> model.config.num_items (at instantiation, from the
manifest) and data.max_len -> model.config.max_len. `fit` then tests the best checkpoint in the
same MLflow run (`--test_after_fit false` to skip).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

from sinkrec.callbacks import EventThroughput, MLflowArtifacts, MLflowSaveConfig, PredictionWriter
from sinkrec.data import SeqRecDataModule
from sinkrec.distributed import choose_strategy, destroy_process_group, env_world_size
from sinkrec.lit_module import OptimConfig, SeqRecModule


@dataclass
class MLflowConfig:
    enabled: bool = True  # false: no MLflow logger (checkpoints and metrics JSON are still written)
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str | None = None  # None: the dataset's name from its manifest (one experiment per dataset)
    run_name: str | None = None  # None: the config file's stem (e.g. "ml1m_sinkrec")
    log_checkpoint: bool = True  # upload the best checkpoint as an artifact
    parent_run_id: str | None = None  # nest this run under another (e.g. a `make compare` parent run)


def tracking_uri(configured: str | None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"  # absolute: four slashes


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Local stores keep artifacts beside the database; servers decide for themselves."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / experiment)
    return None


class SinkRecCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(OptimConfig, "optimizer")
        parser.link_arguments("optimizer", "model.optim", compute_fn=lambda o: o, apply_on="parse")
        parser.link_arguments("data.max_len", "model.config.max_len", apply_on="parse")
        parser.link_arguments("data.num_items", "model.config.num_items", apply_on="instantiate")
        parser.add_class_arguments(MLflowConfig, "mlflow")
        parser.add_argument("--deepspeed_config", type=str, default="conf/deepspeed/zero2.json",
                            help="DeepSpeed JSON used when trainer.strategy=auto picks DeepSpeed (CUDA)")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after fit, test the best checkpoint in the same run")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/ndcg_10", "checkpoint.mode": "max",
                             "checkpoint.filename": "best-epoch{epoch:03d}",
                             "checkpoint.auto_insert_metric_name": False, "checkpoint.dirpath": "checkpoints"})
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val/ndcg_10", "early_stopping.mode": "max",
                             "early_stopping.patience": 3})

    def _cfg(self, key: str) -> Any:
        return self._get(self.config_init, key)

    def _mlflow_logger(self) -> MLFlowLogger | None:
        m: MLflowConfig = self._cfg("mlflow")
        if not m.enabled:
            return None
        uri = tracking_uri(m.tracking_uri)
        experiment = m.experiment or self.datamodule.name
        configs = self._get(self.config, "config", default=None) or []
        run_name = m.run_name or (Path(str(configs[0])).stem if configs else "sinkrec")
        tags = {"config": ",".join(str(c) for c in configs), "dataset": self.datamodule.name,
                "subcommand": str(self.subcommand)}
        if m.parent_run_id:
            tags["mlflow.parentRunId"] = m.parent_run_id  # MLflow's own nesting tag
        return MLFlowLogger(experiment_name=experiment, run_name=run_name, tracking_uri=uri,
                            artifact_location=_artifact_location(uri, experiment), tags=tags)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_cfg = {**self._cfg("trainer"), **kwargs}
        world = env_world_size(trainer_cfg.get("devices"), trainer_cfg.get("num_nodes") or 1)
        strategy, description = choose_strategy(trainer_cfg.get("strategy", "auto"),
                                                self._cfg("deepspeed_config"), world)
        rank_zero_info(description)
        trainer_cfg["strategy"] = strategy
        trainer_cfg["use_distributed_sampler"] = False  # the data module splits users across ranks itself
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        # last.ckpt after every epoch, for `--ckpt_path last` (a monitored ModelCheckpoint with save_last
        # only refreshes it when the monitored metric improves)
        callbacks.append(ModelCheckpoint(dirpath=self._cfg("checkpoint").dirpath, monitor=None, save_top_k=1,
                                         save_last=True, filename="latest-epoch{epoch:03d}",
                                         auto_insert_metric_name=False))
        callbacks += [EventThroughput(), PredictionWriter(),
                      MLflowArtifacts(str(self.datamodule.root / "manifest.json"),
                                      log_checkpoint=self._cfg("mlflow").log_checkpoint)]
        if trainer_cfg.get("logger") in (None, True):
            # only rank 0 logs; other ranks must not even open the store (concurrent sqlite migrations fail)
            logger = self._mlflow_logger() if rank_zero_only.rank == 0 else None
            trainer_cfg["logger"] = logger if logger is not None else False
            if logger is not None:
                callbacks.append(LearningRateMonitor(logging_interval="step"))
        return self._instantiate_trainer(trainer_cfg, callbacks)

    def after_fit(self) -> None:
        if not self._cfg("test_after_fit") or self.trainer.fast_dev_run or self.trainer.interrupted:
            return
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None,
                          weights_only=True)


def main(args: list[str] | None = None) -> None:
    try:
        SinkRecCLI(
            SeqRecModule,
            SeqRecDataModule,
            save_config_callback=MLflowSaveConfig,
            save_config_kwargs={"save_to_log_dir": False, "overwrite": True},
            auto_configure_optimizers=False,
            seed_everything_default=1234,
            args=args,
        )
    finally:
        destroy_process_group()
