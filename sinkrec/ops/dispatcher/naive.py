"""Causal dispatcher attention, the literal O(T^2 * J) reference (the spec every fast path must match).

For each position t every dispatcher's softmax over the prefix 1..t is computed explicitly from
scratch, exactly as ../shared/ELASTIC.md writes it. Float32 (float64 stays float64); no state.
"""

from __future__ import annotations

import torch


def naive_dispatcher_attention(
    q: torch.Tensor,
    a: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """
    Args:
        q: [B, T, H, V] queries of the distribute step
        a: [B, T, H, J] dispatcher logits a_js
        v: [B, T, H, V] values the dispatchers aggregate
        mask: [B, T] bool, False = pad (never aggregated), or None
        scale: multiplies q . c_j

    Returns:
        y: [B, T, H, V] in the accumulation dtype; 0 where the prefix holds no real position
    """
    B, T, H, V = v.shape
    acc = torch.promote_types(v.dtype, torch.float32)
    q, a, v = (x.to(acc) for x in (q, a, v))
    if mask is not None:
        a = a.masked_fill(~mask[:, :, None, None], float("-inf"))
    ys = []
    for t in range(T):
        a_t = a[:, : t + 1]  # [B, t+1, H, J]
        w = torch.softmax(a_t, dim=1)  # per dispatcher, a softmax over the prefix s <= t
        w = torch.nan_to_num(w, nan=0.0)  # an all-pad prefix (all -inf) summarises to 0
        c = torch.einsum("bshj,bshv->bhjv", w, v[:, : t + 1])  # [B, H, J, V]: c_j(t)
        s = scale * torch.einsum("bhv,bhjv->bhj", q[:, t], c)  # [B, H, J]
        p = torch.softmax(s, dim=-1)  # position t attends over the J summaries of its prefix
        ys.append(torch.einsum("bhj,bhjv->bhv", p, c))
    return torch.stack(ys, dim=1) if T > 0 else v.new_zeros(B, 0, H, V)  # [B, T, H, V]
