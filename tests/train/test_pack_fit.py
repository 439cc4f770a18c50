"""Packed training batches through the data path and the trainer (`data.pack`, collate_packed)."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from sinkrec.data import SeqRecDataModule
from sinkrec.data.collate import collate_left_pad, collate_packed
from sinkrec.lit_module import SeqRecModule
from sinkrec.model import SinkRecConfig, build_model
from tests.train.conftest import fit_tiny_cli

TINY = {"d_model": 16, "n_heads": 2, "n_blocks": 1, "n_loops": 2, "n_codes": 16, "dropout": 0.0,
        "kernel_backend": "chunk", "gate_backend": "reference"}


def _batches(root, pack: bool, **kw):
    dm = SeqRecDataModule(str(root), batch_size=8, pack=pack, **kw)
    return list(dm.loader("train", 0, 1))


def test_packed_stream_has_the_same_users_and_events_as_the_padded_one(tiny_kind_data):
    padded, packed = _batches(tiny_kind_data, False), _batches(tiny_kind_data, True)
    assert len(padded) == len(packed)
    for a, b in zip(padded, packed):
        assert torch.equal(a["user_idx"], b["user_idx"]) and torch.equal(a["real_row"], b["real_row"])
        assert b["items"].shape[0] == 1 and "cu_seqlens" not in a
        cu = b["cu_seqlens"]
        assert cu[0] == 0 and cu[-1] == b["items"].shape[1] and (b["items"] > 0).all()
        for r in range(a["items"].shape[0]):  # row r of the padded batch = sequence r of the packed one
            real = a["items"][r] > 0
            seq = slice(int(cu[r]), int(cu[r + 1]))
            for key in ("items", "ts", "targets", "target_kind", "input_kind"):
                assert torch.equal(a[key][r][real], b[key][0, seq]), key
        # the padded batch spends compute on pads; the packed one on real events only
        assert b["items"].shape[1] == int((a["items"] > 0).sum())


def test_packed_batch_gives_the_padded_batch_loss(tiny_kind_data):
    batch_pad = _batches(tiny_kind_data, False)[0]
    batch_pack = _batches(tiny_kind_data, True)[0]
    for arch in ("sinkrec", "gdn"):
        torch.manual_seed(0)
        model = build_model(SinkRecConfig(arch=arch, num_items=40, **TINY)).eval()
        with torch.no_grad():
            want, _ = model.loss(model(batch_pad["items"], batch_pad["ts"]), batch_pad["targets"])
            out = model(batch_pack["items"], batch_pack["ts"], cu_seqlens=batch_pack["cu_seqlens"])
            got, _ = model.loss(out, batch_pack["targets"])
        assert got.item() == pytest.approx(want.item(), rel=1e-5), arch


def test_rank_balancing_row_is_one_position_without_a_target():
    b = collate_packed([{"items": [0], "ts": [0], "targets": [0], "kind": None, "input_kind": None,
                         "user_idx": -1, "real_row": False}])
    assert b["items"].tolist() == [[1]] and b["targets"].tolist() == [[0]] and b["cu_seqlens"].tolist() == [0, 1]
    pad = collate_left_pad([{"items": [0], "ts": [0], "targets": [0], "kind": None, "input_kind": None,
                             "user_idx": -1, "real_row": False}])
    assert int(pad["targets"].sum()) == 0


def test_fit_with_packed_batches_from_the_command_line(tiny_data, tmp_path):
    ckpt = fit_tiny_cli(tiny_data, tmp_path, "--model.config.arch", "sinkrec", "--model.config.n_codes", "16",
                        "--data.pack", "true", "--trainer.max_epochs", "2")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()
                                      if v.is_floating_point())


@pytest.mark.parametrize(("arch", "window"), [("sasrec", None), ("elastic", None), ("sinkrec", 8)])
def test_pack_refuses_what_cannot_read_packed_batches(arch, window, tiny_data, tmp_path):
    dm = SeqRecDataModule(str(tiny_data), batch_size=16, pack=True)
    module = SeqRecModule(SinkRecConfig(arch=arch, num_items=40, **TINY), window=window)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu")
    with pytest.raises(ValueError, match="data.pack: true"):
        trainer.fit(module, datamodule=dm)


@pytest.mark.parametrize("arch", ["sinkrec", "gdn"])
def test_packed_evaluation_gives_the_padded_metrics(arch, tiny_kind_data, tmp_path):
    """Validation and test batches packed: the same ranks for every user, history exclusion included
    (it must read the query's own sequence, not the whole packed row), and the diagnostics still run."""
    metrics = []
    for pack in (False, True):
        torch.manual_seed(0)
        module = SeqRecModule(SinkRecConfig(arch=arch, num_items=40, **TINY))
        dm = SeqRecDataModule(str(tiny_kind_data), batch_size=8, eval_batch_size=7, pack=pack)
        trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu")
        trainer.validate(module, datamodule=dm, verbose=False)
        trainer.test(module, datamodule=dm, verbose=False)
        if pack:
            assert "cu_seqlens" in next(iter(dm.test_dataloader()))
        metrics.append(module.final_metrics)
    padded, packed = metrics
    assert padded.keys() == packed.keys() and {"val_seen_excluded", "test", "test_seen_excluded"} <= padded.keys()
    for name in padded:
        for key, want in padded[name].items():
            assert packed[name][key] == pytest.approx(want, rel=1e-6, abs=1e-9), (name, key)
    assert padded["test_seen_excluded"]["test_seen_excluded/ndcg_10"] != padded["test"]["test/ndcg_10"]
