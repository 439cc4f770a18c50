"""Full-ranking metrics against a brute-force NumPy implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkrec.metrics import RankingAccumulator, metric_names, target_ranks, top_k


def brute_ranks(h: np.ndarray, table: np.ndarray, targets: np.ndarray, exclude=None) -> np.ndarray:
    """rank = 1 + #{i in 1..N, i != target, not excluded : s_i >= s_target}, one user at a time."""
    ranks = []
    for u in range(len(targets)):
        s = table @ h[u]
        t = targets[u]
        others = [i for i in range(1, len(table)) if i != t and (exclude is None or i not in set(exclude[u]))]
        ranks.append(1 + sum(s[i] >= s[t] for i in others))
    return np.array(ranks)


def brute_metrics(ranks: np.ndarray, ks) -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"hr_{k}"] = float(np.mean(ranks <= k))
        out[f"ndcg_{k}"] = float(np.mean(np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)))
    out["mrr"] = float(np.mean(1.0 / ranks))
    return out


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_ranks_match_bruteforce_random(chunk):
    g = np.random.default_rng(0)
    N, D, n = 53, 8, 40
    table, h = g.normal(size=(N + 1, D)), g.normal(size=(n, D))
    targets = g.integers(1, N + 1, n)
    got = target_ranks(torch.tensor(h), torch.tensor(table), torch.tensor(targets), chunk_size=chunk)
    np.testing.assert_array_equal(got.numpy(), brute_ranks(h, table, targets))


def test_ranks_under_bf16_autocast_equal_float32_ranks():
    """trainer.precision bf16-mixed: the ranking matmul still runs in float32. In bf16 (8 mantissa
    bits) near-equal scores tie with the target, and ties count against it."""
    g = torch.Generator().manual_seed(0)
    N, D, n = 4000, 64, 256
    table, h = torch.randn(N + 1, D, generator=g), torch.randn(n, D, generator=g)
    targets = torch.randint(1, N + 1, (n,), generator=g)
    want = target_ranks(h, table, targets, chunk_size=1024)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = target_ranks(h, table, targets, chunk_size=1024)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    s16 = h.bfloat16() @ table.bfloat16().t()  # what a bf16 ranking matmul would compare
    ties = (s16[:, 1:] == s16[torch.arange(n), targets][:, None]).sum() - n  # other items tied with the target
    assert ties > 0


@pytest.mark.parametrize("chunk", [3, 64])
def test_ties_count_against_target_and_pad_never_candidate(chunk):
    # integer-valued embeddings: ties are exact whatever the summation order
    g = np.random.default_rng(1)
    N, D, n = 30, 4, 25
    table = g.integers(-2, 3, size=(N + 1, D)).astype(np.float32)
    table[0] = 100.0  # the pad row would beat everything if it were a candidate
    table[5] = table[9] = table[17]  # a three-way tie
    h = g.integers(-2, 3, size=(n, D)).astype(np.float32)
    targets = g.integers(1, N + 1, n)
    targets[:3] = [5, 9, 17]
    got = target_ranks(torch.tensor(h), torch.tensor(table), torch.tensor(targets), chunk_size=chunk).numpy()
    np.testing.assert_array_equal(got, brute_ranks(h, table, targets))
    # all-equal scores: every target is ranked last (N), never first
    flat = target_ranks(torch.zeros(4, D), torch.ones(N + 1, D), torch.tensor([1, 2, 3, N]), chunk_size=chunk)
    assert flat.tolist() == [N] * 4


def test_exclude_history_matches_bruteforce_and_keeps_target():
    g = np.random.default_rng(2)
    N, D, n, H = 40, 6, 20, 7
    table, h = g.normal(size=(N + 1, D)), g.normal(size=(n, D))
    targets = g.integers(1, N + 1, n)
    hist = g.integers(0, N + 1, size=(n, H))  # 0 = padding in the history
    hist[:, 0] = targets  # the target is in the history: it must stay a candidate
    got = target_ranks(torch.tensor(h), torch.tensor(table), torch.tensor(targets), torch.tensor(hist), chunk_size=9)
    excl = [[i for i in row if i != t] for row, t in zip(hist, targets)]
    np.testing.assert_array_equal(got.numpy(), brute_ranks(h, table, targets, excl))
    base = target_ranks(torch.tensor(h), torch.tensor(table), torch.tensor(targets), chunk_size=9)
    assert (got <= base).all() and (got < base).any()


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # the merged one has no update of its own
def test_accumulator_matches_bruteforce_with_k_beyond_catalogue_and_exact_sum_of_ranks():
    g = np.random.default_rng(3)
    N, D = 25, 5
    ks = (1, 10, 50, 200)  # 50 and 200 exceed the catalogue: every target is a hit
    table = g.normal(size=(N + 1, D))
    parts, all_ranks = [], []
    acc_ranks = [RankingAccumulator(ks) for _ in range(3)]  # three "ranks" of uneven size
    for r, n in enumerate((7, 13, 1)):
        h, t = g.normal(size=(n, D)), g.integers(1, N + 1, n)
        ranks = target_ranks(torch.tensor(h), torch.tensor(table), torch.tensor(t))
        acc_ranks[r].update(ranks)
        all_ranks.append(brute_ranks(h, table, t))
        parts.append(acc_ranks[r])
    world = RankingAccumulator(ks)
    for a in parts:  # what compute() does across ranks: the states are summed (dist_reduce_fx="sum")
        world.merge_state(a)
    got = world.compute()
    want = brute_metrics(np.concatenate(all_ranks), ks)
    for k in metric_names(ks):
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert got["count"] == 21 and got["hr_50"] == 1.0 and got["hr_200"] == 1.0
    # an average of per-rank averages would differ here (the 1-target rank would weigh 1/3)
    naive = np.mean([brute_metrics(r, ks)["mrr"] for r in all_ranks])
    assert abs(naive - got["mrr"]) > 1e-6


def test_kind_groups_split_counts():
    acc = RankingAccumulator((10,))
    acc.update(torch.tensor([1, 20, 3, 11]), torch.tensor([1, 1, 0, 0]))
    m = acc.compute()
    assert m["count"] == 4 and m["habit/count"] == 2 and m["dynamic/count"] == 2
    assert m["habit/hr_10"] == 0.5 and m["dynamic/mrr"] == pytest.approx((1 / 3 + 1 / 11) / 2)


def test_top_k_chunked_equals_full_sort():
    g = torch.Generator().manual_seed(0)
    table, h = torch.randn(101, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g,
                                                                                 dtype=torch.float64)
    _, items = top_k(h, table, 10, chunk_size=13)
    full = (h @ table[1:].t()).argsort(1, descending=True)[:, :10] + 1
    assert torch.equal(items, full)
