"""benchmarks/layer.py: the new layer cases run and the vs-SASRec ratios are computed the right way
round (no timing is asserted)."""
from __future__ import annotations

import pytest
import torch

from benchmarks import layer


def test_vs_sasrec_ratios():
    res = {"layer": [
        {"kind": "sdpa", "T": 200, "median_ms": 10.0, "peak_mb": 100.0, "infer_ms": 4.0},
        {"kind": "sdpa_masked", "T": 200, "median_ms": 20.0, "peak_mb": 400.0, "infer_ms": 8.0},
        {"kind": "elastic", "T": 200, "median_ms": 5.0, "peak_mb": 40.0, "infer_ms": 2.0},
        {"kind": "tdgd_recurrent", "T": 200, "median_ms": 50.0, "peak_mb": None, "extrapolated": True},
    ]}
    rows = {r["kind"]: r for r in layer._vs_sasrec(res)}
    assert set(rows) == {"elastic", "tdgd_recurrent"}
    e = rows["elastic"]
    assert (e["median_ms/sdpa"], e["peak_mb/sdpa"], e["infer_ms/sdpa"]) == (0.5, 0.4, 0.5)
    assert (e["median_ms/sdpa_masked"], e["peak_mb/sdpa_masked"]) == (0.25, 0.1)
    assert rows["tdgd_recurrent"]["median_ms/sdpa"] is None  # extrapolated numbers are not compared


@pytest.mark.parametrize("kind", ["sdpa_masked", "elastic_lda", "elastic", "tdgd_chunk_conv1d"])
def test_new_layer_cases_run(kind, monkeypatch):
    monkeypatch.setattr(layer, "TOKENS", 256)  # B = 4 at T = 64
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = layer._layer_case(kind, 64, reps=1)
    finally:
        torch.set_num_threads(threads)
    assert out["B"] == 4 and out["median_ms"] > 0 and out["infer_ms"] > 0 and out["peak_mb"] >= 0
