"""Coverage supervision (SinkRecConfig.coverage_weight): rho learns to open on recurring patterns."""
from __future__ import annotations

import pytest
import torch
from model_testkit import habit_drift_batch, make, train_next_item

from sinkrec.layers.tdgd import recurring_codes


def test_recurring_codes_marks_later_occurrences_of_a_tuple():
    codes = torch.tensor([[[1, 2], [1, 3], [1, 2], [0, 0], [1, 3], [1, 2]]])  # [1, 6, 2]
    mask = torch.tensor([[False, True, True, True, True, True]])  # position 0 is a pad
    got = recurring_codes(codes, mask, n_codes=4)
    # (1,2) first at 2 (the pad at 0 does not count), (1,3) first at 1; later copies recur
    assert got.tolist() == [[False, False, False, False, True, True]]


def test_zero_weight_is_the_spec_and_positive_weight_adds_a_trained_term():
    items, ts = habit_drift_batch(B=4, T=24, N=40)
    base, sup = make("sinkrec", seed=0).train(), make("sinkrec", seed=0, coverage_weight=1.0).train()
    torch.manual_seed(1)
    a = base(items, ts).aux_loss
    torch.manual_seed(1)
    out = sup(items, ts)
    assert out.aux_loss > a  # the same commitment term plus a positive BCE
    out.aux_loss.backward()
    rho_params = [blk.tdgd.s_rho.grad for blk in sup.blocks] + [blk.tdgd.b_rho.grad for blk in sup.blocks]
    assert all(g is not None and g.abs().sum() > 0 for g in rho_params)
    sup.eval()
    assert sup(items, ts).aux_loss == base.eval()(items, ts).aux_loss  # no coverage term outside training


def test_item_target_is_item_recurrence_and_changes_the_loss():
    items, ts = habit_drift_batch(B=4, T=24, N=40)
    codes, by_items = (make("sinkrec", seed=0, coverage_weight=1.0, coverage_target=t).train() for t in ("codes", "items"))
    torch.manual_seed(1)
    a = codes(items, ts).aux_loss
    torch.manual_seed(1)
    b = by_items(items, ts).aux_loss
    assert a != b  # same weights and codes, another target
    # the target handed to every block: the item occurred at an earlier real position of the row
    seen = []
    for blk in by_items.blocks:
        blk.register_forward_hook(lambda m, args, out: seen.append(args[6]), with_kwargs=False)
    by_items(items, ts)
    want = torch.zeros_like(items, dtype=torch.bool)
    for r in range(items.shape[0]):
        for t in range(items.shape[1]):
            want[r, t] = bool((items[r, :t] == items[r, t]).any())
    assert len(seen) == 4 and all(torch.equal(x, want) for x in seen)
    with pytest.raises(ValueError, match="coverage_target"):
        make("sinkrec", coverage_target="item")


@pytest.mark.trains  # asserts on a training outcome: also run under ATEN_CPU_CAPABILITY=default (.ci/run)
def test_supervised_rho_opens_on_recurring_patterns():
    items, ts = habit_drift_batch(B=8, T=48, N=40, seed=3)
    gaps = []
    for weight in (0.0, 1.0):
        model = make("sinkrec", seed=0, coverage_weight=weight)
        train_next_item(model, items, ts, steps=60, lr=3e-3)
        model.eval()
        with torch.no_grad():
            out = model(items, ts, return_states=True)
        rec = out.states[-1]
        target = recurring_codes(rec["codes"], items != 0, model.cfg.n_codes)
        rho = rec["rho"].mean(-1)  # [B, T]
        gaps.append((rho[target].mean() - rho[~target].mean()).item())
    assert gaps[1] > 0.2 and gaps[1] > gaps[0] + 0.2, gaps


def _first_occurrence(items: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: the item did NOT occur at an earlier position of its row (a loop, the oracle)."""
    out = torch.zeros_like(items, dtype=torch.bool)
    for r in range(items.shape[0]):
        for t in range(items.shape[1]):
            out[r, t] = not bool((items[r, :t] == items[r, t]).any())
    return out


def test_repeat_gate_is_the_spec_at_init_and_opens_rho_on_repeats_only():
    items, ts = habit_drift_batch(B=4, T=24, N=40)
    spec, rep = make("sinkrec", seed=0).eval(), make("sinkrec", seed=0, repeat_gate=True).eval()
    with torch.no_grad():
        a, b = spec(items, ts, return_states=True), rep(items, ts, return_states=True)
    torch.testing.assert_close(b.hidden, a.hidden, rtol=0, atol=0)  # c_rep = 0: the spec's rho
    new = _first_occurrence(items)
    assert new.any() and (~new).any()
    for blk in rep.blocks:
        blk.tdgd.c_rep.data.fill_(3.0)  # x REPEAT_SCALE 8: +24 on rho's logit
    with torch.no_grad():
        c = rep(items, ts, return_states=True)
    # pass 0 sees the same inputs in both models: rho is unchanged on first occurrences, ~1 on repeats
    rho_spec, rho_rep = a.states[0]["rho"], c.states[0]["rho"]
    torch.testing.assert_close(rho_rep[new], rho_spec[new])
    assert rho_rep[~new].min() > 0.999
    # and it reaches the write: repeats are (almost) not written, first occurrences are written as before
    assert c.states[0]["beta"][~new].max() < 1e-3
    torch.testing.assert_close(c.states[0]["beta"][new], a.states[0]["beta"][new])
    for blk in rep.blocks:  # back to 0: a saturated rho passes no gradient
        blk.tdgd.c_rep.data.zero_()
    rep.train()
    rep(items, ts).hidden.square().sum().backward()
    assert all(blk.tdgd.c_rep.grad is not None and blk.tdgd.c_rep.grad.abs().sum() > 0 for blk in rep.blocks)


def test_repeat_gate_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="repeat_gate"):
        make("gdn", repeat_gate=True)
    with pytest.raises(ValueError, match="triton"):
        make("sinkrec", repeat_gate=True, gate_backend="triton")
    model = make("sinkrec", repeat_gate=True).eval()
    items, ts = habit_drift_batch(B=2, T=8, N=40)
    with pytest.raises(ValueError, match="whole sequences"):
        model(items, ts, cache=model.init_state(2))


@pytest.mark.trains  # asserts on a training outcome: also run under ATEN_CPU_CAPABILITY=default (.ci/run)
def test_item_supervised_rho_with_repeat_gate_opens_on_repeated_items():
    items, ts = habit_drift_batch(B=8, T=48, N=40, seed=3)
    model = make("sinkrec", seed=0, coverage_weight=1.0, coverage_target="items", repeat_gate=True)
    train_next_item(model, items, ts, steps=60, lr=3e-3)
    model.eval()
    with torch.no_grad():
        out = model(items, ts, return_states=True)
    new, mask = _first_occurrence(items), items != 0
    for rec in out.states:  # every (loop, block) pass
        rho = rec["rho"].mean(-1)
        gap = (rho[~new & mask].mean() - rho[new & mask].mean()).item()
        assert gap > 0.3, gap
