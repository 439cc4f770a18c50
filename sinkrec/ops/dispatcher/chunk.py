"""Chunked causal dispatcher attention in PyTorch: O(T * C * (V + J) + T * J * V), the training path.

Per batch element and head, positions i, s of a chunk of C (local, s <= i), dispatchers j:
the prefix summaries c_j(i) = num_ij / den_ij are never materialised ([T, J, V] per head would be
the largest tensor of the layer). With E_sj = exp(a_sj - M_j), M the running max of a up to the
end of the chunk, and (R, Rd) the carried numerator / denominator rescaled to M,

    den_ij = Rd_j + sum_{s<=i} E_sj                                       [C, J]
    q_i . num_ij = (Q R^T)_ij + ((Q V^T o L) E)_ij,   L_is = [s <= i]     [C, J]
    P = softmax_j(scale * q . num / den),  W = P / den                    [C, J]
    y = W R + ((W E^T) o L) V                                             [C, V]

and the state handed to the next chunk is R + E^T V, Rd + sum_s E_s, M. Everything but (R, Rd) is
independent across chunks and runs batched over many chunks at once (E and E^T V over all of them,
the outputs in groups, below); the hand-off is a Python loop of two elementwise ops per chunk.

Exactness: the result does not depend on M (it cancels between num and den), so M is a detached
constant. Using the chunk-end max instead of each position's own running max is exact as long as
a position's prefix max is within ~80 nats of M (float32 exp underflows beyond); the ELASTIC layer
soft-caps its logits to +-30, which guarantees it.

The chunk outputs run in groups of ~GROUP_CHUNK_HEADS chunk-heads through `IntraChunkFunction`,
which keeps only its inputs (Q, V, E, R, Rd: O(T * (2V + J) + T / C * J * V)) and recomputes each
group's [C, C] / [C, J] products in backward, differentiating them with autograd group by group.
Measured on the op alone (B * T = 16k, J = V = 32, 1 thread): peak RSS of fwd+bwd 143-155 MB
instead of 250-258 MB with every intermediate kept, same time (88-115 ms vs 101-131 ms).
(`torch.utils.checkpoint` on the same groups raised the peak instead, to 276-313 MB.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sinkrec.ops.dispatcher.state import DispatcherState

# C = 32: fwd+bwd of one layer (B * T = 16k, J = V = 32, 1 thread) measured 103 / 91 / 111 ms at
# T = 200 / 4096 / 16384, against 123 / 105 / 106 ms for C = 64 and 94 / 89 / 135 ms for C = 16
CHUNK_SIZE = 32
# chunk-heads (B * H * chunks) whose intermediates exist at once; 32-128 measured alike, 512 slower
GROUP_CHUNK_HEADS = 64


def _to_chunks(x: torch.Tensor, C: int, value: float = 0.0) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, N, C, D], padded with `value` at the end of T to N*C."""
    B, T, H, D = x.shape
    N = -(-T // C)
    x = F.pad(x, (0, 0, 0, 0, 0, N * C - T), value=value)
    return x.view(B, N, C, H, D).permute(0, 3, 1, 2, 4)


def _intra_chunk(Q: torch.Tensor, Vc: torch.Tensor, E: torch.Tensor, R: torch.Tensor,
                 Rd: torch.Tensor) -> torch.Tensor:
    """Outputs y [..., C, V] of chunks given their weights E [..., C, J] and carried state
    R [..., J, V], Rd [..., J]."""
    C = Q.shape[-2]
    L = torch.ones(C, C, dtype=torch.bool, device=Q.device).tril()  # L_is = [s <= i]
    denom = Rd[..., None, :] + E.cumsum(dim=-2)  # [..., C, J]
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))  # empty prefix: num = 0, y = 0
    QV = (Q @ Vc.transpose(-1, -2)).masked_fill(~L, 0.0)  # [..., C, C]
    scores = (QV @ E + Q @ R.transpose(-1, -2)) / denom  # [..., C, J]: scale * q_i . c_j(i)
    W = torch.softmax(scores, dim=-1) / denom  # [..., C, J]
    WE = (W @ E.transpose(-1, -2)).masked_fill(~L, 0.0)  # [..., C, C]
    return W @ R + WE @ Vc  # [..., C, V]


class IntraChunkFunction(torch.autograd.Function):
    """`_intra_chunk` that keeps only its inputs for backward and recomputes the rest there, one
    group of chunks at a time (autograd inside each group), so neither pass holds more than one
    group's [C, C] and [C, J] intermediates."""

    @staticmethod
    def forward(ctx, Q, Vc, E, R, Rd, group: int):
        ctx.save_for_backward(Q, Vc, E, R, Rd)
        ctx.group = group
        pieces = zip(*(x.split(group, dim=2) for x in (Q, Vc, E, R, Rd)), strict=True)
        return torch.cat([_intra_chunk(*xs) for xs in pieces], dim=2)

    @staticmethod
    def backward(ctx, dy):
        inputs = ctx.saved_tensors
        grads = [torch.empty_like(x) for x in inputs]
        for n0 in range(0, dy.shape[2], ctx.group):
            sl = slice(n0, n0 + ctx.group)
            with torch.enable_grad():
                xs = [x[:, :, sl].detach().requires_grad_() for x in inputs]
                gs = torch.autograd.grad(_intra_chunk(*xs), xs, dy[:, :, sl])
            for g_full, g in zip(grads, gs, strict=True):
                g_full[:, :, sl] = g
        return (*grads, None)


def chunk_dispatcher_attention(
    q: torch.Tensor,
    a: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    initial_state: DispatcherState | None = None,
    output_final_state: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, DispatcherState | None]:
    """
    Args:
        q: [B, T, H, V];  a: [B, T, H, J];  v: [B, T, H, V];  mask: [B, T] bool or None
        scale: multiplies q . c_j
        initial_state: DispatcherState (m [B, H, J], num [B, H, J, V], den [B, H, J]) or None
        chunk_size: C (min(C, T) is used)

    Returns:
        y: [B, T, H, V] in the accumulation dtype
        final_state: DispatcherState in the accumulation dtype if output_final_state else None
    """
    B, T, H, V = v.shape
    J = a.shape[-1]
    acc = torch.promote_types(v.dtype, torch.float32)
    q, a, v = (x.to(acc) for x in (q, a, v))
    if mask is not None:
        a = a.masked_fill(~mask[:, :, None, None], float("-inf"))
    if initial_state is None:
        m0 = a.new_full((B, H, J), float("-inf"))
        num0, den0 = a.new_zeros(B, H, J, V), a.new_zeros(B, H, J)
    else:
        m0, num0, den0 = (x.to(acc) for x in initial_state)
    if T == 0:
        y = v.new_zeros(B, 0, H, V)
        return y, (DispatcherState(m0, num0, den0) if output_final_state else None)

    C = min(chunk_size, T)
    Q = _to_chunks(q * scale, C)  # [B, H, N, C, V]
    Vc = _to_chunks(v, C)  # [B, H, N, C, V]
    A = _to_chunks(a, C, value=float("-inf"))  # [B, H, N, C, J]; the tail padding is never aggregated
    N = A.shape[2]

    # running max at every chunk end; -inf while nothing real has been seen
    with torch.no_grad():
        M = torch.cummax(torch.maximum(A.amax(dim=3), m0[:, :, None]), dim=2).values  # [B, H, N, J]
        M_prev = torch.cat([m0[:, :, None], M[:, :, :-1]], dim=2)  # [B, H, N, J], max entering chunk n
        M_ref = torch.where(torch.isfinite(M), M, torch.zeros_like(M))  # exp(-inf - 0) = 0
        r = torch.exp(M_prev - M_ref)  # [B, H, N, J] in [0, 1]: rescales the carried state to M
    E = torch.exp(A - M_ref[:, :, :, None])  # [B, H, N, C, J] in [0, 1], 0 at pads
    G = E.transpose(-1, -2) @ Vc  # [B, H, N, J, V]: each chunk's own numerator
    g = E.sum(dim=3)  # [B, H, N, J]: each chunk's own denominator

    # state hand-off: R_n, Rd_n = the prefix before chunk n, relative to M_n. unbind, not G[:, :, n]:
    # the backward of each slice would write a full-size zero gradient (O(N^2) at T = 16k)
    R, Rd = [], []
    num, den = num0, den0
    for r_n, G_n, g_n in zip(r.unbind(2), G.unbind(2), g.unbind(2), strict=True):
        num, den = r_n[..., None] * num, r_n * den
        R.append(num)
        Rd.append(den)
        num, den = num + G_n, den + g_n
    R, Rd = torch.stack(R, dim=2), torch.stack(Rd, dim=2)  # [B, H, N, J, V], [B, H, N, J]

    group = max(1, GROUP_CHUNK_HEADS // (B * H))  # chunks per group
    y = IntraChunkFunction.apply(Q, Vc, E, R, Rd, group)  # [B, H, N, C, V]

    y = y.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]  # [B, H, N, C, V] -> [B, T, H, V]
    final = DispatcherState(M[:, :, -1], num, den) if output_final_state else None
    return y, final
