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
