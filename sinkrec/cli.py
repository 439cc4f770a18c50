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

Faults and bad inputs (sinkrec/faults.py, sinkrec/checkpoints.py, sinkrec/errors.py): `run` is the
command-line entry; a `UserError` (or the data path's `ShardError`) prints as one paragraph and exits 2
(`--debug` or SINKREC_DEBUG=1 for the traceback), a preemption (SIGTERM) exits 143 after writing
last.ckpt. Checkpoints are written atomically and read with weights_only=True.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from pipeline.errors import PipelineError
from sinkrec.callbacks import MLflowArtifacts, MLflowSaveConfig
from sinkrec.checkpoints import AtomicCheckpointIO, check_against, read_checkpoint
from sinkrec.data import SeqRecDataModule, ShardError
from sinkrec.distributed import choose_strategy, destroy_process_group, env_world_size
from sinkrec.errors import ConfigError, UserError, debug_enabled, nearest, where
from sinkrec.faults import (
    PREEMPTED_EXIT,
    KillableMLFlowLogger,
    Preempted,
    Preemption,
    RankWatch,
    RngState,
    check_tracking_store,
)
from sinkrec.hardware import describe_precision
from sinkrec.lit_module import OptimConfig, SeqRecModule
from sinkrec.model import SinkRecConfig

SUBCOMMANDS = ("fit", "validate", "test", "predict")


@dataclass
class MLflowConfig:
    enabled: bool = True  # false: no MLflow logger (checkpoints and metrics JSON are still written)
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str | None = None  # None: the dataset's name from its manifest (one experiment per dataset)
    run_name: str | None = None  # None: the config file's stem (e.g. "ml1m_sinkrec")
    log_checkpoint: bool = True  # upload the best checkpoint as an artifact (and the model: MLflowArtifacts)
    parent_run_id: str | None = None  # nest this run under another (e.g. a `make compare` parent run)
    check_timeout_s: float = 5.0  # the store must answer within this before training starts, else an error


def tracking_uri(configured: str | None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"  # absolute: four slashes


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Local stores keep artifacts beside the database; servers decide for themselves."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / experiment)
    return None


def ensure_experiment(uri: str, experiment: str) -> None:
    """Open the MLflow store and create `experiment` in it if missing, one process at a time.

    A fresh sqlite store builds its tables by running MLflow's schema migrations on first open. Two
    processes that open it at the same moment (two `make compare` runs started together) both
    migrate, and one, sometimes both, dies with "duplicate column name: step" or "table experiments
    already exists" (3 of 3 tries with three processes, 2026-12-06). An exclusive lock on
    `<store>.lock` beside the database serialises the first open and the experiment's creation;
    a server store (http) serialises on its own."""
    from mlflow.tracking import MlflowClient

    with contextlib.ExitStack() as stack:
        if uri.startswith("sqlite:///"):
            import fcntl

            db = Path(uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            lock = stack.enter_context(open(db.with_name(db.name + ".lock"), "w"))
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        client = MlflowClient(uri)
        if client.get_experiment_by_name(experiment) is None:
            client.create_experiment(experiment, artifact_location=_artifact_location(uri, experiment))


# `trainer.callbacks` when a config lists none (lightning's class_path/init_args form, as in YAML)
DEFAULT_CALLBACKS = [
    {"class_path": "sinkrec.callbacks.EventThroughput"},
    {"class_path": "sinkrec.callbacks.PredictionWriter"},
    {"class_path": "sinkrec.callbacks.MLflowArtifacts"},
    {"class_path": "sinkrec.callbacks.MLflowSystemMetrics"},
    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
]


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
        # checked after each validation only: a run that ends (max_steps) before its first validation
        # has no val/ndcg_10 to check, which is not an error
        parser.set_defaults({"early_stopping.monitor": "val/ndcg_10", "early_stopping.mode": "max",
                             "early_stopping.patience": 3, "early_stopping.check_on_train_epoch_end": False})
        # trainer.callbacks lists the optional callbacks, as in any LightningCLI: a config that sets it
        # replaces these defaults (`--trainer.callbacks+=...` appends); _persistent_callbacks are always added
        parser.set_defaults({"trainer.callbacks": DEFAULT_CALLBACKS})
        parser.add_argument("--dist_timeout_s", type=float, default=600.0,
                            help="seconds a collective (gloo/NCCL) may wait for a peer before the job fails, "
                                 "naming the rank that stopped")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            raise ConfigError(parse_error_message(e, parser, self._argv)) from e

    def _sub(self, key: str, default: Any = None) -> Any:
        sub = self.config.get("subcommand")
        return self.config[sub].get(key, default) if sub else default

    def before_instantiate_classes(self) -> None:
        """Config values that cannot work, named by key and file, before anything is built; then the
        data, on a fresh checkout: the data module reads num_items from the manifest when it is built
        (model.config.num_items is linked to it), before Lightning's `prepare_data` could run."""
        sub, argv = self.config.get("subcommand"), self._argv
        configs = [str(c) for c in (self._sub("config") or [])]
        check_values(self.config[sub], lambda key: where(key, argv, configs))
        root = Path(self.config[sub].data.root)
        if not (root / "manifest.json").is_file():
            from pipeline.prepare import prepare  # lazy: the pipeline stack (Polars) only when needed

            prepare(root)  # every rank may get here: the pipeline's lock lets one build, the others wait

    def _parse_ckpt_path(self) -> None:
        """Read --ckpt_path (weights-only) but keep this run's config: LightningCLI would overwrite the
        model config with the checkpoint's, silently; `check_against` refuses any difference instead."""
        path = self._sub("ckpt_path")
        if path == "last":
            path = str(Path(self._sub("checkpoint").dirpath or "checkpoints") / "last.ckpt")
            if not Path(path).is_file():
                return  # Lightning warns and starts from scratch: the first start of a requeued job
        if path and path not in ("best", "hpc", "registry") and not Path(path).is_dir():  # (DeepSpeed: a folder)
            self._ckpt = (path, read_checkpoint(path))

    def _check_ckpt_fits(self) -> None:
        if getattr(self, "_ckpt", None):
            path, ckpt = self._ckpt
            for line in check_against(ckpt, path, self.model, resuming=self.subcommand == "fit"):
                rank_zero_warn(line)

    before_fit = before_validate = before_test = before_predict = _check_ckpt_fits

    def _cfg(self, key: str) -> Any:
        """An instantiated config value of this subcommand (LightningCLI's `_get`, without the private call)."""
        return self.config_init.get(str(self.subcommand), self.config_init).get(key)

    def _named_configs(self) -> list[str]:
        """The config files named on the command line (not the ones they include with `config:`)."""
        argv = self._argv
        named = [a for i, a in enumerate(argv) if i and argv[i - 1] in ("--config", "-c")]
        return named + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]

    def _mlflow_logger(self) -> MLFlowLogger | None:
        m: MLflowConfig = self._cfg("mlflow")
        if not m.enabled:
            return None
        uri = tracking_uri(m.tracking_uri)
        experiment = m.experiment or self.datamodule.name
        configs = [str(c) for c in (self._sub("config") or [])]
        named = self._named_configs() or configs
        run_name = m.run_name or (Path(named[0]).stem if named else "sinkrec")
        tags = {"config": ",".join(configs), "dataset": self.datamodule.name, "subcommand": str(self.subcommand)}
        if m.parent_run_id:
            tags["mlflow.parentRunId"] = m.parent_run_id  # MLflow's own nesting tag
        check_tracking_store(uri, m.check_timeout_s)  # seconds, not MLflow's minutes of retries
        ensure_experiment(uri, experiment)
        return KillableMLFlowLogger(experiment_name=experiment, run_name=run_name, tracking_uri=uri,
                                    artifact_location=_artifact_location(uri, experiment), tags=tags)

    def _persistent_callbacks(self) -> list[Callback]:
        """The callbacks that the CLI's own promises rest on, whatever `trainer.callbacks` lists:
        last.ckpt every epoch (`--ckpt_path last`), preemption (exit 143 after last.ckpt), a named
        error when a peer rank dies, and torch's RNG state in checkpoints."""
        ckpt_dir = self._cfg("checkpoint").dirpath or "checkpoints"
        # (a monitored ModelCheckpoint with save_last only refreshes last.ckpt when the metric improves;
        # no version counter: last.ckpt written by a preemption is overwritten, not kept beside a last-v1.ckpt)
        latest = ModelCheckpoint(dirpath=self._cfg("checkpoint").dirpath, monitor=None, save_top_k=1,
                                 save_last=True, filename="latest-epoch{epoch:03d}",
                                 auto_insert_metric_name=False, enable_version_counter=False)
        return [latest, Preemption(ckpt_dir), RankWatch(self._cfg("dist_timeout_s")), RngState()]

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_cfg = self._cfg("trainer")
        world = env_world_size(trainer_cfg.get("devices"), trainer_cfg.get("num_nodes") or 1)
        timeout = datetime.timedelta(seconds=self._cfg("dist_timeout_s"))
        strategy, description = choose_strategy(trainer_cfg.get("strategy", "auto"),
                                                self._cfg("deepspeed_config"), world, timeout)
        rank_zero_info(description)
        rank_zero_info(describe_precision(trainer_cfg.get("precision"), str(trainer_cfg.get("accelerator", "auto"))))
        # temp file + fsync + rename: a kill or a full disk never leaves a truncated checkpoint
        plugins = trainer_cfg.get("plugins") or []
        kwargs |= {"strategy": strategy,
                   "use_distributed_sampler": False,  # the data module splits users across ranks itself
                   "plugins": [*(plugins if isinstance(plugins, list) else [plugins]), AtomicCheckpointIO()]}
        logger = trainer_cfg.get("logger")
        if logger in (None, True):
            # only rank 0 logs; other ranks must not even open the store (concurrent sqlite migrations fail)
            logger = (self._mlflow_logger() if rank_zero_only.rank == 0 else None) or False
            kwargs["logger"] = logger
        callbacks = trainer_cfg.get("callbacks") or []
        for cb in callbacks:
            if isinstance(cb, MLflowArtifacts):
                cb.log_checkpoint = cb.log_checkpoint and self._cfg("mlflow").log_checkpoint
        if logger is False:  # Lightning refuses a LearningRateMonitor without a logger
            trainer_cfg["callbacks"] = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
        # LightningCLI adds these to the ones the config lists (`trainer_defaults`: "always present")
        self.trainer_defaults["callbacks"] = self._persistent_callbacks()
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        if not self._cfg("test_after_fit") or self.trainer.fast_dev_run or self.trainer.interrupted:
            return
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None,
                          weights_only=True)


SIZES = ("d_model", "n_heads", "n_blocks", "n_loops", "max_len", "n_levels", "n_codes", "conv_size",
         "num_negatives")


def check_values(cfg: Any, source: Any) -> None:
    """ConfigError for values that cannot work; `source(key)` says where a key was set."""
    m, d, o = cfg.model.config, cfg.data, cfg.optimizer
    positive = (lambda v: v >= 1, "a positive integer")
    rules = [(f"model.config.{n}", m.get(n), *positive) for n in SIZES if isinstance(m.get(n), int)]
    rules += [(f"data.{n}", d.get(n), *positive) for n in ("max_len", "batch_size", "eval_batch_size")]
    rules += [("model.config.dropout", m.get("dropout"), lambda v: 0 <= v < 1, "in [0, 1)"),
              ("data.num_workers", d.get("num_workers"), lambda v: v >= 0, ">= 0 (0 = load in the main process)"),
              ("optimizer.lr", o.lr, lambda v: v > 0, "> 0"),
              ("optimizer.warmup_steps", o.warmup_steps, lambda v: v >= 0, ">= 0"),
              ("optimizer.min_lr_ratio", o.min_lr_ratio, lambda v: 0 <= v <= 1, "in [0, 1]"),
              ("dist_timeout_s", cfg.get("dist_timeout_s"), lambda v: v > 0, "a positive number of seconds")]
    for key, value, ok, want in rules:
        if value is not None and not ok(value):
            raise ConfigError(f"{key}={value!r} (set in {source(key)}) cannot work: it must be {want}")
    width, heads = m.get("d_model"), m.get("n_heads")
    if width % heads:
        raise ConfigError(f"model.config.d_model={width} (set in {source('model.config.d_model')}) cannot work: "
                          f"it must be divisible by model.config.n_heads={heads}, e.g. d_model="
                          f"{-(-width // heads) * heads} or n_heads={max(k for k in range(1, heads) if width % k == 0)}")
    try:  # the model's own rules (arch, loss, backends, ...); num_items comes from the data later
        SinkRecConfig(**{**{f.name: m.get(f.name) for f in fields(SinkRecConfig) if f.name in m},
                         "num_items": 1}).validate()
    except ValueError as e:
        raise ConfigError(f"{e} (model.config, set in {source('model.config')})") from None


def parse_error_message(e: Exception, parser: LightningArgumentParser, argv: list[str]) -> str:
    """jsonargparse's error without the usage screen, with the nearest valid key for an unknown one."""
    import re

    text = " ".join(str(e).split())
    sub = next((a for a in argv if a in SUBCOMMANDS), None)
    action = getattr(parser, "_subcommands_action", None)
    subparser = action._name_parser_map.get(sub) if action is not None and sub else parser
    keys = [o.lstrip("-") for a in subparser._actions for o in a.option_strings if o.startswith("--")]
    unknown = re.findall(r"--([\w.]+)", text.split("unrecognized arguments:", 1)[-1]) \
        if "unrecognized arguments" in text else re.findall(r"(?:[Kk]ey|option) ['\"]([\w.]+)['\"]", text)
    hints = [f"Did you mean --{near}?" for k in unknown if (near := nearest(k, keys))]
    configs = [a for i, a in enumerate(argv) if i and argv[i - 1] in ("--config", "-c")]
    where_ = " (on the command line)" if "unrecognized arguments" in text else \
        f" (in {', '.join(configs)})" if configs else ""
    return " ".join([f"{text}{where_}.", *hints, f"`python -m sinkrec {sub or 'fit'} --help` lists every key."])


def main(args: list[str] | None = None) -> None:
    try:
        SinkRecCLI(
            SeqRecModule,
            SeqRecDataModule,
            save_config_callback=MLflowSaveConfig,
            save_config_kwargs={"save_to_log_dir": False, "overwrite": True},
            auto_configure_optimizers=False,
            seed_everything_default=1234,
            parser_kwargs={"exit_on_error": False, **{s: {"exit_on_error": False} for s in SUBCOMMANDS}},
            args=args,
        )
    except BaseException:
        destroy_process_group(barrier=False)  # a peer may be gone: a barrier would hide this error
        raise
    destroy_process_group()


def run(argv: list[str] | None = None) -> int:
    """`python -m sinkrec ...`: main() with user errors as one paragraph (exit 2) and preemption as 143."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if from_sys else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != "--debug"]
    if from_sys:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself when given no args
    try:
        main(None if from_sys else argv)
    except (Preempted, SIGTERMException) as e:
        print(f"preempted: {e or 'SIGTERM'}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    except (UserError, ShardError, PipelineError) as e:
        return _report(e, debug, 2)
    except RuntimeError as e:
        if any(RankWatch.NOTE in n for n in getattr(e, "__notes__", [])):  # a peer died or hung
            return _report(e, debug, 1)
        raise
    return 0


def _report(e: BaseException, debug: bool, code: int) -> int:
    if debug:
        raise e
    notes = " ".join(getattr(e, "__notes__", []))
    print(f"error: {e}{' ' + notes if notes else ''}\n(--debug or SINKREC_DEBUG=1 shows the traceback)",
          file=sys.stderr, flush=True)
    return code
