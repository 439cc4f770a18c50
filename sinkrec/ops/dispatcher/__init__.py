"""Causal dispatcher attention (ELASTIC's Linear Dispatcher Attention, ../shared/ELASTIC.md).

Backends (all share the contract of `naive.py`):
    naive   literal O(T^2 * J) reference: every prefix softmax computed from scratch; no state
    chunk   chunked running-sum form, O(T * J) memory and state carried between chunks; the
            training path, and with T = 1 and `initial_state` the O(1)-per-event streaming path
    auto    chunk
"""

from __future__ import annotations

import torch

from sinkrec.ops.dispatcher.chunk import CHUNK_SIZE, chunk_dispatcher_attention
from sinkrec.ops.dispatcher.naive import naive_dispatcher_attention
from sinkrec.ops.dispatcher.state import DispatcherState

BACKENDS = ("auto", "naive", "chunk")

__all__ = ["BACKENDS", "CHUNK_SIZE", "DispatcherState", "dispatcher_attention"]


def _check_inputs(q: torch.Tensor, a: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  initial_state: DispatcherState | None) -> None:
    for name, x in (("q", q), ("a", a), ("v", v)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"dispatcher_attention: {name} must be a floating-point torch.Tensor")
        if x.dim() != 4:
            raise ValueError(f"dispatcher_attention: {name} must be 4-D [B, T, H, *], got {tuple(x.shape)}")
    if q.shape != v.shape:
        raise ValueError(f"dispatcher_attention: q must match v's [B, T, H, V] = {tuple(v.shape)}, got "
                         f"{tuple(q.shape)} (fold the summary key projection into q)")
    B, T, H, V = v.shape
    if a.shape[:3] != (B, T, H):
        raise ValueError(f"dispatcher_attention: a must be [B, T, H, J] with (B, T, H) = {(B, T, H)}, "
                         f"got {tuple(a.shape)}")
    if mask is not None and (mask.shape != (B, T) or mask.dtype != torch.bool):
        raise ValueError(f"dispatcher_attention: mask must be bool [B, T] = {(B, T)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if initial_state is not None:
        J = a.shape[-1]
        want = {"m": (B, H, J), "num": (B, H, J, V), "den": (B, H, J)}
        for name, shape in want.items():
            got = tuple(getattr(initial_state, name).shape)
            if got != shape:
                raise ValueError(f"dispatcher_attention: initial_state.{name} must be {shape}, got {got}")


def dispatcher_attention(
    q: torch.Tensor,
    a: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: DispatcherState | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, DispatcherState | None]:
    r"""Causal dispatcher attention: J summaries of the prefix, read back by every position.

    Per batch element and head:
        c_j(t) = sum_{s<=t} exp(a_sj) v_s / sum_{s<=t} exp(a_sj)      (a softmax over the prefix)
        y_t    = sum_j softmax_j(scale * q_t . c_j(t)) c_j(t)
    Pads (mask False) are never aggregated; a position whose prefix holds no real event gets y = 0.
    The summaries serve as keys and values of the distribute step; learned key / value maps of the
    summaries are linear, so the caller folds them into q (key map) and into its output projection.

    Args:
        q (torch.Tensor): queries `[B, T, H, V]`.
        a (torch.Tensor): dispatcher logits `[B, T, H, J]` (e.g. D_j . key_s / sqrt(K)). The chunk
            backend is exact while logits within one chunk span < ~80 (bound them, e.g. soft-cap).
        v (torch.Tensor): values `[B, T, H, V]` that the dispatchers aggregate.
        mask (Optional[torch.Tensor]): `[B, T]` bool, False = pad. All positions are real when None.
        scale (Optional[float]): multiplies q . c_j; `1 / sqrt(V)` when None.
        initial_state (Optional[DispatcherState]): the prefix before position 1 (chunk backend).
        output_final_state (bool): also return the state after the last position (chunk backend).
        backend (str): "auto" | "naive" | "chunk". All compute in float32 (float64 stays float64).

    Returns:
        y (torch.Tensor): `[B, T, H, V]` in the dtype of v.
        final_state (Optional[DispatcherState]): in float32 (float64 for float64 inputs) if
            `output_final_state`, so a stream of T = 1 calls does not round the state every event.
    """
    _check_inputs(q, a, v, mask, initial_state)
    if backend not in BACKENDS:
        raise ValueError(f"dispatcher_attention: backend={backend!r} is not one of {BACKENDS}")
    if scale is None:
        scale = v.shape[-1] ** -0.5
    # float32 inside, whatever an enclosing autocast region would pick for the matmuls
    with torch.autocast(v.device.type, enabled=False):
        if backend == "naive":
            if initial_state is not None or output_final_state:
                raise ValueError("dispatcher_attention: backend='naive' keeps no state; use 'chunk' to stream")
            y, final = naive_dispatcher_attention(q, a, v, mask, scale), None
        else:
            y, final = chunk_dispatcher_attention(q, a, v, mask, scale, initial_state, output_final_state)
    return y.to(v.dtype), final
