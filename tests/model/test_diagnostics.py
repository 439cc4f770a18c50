"""Semantic-state-sink diagnostics on hand-built states with known answers, and on models."""
from __future__ import annotations

import math

import pytest
import torch
from model_testkit import habit_drift_batch, make

from sinkrec.diagnostics import (
    effective_rank,
    excess_occupancy,
    memory_key_alignment,
    read_removal,
    readout_bias,
    repeat_basis,
    repeated_mask,
    sink_diagnostics,
    write_share,
)


def test_repeated_mask_counts_within_each_row():
    items = torch.tensor([[0, 0, 3, 4, 3, 3], [5, 5, 5, 6, 0 + 7, 8]])
    rep = repeated_mask(items, min_repeats=3)
    assert rep.tolist() == [[False, False, True, False, True, True], [True, True, True, False, False, False]]


def _repeated_mask_pairwise(items: torch.Tensor, min_repeats: int) -> torch.Tensor:
    """The reference: count each position's item over its row with a [B, T, T] comparison."""
    return (items != 0) & ((items[:, :, None] == items[:, None, :]).sum(-1) >= min_repeats)


@pytest.mark.parametrize("min_repeats", [1, 2, 3, 5])
def test_repeated_mask_equals_the_pairwise_count(min_repeats):
    g = torch.Generator().manual_seed(min_repeats)
    items = torch.randint(0, 12, (6, 40), generator=g)  # pads (0) and repeats in every row
    items[2] = 0  # an all-pad row
    assert torch.equal(repeated_mask(items, min_repeats), _repeated_mask_pairwise(items, min_repeats))


def _one_item_keys(K: int, T: int, direction: torch.Tensor, noise: float = 0.0) -> torch.Tensor:
    k = direction.expand(1, T, 1, K).clone()
    return k + noise * torch.randn_like(k)


def test_excess_occupancy_known_answers():
    """Hand-built states: fair share -> 1, state made only of the repeats -> K / r, none -> 0."""
    torch.manual_seed(0)
    K, V, T, r = 16, 8, 12, 2
    e = torch.eye(K)
    items = torch.tensor([[1, 2, 3] * (T // 3)])  # three repeated items, keys e0, e1, e2
    k = torch.stack([e[(i - 1) % K] for i in items[0].tolist()])[None, :, None]  # [1, T, 1, K]
    rep = torch.ones(1, T, dtype=torch.bool)
    # three equally frequent items have no unique top-2 subspace: item 3's events are not repeats,
    # so the subspace is exactly span{e0, e1}
    rep[0, 2::3] = False
    on = torch.zeros(1, 1, K, V)
    on[0, 0, :2] = torch.randn(2, V)  # all energy inside span{e0, e1}
    torch.testing.assert_close(excess_occupancy(on, k, rep, items, rank=r), torch.tensor([[K / r]]))
    off = torch.zeros(1, 1, K, V)
    off[0, 0, 2:] = torch.randn(K - 2, V)  # all energy outside
    torch.testing.assert_close(excess_occupancy(off, k, rep, items, rank=r), torch.zeros(1, 1))
    # an isotropic state holds r / K of its energy in any r-dimensional subspace: excess 1
    iso = torch.eye(K)[None, None]
    torch.testing.assert_close(excess_occupancy(iso, k, rep, items, rank=r), torch.ones(1, 1))
    # a random Gaussian state is isotropic in expectation
    rnd = torch.randn(2000, 1, K, V)
    x = excess_occupancy(rnd, k.expand(2000, -1, -1, -1), rep.expand(2000, -1), items.expand(2000, -1), r)
    assert abs(x.mean().item() - 1) < 0.05
    # rows without repeats are NaN; a full-rank subspace is refused
    assert torch.isnan(excess_occupancy(iso, k, torch.zeros_like(rep), items, rank=r)).all()
    with pytest.raises(ValueError, match="rank=16 must be < K=16"):
        excess_occupancy(iso, k, rep, items, rank=K)


def test_excess_occupancy_does_not_saturate_with_many_noisy_keys():
    """Per-position keys (each with its own noise) span all of R^K, the failure of the spec's literal
    ratio; the per-item mean keys with the rank cap still find the one repeated direction."""
    torch.manual_seed(1)
    K, V, T = 16, 8, 300
    k = _one_item_keys(K, T, torch.eye(K)[0], noise=0.1)
    items = torch.full((1, T), 7)
    rep = torch.ones(1, T, dtype=torch.bool)
    S = torch.zeros(1, 1, K, V)
    S[0, 0, 0] = 1.0  # energy 1 * V on e0
    S[0, 0, 5] = 1.0  # and the same on e5, which no repeated key points at
    x = excess_occupancy(S, k, rep, items, rank=4)  # one item -> one direction: r = 1
    torch.testing.assert_close(x, torch.tensor([[0.5 * K]]), rtol=0.02, atol=0)


def test_repeat_basis_weights_items_by_count():
    K = 4
    e = torch.eye(K)
    keys = torch.stack([e[0]] * 5 + [e[1]] * 2 + [e[2]])  # item 10 x5, 11 x2, 12 x1
    items = torch.tensor([10] * 5 + [11] * 2 + [12])
    basis = repeat_basis(keys, items, rank=2)
    assert basis.shape == (2, K)
    torch.testing.assert_close(basis.abs() @ e[:3].T, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))


def test_write_share():
    beta = torch.tensor([[[1.0], [1.0], [0.0], [0.0]]]).expand(1, 4, 1).clone()  # repeats get all writes
    rep = torch.tensor([[True, True, False, False]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    torch.testing.assert_close(write_share(beta, rep, mask), torch.tensor([[2.0]]))
    torch.testing.assert_close(write_share(torch.ones(1, 4, 1), rep, mask), torch.tensor([[1.0]]))


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


def test_memory_key_alignment_known_answers():
    """Memory keys inside the repeats' key subspace -> K / r, orthogonal -> 0, isotropic -> 1."""
    K, T, r = 8, 6, 2
    e = torch.eye(K)
    items = torch.tensor([[1, 2, 1, 2, 3, 4]])
    k = torch.stack([e[i - 1] for i in items[0].tolist()])[None, :, None]  # [1, T, 1, K]: item i -> e_{i-1}
    rep = torch.tensor([[True, True, True, True, False, False]])  # items 1, 2: span{e0, e1}
    mask = torch.ones(1, T, dtype=torch.bool)
    inside = (e[0] + e[1]).div(math.sqrt(2)).expand(1, T, 1, K)
    torch.testing.assert_close(memory_key_alignment(inside, k, rep, items, mask, r), torch.tensor([[K / r]]))
    outside = e[5].expand(1, T, 1, K)
    torch.testing.assert_close(memory_key_alignment(outside, k, rep, items, mask, r), torch.zeros(1, 1))
    torch.manual_seed(0)
    n = 4000
    rnd = torch.nn.functional.normalize(torch.randn(1, n, 1, K), dim=-1)
    wide = memory_key_alignment(rnd, k.repeat(1, n // T + 1, 1, 1)[:, :n], rep.repeat(1, n // T + 1)[:, :n],
                                items.repeat(1, n // T + 1)[:, :n], torch.ones(1, n, dtype=torch.bool), r)
    assert abs(wide.item() - 1) < 0.05
    # pads do not count; a row without repeats is NaN
    half = mask.clone()
    half[0, :3] = False
    mixed = torch.cat([inside[:, :3], outside[:, 3:]], 1)
    torch.testing.assert_close(memory_key_alignment(mixed, k, rep, items, half, r), torch.zeros(1, 1))
    assert torch.isnan(memory_key_alignment(inside, k, torch.zeros_like(rep), items, mask, r)).all()


def test_read_removal_is_the_cosine_the_subtraction_takes_away():
    K, V, T = 4, 3, 3
    S = torch.zeros(1, 1, K, V)
    S[0, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # key e0 -> value u0 (the repeats'), key e1 -> u1
    S[0, 0, 1] = torch.tensor([0.0, 1.0, 0.0])
    v = torch.zeros(1, T, 1, V)
    v[0, 0, 0, 0] = 1.0  # the repeated event wrote u0
    rep = torch.tensor([[True, False, False]])
    mask = torch.tensor([[True, True, False]])  # last real position: t = 1 (right pad at t = 2)
    q = torch.zeros(1, T, 1, K)
    q[0, 1, 0] = torch.tensor([1.0, 1.0, 0.0, 0.0]) / math.sqrt(2)  # reads u0 + u1: cos 1/sqrt 2 with u0
    q_read = q.clone()
    q_read[0, 1, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # minus the e0 part: reads u1, cos 0
    torch.testing.assert_close(read_removal(S, q, q_read, v, rep, mask), torch.tensor([[1 / math.sqrt(2)]]))
    torch.testing.assert_close(read_removal(S, q, q, v, rep, mask), torch.zeros(1, 1))  # nothing removed
    assert torch.isnan(read_removal(S, q, q_read, v, torch.zeros_like(rep), mask)).all()


def test_sink_diagnostics_per_arch():
    items, ts = habit_drift_batch(B=4, T=30, N=40)
    for arch in ("sinkrec", "gdn"):
        model = make(arch).train()
        books = [b.memory.codebooks.clone() for b in model.blocks if b.memory is not None]
        d = sink_diagnostics(model, items, ts, min_repeats=3)
        memory = {"sink/km_alignment", "sink/km_alignment_other", "sink/read_removal"} if arch == "sinkrec" else set()
        assert set(d) == {"sink/excess_occupancy", "sink/excess_occupancy_other", "sink/repeated_share", "sink/effective_rank",
                          "sink/readout_bias", "sink/write_share", "sink/rho_repeated", "sink/rho_other", *memory}
        assert all(math.isfinite(x) for x in d.values())
        assert 0 <= d["sink/excess_occupancy"] <= 16 / 4 + 1e-4 and 0 < d["sink/repeated_share"] <= 1
        assert (d["sink/rho_repeated"] == 0) == (arch == "gdn")  # coverage exists only with memory
        assert 1 <= d["sink/effective_rank"] <= 16 + 1e-4
        assert model.training  # mode restored, and no codebook update happened
        assert all(torch.equal(a, b.memory.codebooks) for a, b in zip(books, model.blocks))
    assert sink_diagnostics(make("sasrec"), items, ts) == {}
