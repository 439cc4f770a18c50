"""Product-key memory (Lample et al., 2019): ELASTIC's Interest Memory Retrieval.

M = n_keys^2 slots, each a learned value of width D. A query q = W_q RMSNorm(h) is split into two
halves; slot (i1, i2) scores q[:D/2] . K1[i1] + q[D/2:] . K2[i2]. The m best slots are exactly
among the m x m pairs of each half's top m (a sum can only be in the top m if both of its terms
are in their half's top m), so a read costs O(n_keys * D + m^2 + m * D) instead of O(M * D).
`read_dense` is the O(M * D) reference that scores every slot.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sinkrec.modules.norms import RMSNorm


class ProductKeyMemory(nn.Module):
    """h [..., D] -> softmax-weighted sum of the top-m slot values [..., D] (a residual update)."""

    def __init__(self, d_model: int, n_keys: int, topk: int, sparse: bool = False) -> None:
        """`sparse=True` gives the value table sparse gradients (only the read slots); it needs an
        optimizer that accepts them (SGD, SparseAdam), which AdamW does not."""
        super().__init__()
        if d_model % 2:
            raise ValueError(f"ProductKeyMemory: d_model={d_model} must be even (two half-queries)")
        if not 1 <= topk <= n_keys * n_keys:
            raise ValueError(f"ProductKeyMemory: topk={topk} must be in [1, n_keys^2 = {n_keys * n_keys}]")
        self.n_keys, self.topk = n_keys, topk
        self.norm = RMSNorm(d_model)
        self.query = nn.Linear(d_model, d_model, bias=False)
        half = d_model // 2
        # two sub-banks of half-keys [2, n_keys, D/2]; uniform init as in Lample et al.
        self.keys = nn.Parameter(torch.empty(2, n_keys, half).uniform_(-1 / math.sqrt(half), 1 / math.sqrt(half)))
        self.values = nn.EmbeddingBag(n_keys * n_keys, d_model, mode="sum", sparse=sparse)
        nn.init.normal_(self.values.weight, std=d_model ** -0.5)

    @property
    def n_slots(self) -> int:
        return self.n_keys * self.n_keys

    def half_scores(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., D] -> per-half key scores [P, 2, n_keys], P = prod(...)."""
        q = self.query(self.norm(h)).reshape(-1, 2, h.shape[-1] // 2)  # [P, 2, D/2]
        return torch.einsum("pgd,gnd->pgn", q, self.keys.to(q.dtype))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        s = self.half_scores(h)  # [P, 2, n_keys]
        m, n = self.topk, self.n_keys
        s_top, i_top = s.topk(min(m, n), dim=-1)  # [P, 2, m'] each half's best m' = min(m, n_keys)
        cand = s_top[:, 0, :, None] + s_top[:, 1, None, :]  # [P, m', m'] scores of the candidate pairs
        slot = i_top[:, 0, :, None] * n + i_top[:, 1, None, :]  # [P, m', m'] their slot ids
        best, pos = cand.flatten(1).topk(m, dim=-1)  # [P, m]
        slot = slot.flatten(1).gather(1, pos)  # [P, m]
        w = torch.softmax(best.float(), dim=-1).to(self.values.weight.dtype)  # [P, m]
        out = self.values(slot, per_sample_weights=w)  # [P, D]: sum_i w_i V[slot_i]
        return out.view(*h.shape[:-1], -1).to(h.dtype)

    def read_dense(self, h: torch.Tensor) -> torch.Tensor:
        """Reference: score all M slots, keep the top m, softmax, read. O(M * D) per position."""
        s = self.half_scores(h).float()  # [P, 2, n_keys]
        full = (s[:, 0, :, None] + s[:, 1, None, :]).flatten(1)  # [P, M], slot i1 * n_keys + i2
        if self.topk < self.n_slots:
            kth = full.topk(self.topk, dim=-1).values[:, -1:]  # [P, 1] the m-th best score
            full = full.masked_fill(full < kth, float("-inf"))
        out = torch.softmax(full, dim=-1) @ self.values.weight.float()  # [P, D]
        return out.view(*h.shape[:-1], -1).to(h.dtype)
