"""ELASTIC block (../shared/ELASTIC.md): Linear Dispatcher Attention + Interest Memory Retrieval.

Data flow of one block:
    h --LDA----> h + dropout(W_o y)      J dispatchers summarise the prefix, every position reads them
      --IMR----> h + dropout(pkm(h))     product-key memory, top-m of n_keys^2 slots per position
      --SwiGLU-> h + ffn(h)
Both mixers are causal by construction; the LDA keeps a J x (K + 2) state per head, so a streaming
step costs O(1) per event.
"""
from __future__ import annotations

import torch
from torch import nn

from sinkrec.config import SinkRecConfig
from sinkrec.modules import ProductKeyMemory, RMSNorm, SwiGLU
from sinkrec.ops.dispatcher import DispatcherState, dispatcher_attention

# Dispatcher logits are soft-capped to +-LOGIT_CAP (cap * tanh(a / cap)): the chunked form is exact
# while logits within a chunk span < ~80 (see ops/dispatcher/chunk.py); 30 leaves margin
# and is the identity to within 4% for |a| < 10.
LOGIT_CAP = 30.0


class LinearDispatcherAttention(nn.Module):
    """Returns the residual update W_o y [B, T, D] (not h + update) and the streaming state.

    The spec's summary key / value maps (W_ck, W_cv) are linear maps applied after a linear
    aggregation, so they are folded into W_q and W_o: q . (W_ck c) = (W_ck^T q) . c, and
    W_o W_cv = one matrix. Same function class, two fewer per-head matmuls.
    """

    def __init__(self, cfg: SinkRecConfig) -> None:
        super().__init__()
        D = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, D // cfg.n_heads  # divisibility: SinkRecConfig.validate
        self.norm = RMSNorm(D)
        self.qkv = nn.Linear(D, 3 * D, bias=False)  # query, key, value of every position
        # D [H, J, K]: the dispatchers ("interest experts") of each head
        self.dispatchers = nn.Parameter(torch.randn(cfg.n_heads, cfg.n_dispatchers, self.head_dim))
        self.proj = nn.Linear(D, D, bias=False)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, state: DispatcherState | None = None,
                return_state: bool = False) -> tuple[torch.Tensor, DispatcherState | None]:
        """h [B, T, D], mask [B, T] bool (False = pad), state from the previous call or None."""
        B, T, D = h.shape
        H, K = self.n_heads, self.head_dim
        q, key, val = self.qkv(self.norm(h)).view(B, T, 3, H, K).unbind(2)  # 3 x [B, T, H, K]
        a = torch.einsum("bthk,hjk->bthj", key, self.dispatchers.to(key.dtype)) * K ** -0.5  # [B, T, H, J]
        a = LOGIT_CAP * torch.tanh(a / LOGIT_CAP)
        y, state = dispatcher_attention(q, a, val, mask=mask, scale=K ** -0.5, initial_state=state,
                                        output_final_state=return_state)
        return self.proj(y.reshape(B, T, D)), state  # [B, T, H, K] -> [B, T, D]

    def init_state(self, B: int, device=None) -> DispatcherState:
        J, H, K = self.dispatchers.shape[1], self.n_heads, self.head_dim
        device = device or self.dispatchers.device
        return DispatcherState(m=torch.full((B, H, J), float("-inf"), device=device),
                               num=torch.zeros(B, H, J, K, device=device),
                               den=torch.zeros(B, H, J, device=device))


class ElasticBlock(nn.Module):
    def __init__(self, cfg: SinkRecConfig) -> None:
        super().__init__()
        self.lda = LinearDispatcherAttention(cfg)
        self.imr = ProductKeyMemory(cfg.d_model, cfg.n_mem_keys, cfg.mem_topk)
        self.ffn = SwiGLU(cfg.d_model, dropout=cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, state: DispatcherState | None = None,
                return_state: bool = False) -> tuple[torch.Tensor, DispatcherState | None]:
        """h [B, T, D] -> (h [B, T, D], LDA state after the last position if return_state)."""
        y, state = self.lda(h, mask, state, return_state)
        h = h + self.dropout(y)
        h = h + self.dropout(self.imr(h))
        return h + self.ffn(h), state
