"""Recurrent gated delta rule: the per-step reference (the spec every fast path must match).

Also the streaming-inference path: with T=1 and `initial_state` it costs O(H*K*V) per event.
"""

from __future__ import annotations

import itertools

import torch


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    Args:
        q, k: [B, T, H, K]
        v: [B, T, H, V]
        g: [B, T, H] log decay
        beta: [B, T, H]
        scale: multiplies q
        initial_state: [B, H, K, V] ([N, H, K, V] with cu_seqlens), optional
        cu_seqlens: [N + 1] sequence starts in T (B = 1): each sequence runs from its own initial state

    Returns:
        o: [B, T, H, V] in the accumulation dtype (float32, or float64 for float64 inputs)
        final_state: [B, H, K, V] ([N, H, K, V] with cu_seqlens) in the accumulation dtype if
            output_final_state else None
    """
    if cu_seqlens is not None:  # one sequence at a time, each from its own initial state
        bounds = cu_seqlens.tolist()
        outs, finals = [], []
        for i, (bos, eos) in enumerate(itertools.pairwise(bounds)):
            h0 = None if initial_state is None else initial_state[i : i + 1]
            o, ht = recurrent_gated_delta_rule(*(x[:, bos:eos] for x in (q, k, v, g, beta)), scale, h0, True)
            outs.append(o)
            finals.append(ht)
        return torch.cat(outs, dim=1), (torch.cat(finals) if output_final_state else None)
    B, T, H, K, V = *k.shape, v.shape[-1]
    # at least fp32 so that the per-step accumulation does not drift; float64 stays float64
    acc = torch.promote_types(v.dtype, torch.float32)
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    q = q * scale
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    o = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        # delta rule: write beta * (target - current prediction of the decayed state)
        v_new = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S))
        S = S + k[:, t, :, :, None] * v_new[:, :, None, :]
        o.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(o, dim=1) if T > 0 else q.new_zeros(B, 0, H, V)  # [B, T, H, V]
    return o, (S if output_final_state else None)
