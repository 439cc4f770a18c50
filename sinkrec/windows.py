"""Long histories window by window: the recurrent state is carried from one window to the next.

A batch [B, T] longer than `window` events is left-padded to a multiple of `window` and run as
T / window consecutive windows of the same B sequences. Each window continues from the cache that
the previous one left (`model.forward(cache=...)`: the delta-rule state, the conv buffers and the
last timestamp), so the hidden states equal those of one pass over [B, T] (exact in the forward
direction; tests/model/test_windows.py). What that buys:

    evaluation  `windowed_forward`: activations of one window at a time, memory O(B x window)
    training    `windowed_loss`: each window's forward is recomputed in the backward pass
                (torch.utils.checkpoint), and the cache enters the next window detached: truncated
                back-propagation through time. The graph holds one window's activations at a
                time, so peak memory is bounded by B x window whatever T is; compute is one extra
                forward per window. The loss value equals the one-pass loss; the gradient stops at
                window borders (the state's dependence on earlier windows is not differentiated).

Only recurrent archs (SinkRec, GDN, ELASTIC) carry state; SASRec keeps its attention window.
The RVQ memories must not change their codebooks between a window's forward and its recompute,
so a windowed trainer defers their updates to after the backward (`RVQMemory.defer_updates`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sinkrec.model import ModelOutput, SeqRecModel
from sinkrec.modules.rvq import RVQMemory, recomputing


def carries_state(model: SeqRecModel) -> bool:
    return model.cfg.arch != "sasrec"


def _detach(tree):
    """A carried cache, cut from the graph and copied: a tensor that is a view of a larger one (a
    kernel's per-chunk states) would keep the whole of it alive for the rest of the batch."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _detach(v) for k, v in tree.items()}
    if hasattr(tree, "_fields"):  # a NamedTuple state (ELASTIC's DispatcherState)
        return type(tree)(*(_detach(v) for v in tree))
    if isinstance(tree, list | tuple):
        return type(tree)(_detach(v) for v in tree)
    return tree


def _windows(T: int, window: int) -> tuple[int, int]:
    """(left pad, number of windows) that cut T events into windows of `window`."""
    n = -(-T // window)
    return n * window - T, n


def _pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(x, (pad, 0)) if pad else x


def windowed_forward(model: SeqRecModel, items: torch.Tensor, ts: torch.Tensor, window: int) -> ModelOutput:
    """model(items, ts) computed `window` events at a time; hidden [B, T, D] equals one pass.
    aux_loss is the real-position-weighted mean of the windows' (what one pass averages)."""
    T = items.shape[1]
    if T <= window or not carries_state(model):
        return model(items, ts)
    pad, n = _windows(T, window)
    items, ts = _pad(items, pad), _pad(ts, pad)
    cache, hidden = model.init_state(items.shape[0]), []
    aux, real = items.new_zeros((), dtype=torch.float32), (items != 0).sum().clamp_min(1)
    for j in range(n):
        sl = slice(j * window, (j + 1) * window)
        out = model(items[:, sl], ts[:, sl], cache=cache)
        cache = _detach(out.cache)
        hidden.append(out.hidden)
        aux = aux + out.aux_loss * (items[:, sl] != 0).sum() / real
    return ModelOutput(torch.cat(hidden, 1)[:, pad:], aux)


def _window_loss(model: SeqRecModel, items: torch.Tensor, ts: torch.Tensor, targets: torch.Tensor,
                 cache: dict, n_targets: torch.Tensor, n_real: torch.Tensor):
    """One window: (its share of the batch loss, its CE share, its aux share, the cache after it)."""
    out = model(items, ts, cache=cache)
    loss, _ = model.loss(out, targets)
    ce = (loss - out.aux_loss) * (targets > 0).sum() / n_targets  # back to a sum over the batch's targets
    aux = out.aux_loss * (items != 0).sum() / n_real
    return ce + aux, ce.detach(), aux.detach(), _detach(out.cache)


def windowed_loss(model: SeqRecModel, items: torch.Tensor, ts: torch.Tensor, targets: torch.Tensor,
                  window: int, recompute: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """model.loss(model(items, ts), targets) trained `window` events at a time (module docstring).
    Returns (loss, {"ce", "aux"}) as `SeqRecModel.loss` does; the value equals the one-pass loss."""
    T = items.shape[1]
    if T <= window or not carries_state(model):
        return model.loss(model(items, ts), targets)
    pad, n = _windows(T, window)
    items, ts, targets = _pad(items, pad), _pad(ts, pad), _pad(targets, pad)
    n_targets, n_real = (targets > 0).sum().clamp_min(1), (items != 0).sum().clamp_min(1)
    cache = model.init_state(items.shape[0])
    total = ce = aux = None
    for j in range(n):
        sl = slice(j * window, (j + 1) * window)
        if not (items[:, sl] != 0).any():  # left padding only: the state stays at its start
            continue
        args = (model, items[:, sl], ts[:, sl], targets[:, sl], cache, n_targets, n_real)
        if recompute and torch.is_grad_enabled():
            part, c, a, cache = checkpoint(_window_loss, *args, use_reentrant=False,
                                           context_fn=lambda: (contextlib.nullcontext(), recomputing()))
        else:
            part, c, a, cache = _window_loss(*args)
        total, ce, aux = (part, c, a) if total is None else (total + part, ce + c, aux + a)
    return total, {"ce": ce, "aux": aux}


def defer_codebook_updates(model: torch.nn.Module) -> list[RVQMemory]:
    """Make every RVQ memory of `model` collect its patterns until `flush_codebook_updates`."""
    memories = [m for m in model.modules() if isinstance(m, RVQMemory)]
    for m in memories:
        m.defer_updates()
    return memories


def flush_codebook_updates(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, RVQMemory):
            m.flush_updates()
