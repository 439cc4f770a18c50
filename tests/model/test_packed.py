"""Packed (ragged) batches: B = 1, sequences back to back, fla's `cu_seqlens` (sinkrec/modules/packed.py).

Every cross-position operation of SinkRec / GDN must stop at the sequence boundaries, so a packed
batch gives, position for position, what each sequence gives on its own: the hidden states, the
loss (the packed loss is the mean over all positions, so it equals the per-sequence losses weighted
by their lengths when every position has a target) and the parameter gradients."""
from __future__ import annotations

import pytest
import torch
from model_testkit import make

from sinkrec.layers.tdgd import recurring_codes
from sinkrec.model import time_features
from sinkrec.modules import ShortConv
from sinkrec.modules.packed import packed_index
from sinkrec.windows import defer_codebook_updates

LENGTHS = (9, 1, 33, 14)  # one event alone; one sequence longer than a delta-rule chunk (32)
N_ITEMS = 40
SIZES = {"d_model": 16, "n_heads": 2, "n_blocks": 2, "n_loops": 2, "num_items": N_ITEMS}


def _sequences(lengths=LENGTHS, seed: int = 0, n_items: int = N_ITEMS):
    """Per sequence (items [L], ts [L], targets [L]); every position has a target. A few items recur
    so the memory's code tuples repeat; each sequence starts at its own time (a packed row jumps
    back and forth in time at the boundaries, which phi must not see)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for L in lengths:
        habits = torch.randint(1, n_items + 1, (3,), generator=gen)
        items = torch.randint(1, n_items + 1, (L,), generator=gen)
        items = torch.where(torch.rand(L, generator=gen) < 0.4, habits[torch.arange(L) % 3], items)
        start = 1_700_000_000 + int(torch.randint(0, 10 ** 7, (1,), generator=gen))
        ts = start + torch.cumsum(torch.randint(0, 5 * 3600, (L,), generator=gen), 0)
        out.append((items, ts, torch.randint(1, n_items + 1, (L,), generator=gen)))
    return out


def _pack(seqs):
    items, ts, targets = (torch.cat([s[i] for s in seqs])[None] for i in range(3))
    cu = torch.tensor([0, *torch.tensor([len(s[0]) for s in seqs]).cumsum(0).tolist()], dtype=torch.int32)
    return items, ts, targets, cu


def _run(model, items, ts, targets, cu=None):
    model.zero_grad()
    out = model(items, ts, cu_seqlens=cu)
    loss, parts = model.loss(out, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.hidden.detach(), loss.detach(), parts, grads


def _model(arch, backend, train: bool, **overrides):
    model = make(arch, seed=3, kernel_backend=backend, **{**SIZES, **overrides})
    if train:  # coverage supervision runs in training mode only; dropout is 0 (tiny_config) and the
        defer_codebook_updates(model)  # codebooks are frozen, so the mode changes nothing else
        return model.train()
    return model.eval()


CASES = [
    ("gdn", {}, False),
    ("sinkrec", {}, False),
    # coverage supervision (training mode): "occurred earlier in the same sequence"; few codes so
    # that code tuples recur, inside a sequence and across its boundaries
    ("sinkrec", {"coverage_weight": 0.5, "n_codes": 4}, True),
    # ... with the item-recurrence target (the items recur inside and across sequences)
    ("sinkrec", {"coverage_weight": 0.5, "coverage_target": "items"}, True),
    # rho's repeat term: "occurred earlier" must stop at the boundaries in eval mode too
    ("sinkrec", {"repeat_gate": True}, False),
]


@pytest.mark.parametrize("backend", ["recurrent", "chunk"])
@pytest.mark.parametrize(("arch", "overrides", "train"), CASES)
def test_packed_batch_equals_each_sequence_alone(arch, overrides, train, backend):
    model = _model(arch, backend, train, **overrides)
    seqs = _sequences()
    items, ts, targets, cu = _pack(seqs)
    hidden, loss, parts, grads = _run(model, items, ts, targets, cu)
    assert hidden.shape == (1, sum(LENGTHS), 16)

    n_total = sum(LENGTHS)
    ref_loss, ref_grads = torch.zeros(()), {}
    for s, (it, t, y) in enumerate(seqs):
        h_s, loss_s, _, grads_s = _run(model, it[None], t[None], y[None])
        lo, hi = int(cu[s]), int(cu[s + 1])
        torch.testing.assert_close(hidden[:, lo:hi], h_s, atol=2e-5, rtol=1e-4, msg=f"sequence {s}")
        w = len(it) / n_total  # every position has a target: the packed means weight by length
        ref_loss = ref_loss + w * loss_s
        for name, g in grads_s.items():
            ref_grads[name] = ref_grads.get(name, 0) + w * g
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 5
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)
    if train:
        assert parts["aux"] > 0
    # the inputs exercise the boundaries: the same row read as ONE sequence differs
    with torch.no_grad():
        joined = model(items, ts).hidden
    assert not torch.allclose(joined[:, int(cu[2]):], hidden[:, int(cu[2]):], atol=1e-3)


def test_coverage_target_differs_across_boundaries():
    # guards the coverage case above: its aux loss would not see a recurring_codes that ignored the
    # boundaries unless some code tuple recurs ACROSS sequences without recurring inside them
    model = _model("sinkrec", "chunk", True, coverage_weight=0.5, n_codes=4)
    items, ts, _, cu = _pack(_sequences())
    with torch.no_grad():
        out = model(items, ts, cu_seqlens=cu, return_states=True)
    mask = torch.ones_like(items, dtype=torch.bool)
    codes = out.states[0]["codes"]
    assert not torch.equal(recurring_codes(codes, mask, 4, cu), recurring_codes(codes, mask, 4))


def test_recurring_codes_packed_equals_per_sequence():
    gen = torch.Generator().manual_seed(1)
    lengths = (5, 0, 12, 1, 9)  # an empty sequence too
    codes = [torch.randint(0, 3, (L, 2), generator=gen) for L in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    got = recurring_codes(torch.cat(codes)[None], torch.ones(1, sum(lengths), dtype=torch.bool), 3, cu)[0]
    want = torch.cat([recurring_codes(c[None], torch.ones(1, len(c), dtype=torch.bool), 3)[0] for c in codes])
    assert torch.equal(got, want) and want.any() and not want.all()


def test_short_conv_packed_equals_left_padded_starts():
    torch.manual_seed(0)
    conv = ShortConv(6, kernel_size=4)
    lengths = (2, 7, 0, 1, 5)
    xs = [torch.randn(1, L, 6, requires_grad=True) for L in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    got, buf = conv(torch.cat(xs, 1), cu_seqlens=cu)
    assert buf is None
    want = torch.cat([conv(x)[0] if x.shape[1] else x * 0 for x in xs], 1)  # conv1d refuses T = 0
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    gx = torch.autograd.grad(got, xs, g)
    gx_ref = torch.autograd.grad(want, xs, g)
    for a, b in zip(gx, gx_ref):
        torch.testing.assert_close(a, b)


def test_time_features_restart_at_each_sequence():
    ts = torch.tensor([[100, 160, 50, 90, 95, 10_000]])  # the third sequence starts later, the second earlier
    cu = torch.tensor([0, 2, 5, 6])
    phi = time_features(ts, torch.ones_like(ts, dtype=torch.bool), 10.0, cu_seqlens=cu)
    want = torch.log1p(torch.tensor([[0.0, 60.0, 0.0, 40.0, 5.0, 0.0]]) / 10.0)
    torch.testing.assert_close(phi, want)


def test_packed_index():
    seq, pos = packed_index(torch.tensor([0, 3, 3, 4, 6], dtype=torch.int32), 6)
    assert seq.tolist() == [0, 0, 0, 2, 3, 3] and pos.tolist() == [0, 1, 2, 0, 0, 1]


@pytest.mark.parametrize("arch", ["sasrec", "elastic"])
def test_attention_archs_refuse_packed_batches(arch):
    model = make(arch, **SIZES).eval()
    items, ts, _, cu = _pack(_sequences((3, 4)))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(items, ts, cu_seqlens=cu)


def test_packed_batch_checks():
    model = make("gdn", **SIZES).eval()
    items, ts, _, cu = _pack(_sequences((3, 4)))
    with pytest.raises(ValueError, match="not supported together"):
        model(items, ts, cu_seqlens=cu, cache=model.init_state(1))
    with pytest.raises(ValueError, match=r"\[1, N\] packed"):
        model(items.view(1, 7).expand(2, 7), ts.expand(2, 7), cu_seqlens=cu)
    with pytest.raises(ValueError, match="non-decreasing from 0 to N = 7"):
        model(items, ts, cu_seqlens=torch.tensor([0, 3, 6]))
    padded = items.clone()
    padded[0, 3] = 0
    with pytest.raises(ValueError, match="no pad items"):
        model(padded, ts, cu_seqlens=cu)
