"""Window-by-window passes with a carried state equal one long pass (sinkrec/windows.py)."""
from __future__ import annotations

import pytest
import torch
from model_testkit import make, random_batch

from sinkrec.windows import defer_codebook_updates, flush_codebook_updates, windowed_forward, windowed_loss

RECURRENT = ("sinkrec", "gdn", "elastic")


def _batch(T: int = 45):
    # left padding that ends inside a window, spans whole windows, and none
    items, ts = random_batch(B=3, T=T, pads=(7, 0, 23), seed=3)
    return items, ts, torch.roll(items, -1, 1) * (items != 0)


@pytest.mark.parametrize("arch", RECURRENT)
@pytest.mark.parametrize("window", [1, 8, 16, 44])
def test_windowed_forward_equals_one_pass(arch, window):
    model = make(arch, seed=1).eval()
    items, ts, _ = _batch()
    with torch.no_grad():
        ref = model(items, ts).hidden
        got = windowed_forward(model, items, ts, window).hidden
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_the_carried_cache_holds_the_time_gap_across_the_border():
    # with temporal gates the first event of a window must see its gap to the previous window's last
    # event; a model that dropped it would still match where gaps do not matter, so make them matter
    model = make("sinkrec", seed=2).eval()
    items, ts, _ = _batch()
    ts = ts.clone()
    ts[:, 24:] += 10 ** 6 * (items[:, 24:] != 0)  # a long break in the middle of the second window... and
    with torch.no_grad():
        ref = model(items, ts).hidden
        got = windowed_forward(model, items, ts, 24).hidden  # ...exactly at a window border
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", RECURRENT)
def test_windowed_loss_equals_the_one_pass_loss(arch):
    model = make(arch, seed=4).eval()  # eval: no codebook updates, no dropout
    items, ts, targets = _batch()
    with torch.no_grad():
        ref, ref_parts = model.loss(model(items, ts), targets)
        got, parts = windowed_loss(model, items, ts, targets, window=10)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts["ce"], ref_parts["ce"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ("sinkrec", "elastic"))
def test_recomputed_windows_give_the_gradient_of_the_stored_ones(arch):
    # activation checkpointing must not change the (truncated) gradient; in train mode with the codebook
    # updates deferred, the recompute sees the same codebooks and dropout masks as the first forward
    grads = []
    for recompute in (False, True):
        model = make(arch, seed=5, dropout=0.1).train()
        defer_codebook_updates(model)
        items, ts, targets = _batch()
        torch.manual_seed(9)
        loss, _ = windowed_loss(model, items, ts, targets, window=12, recompute=recompute)
        loss.backward()
        flush_codebook_updates(model)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if arch == "sinkrec":
            grads[-1]["codebooks"] = model.blocks[0].memory.codebooks.clone()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_deferred_codebook_updates_happen_once_at_the_flush():
    model = make("sinkrec", seed=6).train()
    memories = defer_codebook_updates(model)
    items, ts, targets = _batch()
    before = [m.codebooks.clone() for m in memories]
    loss, _ = windowed_loss(model, items, ts, targets, window=12)
    loss.backward()  # recomputes every window: must collect nothing twice
    assert all(torch.equal(a, m.codebooks) for a, m in zip(before, memories)), "codebooks moved before the flush"
    n_real = int((items != 0).sum()) * model.cfg.n_loops
    assert sum(z.shape[0] for z in memories[0]._deferred) == n_real
    flush_codebook_updates(model)
    assert not any(torch.equal(a, m.codebooks) for a, m in zip(before, memories))
    assert memories[0]._deferred == []


def test_sasrec_is_not_windowed():
    model = make("sasrec", seed=7).eval()
    items, ts, _ = _batch(T=40)
    with torch.no_grad():
        torch.testing.assert_close(windowed_forward(model, items, ts, 8).hidden, model(items, ts).hidden)
