"""Training losses: the chunked full softmax equals the plain one, the shared-negative sampled softmax
is the cross-entropy it claims to be, and `l2_norm` scores cosines on both sides."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_testkit import make, random_batch

from sinkrec.losses import full_softmax_loss, sampled_softmax_loss


def _plain_full_ce(h, table, targets, tau):
    sel = targets != 0
    logits = h[sel] @ table.t() / tau
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets[sel])


@pytest.mark.parametrize("tau", [0.3, 1.0])  # 1.0: the path that skips the division
@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_full_softmax_equals_plain_cross_entropy(chunk, tau):
    """Float64, so the check is exact up to summation order; chunk sizes that do and do not divide P."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 21, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    table = torch.randn(30, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (3, 21), generator=gen)  # 0 = ignore, ~1/30 of positions
    loss = full_softmax_loss(h, table, targets, temperature=tau, chunk=chunk)
    gh, gt = torch.autograd.grad(loss, [h, table])
    ref = _plain_full_ce(h, table, targets, tau)
    rh, rt = torch.autograd.grad(ref, [h, table])
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gt, rt, rtol=1e-10, atol=1e-12)
    assert gt[0].abs().max() == 0  # the pad row is never a candidate, so it gets no gradient


@pytest.mark.parametrize("tau", [0.5, 1.0])  # 1.0: the path that skips the division
def test_sampled_softmax_is_ce_over_target_and_shared_negatives_with_hits_masked(tau):
    gen = torch.Generator().manual_seed(3)
    N, D = 6, 4
    h = torch.randn(2, 5, D, generator=gen, dtype=torch.float64, requires_grad=True)
    table = torch.randn(N + 1, D, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, N + 1, (2, 5), generator=gen)
    targets[0, 0] = 0
    # 50 draws from 6 items: every target is also drawn as a negative (accidental hits everywhere)
    loss = sampled_softmax_loss(h, table, targets, num_negatives=50, temperature=tau,
                                generator=torch.Generator().manual_seed(9))
    draws = torch.randint(1, N + 1, (50,), generator=torch.Generator().manual_seed(9))
    sel = targets != 0
    hs, pos = h[sel], targets[sel]
    expected = []
    for i in range(len(pos)):
        negs = draws[draws != pos[i]]  # an accidental hit is not a negative
        logits = torch.cat([hs[i] @ table[pos[i]][None].t(), hs[i] @ table[negs].t()]) / tau
        expected.append(torch.logsumexp(logits, 0) - logits[0])
    expected = torch.stack(expected).mean()
    torch.testing.assert_close(loss, expected)
    # the gradients the fused loss computes in its forward pass, against autograd through the loop
    for got, want in zip(torch.autograd.grad(loss, [h, table]), torch.autograd.grad(expected, [h, table])):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # evaluation: the same value, no gradient work
        torch.testing.assert_close(sampled_softmax_loss(h, table, targets, num_negatives=50, temperature=tau,
                                                        generator=torch.Generator().manual_seed(9)), expected)


def test_sampled_in_batch_candidates_are_targets_and_draws():
    """in_batch=True: softmax over unique(targets ∪ draws) with the logQ correction."""
    gen = torch.Generator().manual_seed(4)
    N, U = 9, 4
    h = torch.randn(1, 6, 3, generator=gen, dtype=torch.float64)
    table = torch.randn(N + 1, 3, generator=gen, dtype=torch.float64)
    targets = torch.tensor([[2, 2, 5, 7, 7, 7]])
    loss = sampled_softmax_loss(h, table, targets, U, in_batch=True, generator=torch.Generator().manual_seed(1))
    draws = torch.randint(1, N + 1, (U,), generator=torch.Generator().manual_seed(1))
    cand = torch.unique(torch.cat([targets[0], draws]))
    count = torch.tensor([float((targets[0] == c).sum()) for c in cand])
    logits = h[0] @ table[cand].t() - (count + U / N).log()
    labels = torch.tensor([int((cand == t).nonzero()) for t in targets[0]])
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))


def test_per_position_negatives_are_each_targets_own_draws_in_chunks(monkeypatch):
    """per_position=True: target i competes with its own row of draws [P, U]; the chunked, recomputed
    loss and its gradients equal the plain per-row cross-entropy (chunks smaller than P)."""
    from sinkrec import losses

    monkeypatch.setattr(losses, "SAMPLED_CHUNK", 3)
    gen = torch.Generator().manual_seed(5)
    N, D, U = 8, 4, 6
    h = torch.randn(2, 5, D, generator=gen, dtype=torch.float64, requires_grad=True)
    table = torch.randn(N + 1, D, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, N + 1, (2, 5), generator=gen)
    targets[1, 2] = 0
    loss = sampled_softmax_loss(h, table, targets, U, temperature=0.2, per_position=True,
                                generator=torch.Generator().manual_seed(2))
    sel = targets != 0
    hs, pos = h[sel], targets[sel]
    draws = torch.randint(1, N + 1, (len(pos), U), generator=torch.Generator().manual_seed(2))
    assert not all(torch.equal(draws[0], d) for d in draws[1:])  # not one shared set
    expected = []
    for i in range(len(pos)):
        negs = draws[i][draws[i] != pos[i]]
        logits = torch.cat([hs[i] @ table[pos[i]][None].t(), hs[i] @ table[negs].t()]) / 0.2
        expected.append(torch.logsumexp(logits, 0) - logits[0])
    ref = torch.stack(expected).mean()
    torch.testing.assert_close(loss, ref)
    for g, r in zip(torch.autograd.grad(loss, [h, table]), torch.autograd.grad(ref, [h, table])):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("arch", ["sinkrec", "sasrec"])
def test_l2_norm_scores_cosines(arch):
    model = make(arch, l2_norm=True)
    items, ts = random_batch()
    hidden = model(items, ts).hidden
    real = items != 0
    torch.testing.assert_close(hidden[real].norm(dim=-1), torch.ones(int(real.sum())), rtol=1e-4, atol=1e-4)
    assert (hidden[~real] == 0).all()
    table = model.item_embeddings()
    torch.testing.assert_close(table[1:].norm(dim=-1), torch.ones(table.shape[0] - 1), rtol=1e-4, atol=1e-4)
    assert (table[0] == 0).all()  # the pad row stays zero
