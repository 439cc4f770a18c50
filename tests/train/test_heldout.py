"""Held-out users (sinkrec/heldout.py): scored exactly as the test split scores its own users."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sinkrec import heldout


def _sinkbench(tmp: Path) -> tuple[Path, Path]:
    """A tiny SinkBench log and its processed data, through the real pipeline."""
    from pipeline.config import load
    from pipeline.run import run
    from pipeline.synth import SynthConfig, generate

    raw = tmp / "raw" / "e.parquet"
    generate(SynthConfig(users=40, items=128, seed=0, repeat_ratio=0.5, mean_len=40), raw, log=lambda m: None)
    cfg = load(["--config", "conf/pipeline/sinkbench.yaml", "--input", str(raw), "--out", str(tmp / "data"),
                "--name", "tiny-sinkbench", "--num-shards", "2"])
    return raw, run(cfg, log=lambda m: None)


def test_the_training_users_scored_as_held_out_get_the_test_splits_ranks(tmp_path):
    from sinkrec.config import SinkRecConfig
    from sinkrec.data import SeqRecDataModule
    from sinkrec.metrics import target_ranks
    from sinkrec.model import build_model

    raw, root = _sinkbench(tmp_path)
    num_items = pq.read_table(root / "items.parquet").num_rows
    torch.manual_seed(0)
    model = build_model(SinkRecConfig(num_items=num_items, d_model=16, n_blocks=1, n_codes=16).validate()).eval()
    max_len = 24  # shorter than most users: the window cut must agree too
    seqs = heldout.load_sequences(raw, root)
    got = heldout.score(model, seqs, max_len, batch_size=7)
    # the test split of the same users, through the trainer's data module
    raw_of = dict(zip(*pq.read_table(root / "users.parquet", columns=["user_idx", "raw_user_id"]).to_pydict().values()))
    want, kinds = {}, {}
    dm = SeqRecDataModule(root=str(root), max_len=max_len, eval_batch_size=5, verify="off")
    with torch.no_grad():
        for batch in dm.loader("test", rank=0, world=1):
            ranks = target_ranks(model(batch["items"], batch["ts"]).hidden[:, -1], model.item_embeddings(),
                                 batch["targets"][:, -1])
            for u, r, k in zip(batch["user_idx"].tolist(), ranks.tolist(), batch["target_kind"][:, -1].tolist()):
                want[int(raw_of[u])], kinds[int(raw_of[u])] = r, k
    order = sorted(want)  # load_sequences: ascending raw user id
    assert len(seqs) == len(order) == 40
    np.testing.assert_array_equal(got["rank"], [want[u] for u in order])
    np.testing.assert_array_equal(got["kind"], [kinds[u] for u in order])
    assert set(np.unique(got["kind"])) == {0, 1}


def test_out_of_vocabulary_items_are_dropped_and_short_users_with_them(tmp_path):
    raw = tmp_path / "e.parquet"
    pq.write_table(pa.table({"user_id": [5, 5, 5, 3, 3, 9, 9], "item_id": [10, 11, 12, 11, 99, 12, 10],
                             "timestamp": [3, 1, 2, 7, 8, 1, 1], "kind": pa.array([0, 1, 0, 1, 0, 0, 1], pa.int8())}),
                   raw)
    root = tmp_path / "data"
    root.mkdir()
    pq.write_table(pa.table({"item_idx": pa.array([1, 2, 3], pa.int32()), "raw_item_id": ["12", "10", "11"]}),
                   root / "items.parquet")
    seqs = heldout.load_sequences(raw, root)
    # user 3 keeps one event (item 99 is unknown): dropped; users 5 and 9 in id order, each in time order
    assert len(seqs) == 2
    np.testing.assert_array_equal(seqs[0][0], [3, 1, 2])  # user 5 at t = 1, 2, 3: raw 11, 12, 10
    np.testing.assert_array_equal(seqs[0][1], [1, 2, 3])
    np.testing.assert_array_equal(seqs[0][2], [1, 0, 0])
    np.testing.assert_array_equal(seqs[1][0], [1, 2])  # user 9: raw 12, 10 (equal times keep file order)
