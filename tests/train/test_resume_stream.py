"""Resuming a mid-epoch checkpoint with Lightning continues the epoch at the next batch (the streaming
training loader is stateful), so an interrupted run sees exactly the batches of an uninterrupted one."""
from __future__ import annotations

import lightning.pytorch as pl
import torch

from sinkrec.data import SeqRecDataModule
from sinkrec.lit_module import EvalConfig, OptimConfig, SeqRecModule
from sinkrec.model import SinkRecConfig


class Record(pl.Callback):
    """Remembers the users of every training batch; optionally checkpoints and stops after `stop_at`."""

    def __init__(self, path=None, stop_at: int | None = None) -> None:
        self.users, self.path, self.stop_at = [], path, stop_at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.users.append((trainer.current_epoch, batch["user_idx"].tolist()))
        if self.stop_at is not None and len(self.users) == self.stop_at:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def _fit(data, tmp_path, callback, ckpt_path=None):
    torch.manual_seed(0)
    dm = SeqRecDataModule(str(data), max_len=8, batch_size=8, eval_batch_size=32)
    cfg = SinkRecConfig(num_items=dm.num_items, arch="sasrec", d_model=16, n_heads=1, n_blocks=1, max_len=8)
    module = SeqRecModule(cfg, OptimConfig(warmup_steps=1), EvalConfig(ks=[10], diagnostics=False))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1, use_distributed_sampler=False, callbacks=[callback],
                         default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)


def test_mid_epoch_resume_sees_the_remaining_batches_of_the_same_epoch(tiny_data, tmp_path):
    full = Record()
    _fit(tiny_data, tmp_path, full)
    per_epoch = len(full.users) // 2
    stop = per_epoch + 3  # 3 batches into the second epoch
    first = Record(tmp_path / "mid.ckpt", stop_at=stop)
    _fit(tiny_data, tmp_path, first)
    second = Record()
    _fit(tiny_data, tmp_path, second, ckpt_path=tmp_path / "mid.ckpt")
    assert first.users + second.users == full.users
