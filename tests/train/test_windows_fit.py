"""Whole histories through the trainer: `data.max_len: null` + `model.window` (sinkrec/windows.py)."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from sinkrec.data import SeqRecDataModule
from sinkrec.lit_module import EvalConfig, SeqRecModule
from sinkrec.model import SinkRecConfig
from tests.train.conftest import fit_tiny_cli

TINY = {"d_model": 16, "n_heads": 2, "n_blocks": 1, "n_loops": 1, "n_codes": 16, "dropout": 0.1,
        "kernel_backend": "chunk", "gate_backend": "reference"}


def _trainer(root) -> pl.Trainer:
    return pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(root), accelerator="cpu", devices=1)


@pytest.mark.parametrize("arch", ["sinkrec", "elastic"])
def test_windowed_training_and_exact_windowed_evaluation(arch, tiny_kind_data, tmp_path):
    dm = SeqRecDataModule(str(tiny_kind_data), max_len=None, batch_size=16, eval_batch_size=32)
    config = SinkRecConfig(arch=arch, num_items=40, **TINY)
    pl.seed_everything(0)
    module = SeqRecModule(config, evaluation=EvalConfig(ks=[5, 10]), window=6)  # histories reach 30 events
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=dm)
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss_epoch"])))
    trainer.test(module, datamodule=dm)
    windowed = dict(module.final_metrics["test"])
    one_pass = SeqRecModule(config, evaluation=EvalConfig(ks=[5, 10]), window=None)
    one_pass.load_state_dict(module.state_dict())
    _trainer(tmp_path).test(one_pass, datamodule=dm)
    assert windowed["test/count"] == 60
    for k, v in one_pass.final_metrics["test"].items():
        assert windowed[k] == pytest.approx(v, abs=1e-6), k


def test_whole_histories_from_the_command_line(tiny_data, tmp_path):
    ckpt = fit_tiny_cli(tiny_data, tmp_path, "--model.config.arch", "gdn", "--model.window", "8",
                        "--data.max_len", "null")
    assert ckpt["hyper_parameters"]["window"] == 8
    assert ckpt["hyper_parameters"]["config"]["max_len"] is None


def test_sasrec_refuses_whole_histories():
    with pytest.raises(ValueError, match="SASRec learns one position per event"):
        SinkRecConfig(arch="sasrec", num_items=5, max_len=None).validate()
    with pytest.raises(ValueError, match="model.window"):
        SeqRecModule(SinkRecConfig(arch="sasrec", num_items=5), window=8)
