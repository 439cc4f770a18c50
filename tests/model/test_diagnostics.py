"""Semantic-state-sink diagnostics on hand-built states with known answers, and on models."""
from __future__ import annotations

import math

import torch
from model_testkit import habit_drift_batch, make

from sinkrec.diagnostics import effective_rank, occupancy, readout_bias, repeated_mask, sink_diagnostics


def test_repeated_mask_counts_within_each_row():
    items = torch.tensor([[0, 0, 3, 4, 3, 3], [5, 5, 5, 6, 0 + 7, 8]])
    rep = repeated_mask(items, min_repeats=3)
    assert rep.tolist() == [[False, False, True, False, True, True], [True, True, True, False, False, False]]


def test_occupancy_of_known_subspace():
    K, V = 4, 3
    S = torch.zeros(1, 1, K, V)
    S[0, 0, 0] = torch.tensor([3.0, 0, 0])  # energy 9 on key direction e0
    S[0, 0, 1] = torch.tensor([0, 1.0, 0])  # energy 1 on e1
    k = torch.zeros(1, 3, 1, K)
    k[0, :, 0] = torch.tensor([1.0, 0, 0, 0])  # every repeated key is e0
    rep = torch.tensor([[True, True, False]])
    torch.testing.assert_close(occupancy(S, k, rep), torch.tensor([[0.9]]))
    assert torch.isnan(occupancy(S, k, torch.zeros(1, 3, dtype=torch.bool))).all()


def test_occupancy_with_items_uses_one_direction_per_repeated_item():
    torch.manual_seed(0)
    K, V, T = 8, 4, 40
    S = torch.randn(1, 1, K, V)
    e0, e1 = torch.eye(K)[0], torch.eye(K)[1]
    items = torch.tensor([[1, 2] * (T // 2)])  # two items, each repeated 20 times
    k = torch.where((items == 1)[..., None], e0, e1)[:, :, None].clone()  # [1, T, 1, K]
    k += 0.05 * torch.randn_like(k)  # every occurrence's key differs a little (its conv context)
    rep = torch.ones(1, T, dtype=torch.bool)
    # per-position keys span all of R^K, so the spec's literal definition saturates at 1
    torch.testing.assert_close(occupancy(S, k, rep), torch.ones(1, 1))
    # per-item mean keys span ~{e0, e1}: the state's energy on those two rows
    expected = S[0, 0, :2].pow(2).sum() / S[0, 0].pow(2).sum()
    torch.testing.assert_close(occupancy(S, k, rep, items)[0, 0], expected, atol=0.03, rtol=0)


def test_effective_rank_bounds():
    eye = torch.eye(4)[None, None]  # 4 equal singular values
    torch.testing.assert_close(effective_rank(eye), torch.tensor([[4.0]]))
    rank1 = torch.outer(torch.ones(4), torch.ones(4))[None, None]
    assert abs(effective_rank(rank1).item() - 1.0) < 1e-3


def test_readout_bias_is_cosine_with_mean_repeated_value():
    v = torch.zeros(1, 3, 1, 2)
    v[0, 0, 0] = torch.tensor([1.0, 0.0])
    v[0, 1, 0] = torch.tensor([1.0, 0.0])
    o = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]]])  # cos 1, 0, 1/sqrt 2
    rep = torch.tensor([[True, True, False]])
    bias = readout_bias(o, v, rep, torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(bias, torch.tensor([[(1 + 0 + 1 / math.sqrt(2)) / 3]]))


def test_sink_diagnostics_per_arch():
    items, ts = habit_drift_batch(B=4, T=30, N=40)
    for arch in ("sinkrec", "gdn"):
        model = make(arch).train()
        books = [b.memory.codebooks.clone() for b in model.blocks if b.memory is not None]
        d = sink_diagnostics(model, items, ts, min_repeats=3)
        assert set(d) == {"sink/occupancy", "sink/repeated_share", "sink/occupancy_excess",
                          "sink/effective_rank", "sink/readout_bias"}
        assert all(math.isfinite(x) for x in d.values())
        assert 0 <= d["sink/occupancy"] <= 1 + 1e-6 and 0 < d["sink/repeated_share"] <= 1
        assert 1 <= d["sink/effective_rank"] <= 16 + 1e-4
        assert model.training  # mode restored, and no codebook update happened
        assert all(torch.equal(a, b.memory.codebooks) for a, b in zip(books, model.blocks))
    assert sink_diagnostics(make("sasrec"), items, ts) == {}
