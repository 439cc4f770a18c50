"""The data module on real MovieLens-100K produced by the real pipeline (skipped when the raw file
is absent: `make data` fetches it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sinkrec.data import SeqRecDataModule

ROOT = Path(__file__).resolve().parents[2]
RAW = ROOT / "data" / "raw" / "ml-100k" / "ml-100k.inter"


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory) -> Path:
    if not RAW.is_file():
        pytest.skip(f"{RAW} missing: run `make data`")
    out = tmp_path_factory.mktemp("ml100k") / "ml-100k"
    p = subprocess.run([sys.executable, "-m", "pipeline", "--config", "conf/pipeline/ml-100k.yaml",
                        "--input", str(RAW), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def test_ml100k_split_across_ranks_exactly_once(ml100k):
    manifest = json.loads((ml100k / "manifest.json").read_text())
    dm = SeqRecDataModule(str(ml100k), max_len=50, batch_size=64, eval_batch_size=128)
    dm.setup()
    parts = [dm.index.read(u) for u in dm.index.units(1)]
    users = np.concatenate([p.user_idx for p in parts])
    items = np.concatenate([p.items for p in parts])
    assert dm.num_items == manifest["num_items"] == int(items.max())
    assert len(users) == manifest["counts"]["users"] and len(items) == manifest["counts"]["events"]
    assert all((np.diff(p.ts[lo:hi]) >= 0).all() for p in parts for lo, hi in zip(p.offsets[:-1], p.offsets[1:]))
    for stage in ("train", "test"):
        seen, batches = [], []
        for rank in range(3):
            n = 0
            for b in dm.loader(stage, rank, 3):
                seen += b["user_idx"][b["real_row"]].tolist()
                n += 1
                assert b["items"].shape[1] <= 50
            batches.append(n)
        assert len(set(batches)) == 1
        assert sorted(seen) == sorted(users.tolist())  # every ML-100K user has >= 4 events
