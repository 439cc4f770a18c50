"""Chunkwise-parallel gated delta rule in PyTorch (WY / UT-transform form): the CPU training path.

Within a chunk of C positions (local index i = 1..C, gamma_i = g_1 + ... + g_i, S0 the state
entering the chunk) the recurrence unrolls to

    S_i = e^{gamma_i} S0 + sum_{j<=i} e^{gamma_i - gamma_j} k_j u_j^T
    u_i = beta_i (v_i - e^{gamma_i} S0^T k_i - sum_{j<i} e^{gamma_i - gamma_j} (k_i . k_j) u_j)

so with A_ij = beta_i (k_i . k_j) e^{gamma_i - gamma_j} for j < i (strictly lower):

    U   = W_v - W_k S0,   [W_v | W_k] = (I + A)^{-1} [beta V | beta e^gamma K]   (the UT transform)
    O   = (e^gamma Q) S0 + (Q K^T o M) U,                 M_ij = e^{gamma_i - gamma_j} for j <= i
    S_C = e^{gamma_C} S0 + (e^{gamma_C - gamma} K)^T U

Everything but S0 is independent across chunks, so it is computed for a group of G chunks (of
all B*H sequence-heads) at once: batched [G, B*H, C, C] / [G, B*H, C, K] matmuls and a blocked
triangular inverse. Only the state hand-off S0 -> S_C is a Python loop over the chunks (three
small ops per chunk).

The backward is hand-written (`ChunkGatedDeltaRuleFunction`): the forward saves the inputs (in
chunk layout) and the N+1 chunk-boundary states, O(T/C * K * V); the backward walks the chunk
groups in reverse and recomputes each group's factors, so at any time only one group's C x C
temporaries exist and memory grows linearly in T with a small constant. Only exp of
gamma_i - gamma_j (j <= i), of gamma and of gamma_C - gamma are taken, never exp(-gamma), so a
strong decay underflows to 0 instead of overflowing.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

CHUNK_SIZE = 64
# chunk-heads (chunks x B*H) batched per step; see _chunks_per_group
GROUP_CHUNK_HEADS = 32


def _chunk_view(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, N*C, H, D] -> [N, B, H, C, D], a strided view (no copy)."""
    B, NC, H, D = x.shape
    return x.view(B, NC // C, C, H, D).permute(1, 0, 3, 2, 4)


def _to_chunks(x: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, D] -> [N, B*H, C, D] in `dtype`, zero-padded at the end of T to N*C; one copy.

    Chunk-major so that `x[n]` (one chunk of every sequence and head) is contiguous for the state
    loop. Zero padding is inert: g = 0 keeps the decay, beta = 0 and k = 0 write nothing, and the
    padded outputs are cut off.
    """
    B, T, H, D = x.shape
    N, full = -(-T // C), T // C
    out = torch.empty(N, B, H, C, D, dtype=dtype, device=x.device)
    dst = out.permute(1, 0, 3, 2, 4)  # [B, N, C, H, D] view of out
    dst[:, :full] = x[:, : full * C].view(B, full, C, H, D)
    if full < N:
        dst[:, full, : T - full * C] = x[:, full * C :]
        dst[:, full, T - full * C :] = 0
    return out.view(N, B * H, C, D)


def _from_chunks(x: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """[N, B*H, C, D] -> [B, T, H, D] (drops the padding); one copy."""
    N, BH, C, D = x.shape
    H, full = BH // B, T // C
    out = x.new_empty(B, T, H, D)
    src = x.view(N, B, H, C, D).permute(1, 0, 3, 2, 4)  # [B, N, C, H, D] view of x
    out[:, : full * C].view(B, full, C, H, D).copy_(src[:, :full])
    if full < N:
        out[:, full * C :] = src[:, full, : T - full * C]
    return out


def _prepare(q, k, v, g, beta, scale: float, C: int):
    """Inputs in chunk layout and the accumulation dtype; g becomes its within-chunk cumsum gamma."""
    acc = torch.promote_types(v.dtype, torch.float32)
    q = _to_chunks(q, C, acc).mul_(scale)  # [N, B*H, C, K]
    k = _to_chunks(k, C, acc)  # [N, B*H, C, K]
    v = _to_chunks(v, C, acc)  # [N, B*H, C, V]
    gamma = _to_chunks(g[..., None], C, acc)[..., 0].cumsum_(-1)  # [N, B*H, C]
    beta = _to_chunks(beta[..., None], C, acc)[..., 0]  # [N, B*H, C]
    return q, k, v, gamma, beta


def _chunks_per_group(N: int, BH: int) -> int:
    """How many chunks (of every sequence and head) one batched step processes.

    All N at once means fewest Python calls, but then the [N, B*H, C, C] temporaries run to tens
    of MB: every elementwise pass streams from DRAM, every fresh buffer page-faults, and the
    backward would hold O(T * C) memory. ~GROUP_CHUNK_HEADS chunk-heads per step keep the
    working set in L2 while each matmul still batches enough 64 x 64 blocks to amortise a call.
    """
    return max(1, min(N, GROUP_CHUNK_HEADS // BH))


def _unit_lower_inverse(A: torch.Tensor, block: int = 16) -> torch.Tensor:
    """(I + A)^{-1} for the strictly-lower part of A [..., C, C] (diagonal and upper part ignored).

    Invert the diagonal block x block blocks with one batched triangular solve, then merge
    neighbouring blocks, doubling their size, with [[T11, 0], [-T22 A21 T11, T22]]. On CPU this
    is ~2x faster than one solve on the full C x C matrices, whose batched trsm is poorly
    vectorised at C = 64, and the merges are plain batched matmuls.
    """
    *batch, C, _ = A.shape
    block = min(block, C)
    n = C // block
    assert n * block == C and n & (n - 1) == 0, f"chunk size {C} must be {block} x a power of two"
    T = torch.zeros_like(A)

    def diag_blocks(
        x: torch.Tensor, size: int
    ) -> torch.Tensor:  # [..., C, C] -> [..., C/size, size, size] view
        m = C // size
        return torch.diagonal(x.view(*batch, m, size, m, size), dim1=-4, dim2=-2).movedim(-1, -3)

    eye = torch.eye(block, dtype=A.dtype, device=A.device)
    diag_blocks(T, block).copy_(
        torch.linalg.solve_triangular(diag_blocks(A, block), eye, upper=False, unitriangular=True)
    )
    size = block
    while size < C:
        Tb, Ab = diag_blocks(T, 2 * size), diag_blocks(A, 2 * size)
        Tb[..., size:, :size] = -(Tb[..., size:, size:] @ (Ab[..., size:, :size] @ Tb[..., :size, :size]))
        size *= 2
    return T


def _intra_chunk(q, k, v, gamma, beta):
    """State-independent factors of a group of chunks, batched over [G, B*H].

    Returns:
        M:    [G, B*H, C, C] e^{gamma_i - gamma_j} for j <= i, else 0
        A:    [G, B*H, C, C] strictly-lower part = A_ij above (diagonal is junk: solves ignore it)
        Tinv: [G, B*H, C, C] (I + A)^{-1}, the UT transform
        W:    [G, B*H, C, V+K] [W_v | W_k] = (I + A)^{-1} [beta V | beta e^gamma K]
        P:    [G, B*H, C, C] (Q K^T) o M, the causal intra-chunk read-out
        qg:   [G, B*H, C, K] e^gamma Q, reads the entering state
        kd:   [G, B*H, C, K] e^{gamma_C - gamma} K, writes into the leaving state
    """
    # exp before masking: above the diagonal gamma_i - gamma_j >= 0 may overflow to inf, which
    # tril_ then overwrites; cheaper than masked_fill(-inf) + exp
    M = (gamma[..., :, None] - gamma[..., None, :]).exp_().tril_()
    kb = k * beta[..., None]
    A = (kb @ k.mT).mul_(M)
    eg = gamma.exp()[..., None]  # [G, B*H, C, 1]
    rhs = torch.cat([v * beta[..., None], kb.mul_(eg)], dim=-1)  # [G, B*H, C, V+K]
    Tinv = _unit_lower_inverse(A)
    W = Tinv @ rhs
    P = (q @ k.mT).mul_(M)
    qg = q * eg
    kd = k * (gamma[..., -1:] - gamma).exp_()[..., None]
    return M, A, Tinv, W, P, qg, kd


def chunk_gated_delta_rule_fwd(q, k, v, gamma, beta, h0: torch.Tensor | None):
    """Chunk-layout forward.

    Args:
        q, k: [N, B*H, C, K] (q already scaled); v: [N, B*H, C, V]; gamma, beta: [N, B*H, C]
        h0: [B*H, K, V] or None

    Returns:
        o: [N, B*H, C, V]
        states: [N+1, B*H, K, V] chunk-boundary states: states[n] enters chunk n, states[N] is final
    """
    N, BH, _, K = k.shape
    V = v.shape[-1]
    o = torch.empty_like(v)
    states = q.new_empty(N + 1, BH, K, V)
    if h0 is None:
        states[0].zero_()
    else:
        states[0] = h0
    G = _chunks_per_group(N, BH)
    for s in range(0, N, G):
        e = min(s + G, N)
        _, _, _, W, P, qg, kd = _intra_chunk(q[s:e], k[s:e], v[s:e], gamma[s:e], beta[s:e])
        U, W_k = W[..., :V].contiguous(), W[..., V:]  # U starts as W_v, becomes W_v - W_k S0 below
        kdT = kd.mT
        decay = gamma[s:e, :, -1, None, None].exp()  # [G, B*H, 1, 1] e^{gamma_C}
        # the only sequential part: hand each chunk's final state to the next
        for i, n in enumerate(range(s, e)):
            U[i].baddbmm_(W_k[i], states[n], alpha=-1)
            torch.mul(states[n], decay[i], out=states[n + 1])
            states[n + 1].baddbmm_(kdT[i], U[i])
        torch.matmul(qg, states[s:e], out=o[s:e])
        o[s:e].add_(P @ U)
    return o, states


def _chunk_grads(q, k, v, gamma, beta, S0, dS1, do, dU, M, A, Tinv, W, P, qg, kd):
    """Input gradients of a group of chunks once dU (w.r.t. U) and dS1 (w.r.t. the state leaving
    each chunk) are known. All arguments are [G, B*H, ...] chunk-layout tensors.

    Returns dq (w.r.t. the scaled q), dk, dv [G, B*H, C, *] and dg, dbeta [G, B*H, C].
    """
    V = v.shape[-1]
    W_v, W_k = W[..., :V], W[..., V:]
    U = W_v - W_k @ S0  # [G, B*H, C, V]
    decay = gamma[..., -1].exp()  # [G, B*H]
    dgamma_C = (S0 * dS1).sum((-2, -1)).mul_(decay)  # through e^{gamma_C} S0 in the leaving state
    # O = qg S0 + P U
    dqg = do @ S0.mT  # [G, B*H, C, K]
    dP = do @ U.mT  # [G, B*H, C, C]
    # S_C = e^{gamma_C} S0 + kd^T U
    dkd = U @ dS1.mT  # [G, B*H, C, K]
    # U = W_v - W_k S0 and W = (I + A)^{-1} rhs  =>  drhs = (I + A)^{-T} dW,  dA = -drhs W^T
    dW = torch.cat([dU, -(dU @ S0.mT)], dim=-1)  # [G, B*H, C, V+K]
    drhs = Tinv.mT @ dW
    dA = (drhs @ W.mT).tril_(-1).neg_()  # only A's strictly-lower entries are parameters
    dvb, dkb = drhs[..., :V], drhs[..., V:]

    eg = gamma.exp()[..., None]  # [G, B*H, C, 1]
    ed = (gamma[..., -1:] - gamma).exp_()[..., None]  # [G, B*H, C, 1]
    kb = k * beta[..., None]
    # M enters both A = (kb k^T) o M and P = (q k^T) o M; dM o M = dA o A + dP o P is the gradient
    # w.r.t. gamma_i - gamma_j, i.e. +rowsum for gamma_i and -colsum for gamma_j
    X = dA * A
    X.addcmul_(dP, P)
    dgamma = X.sum(-1) - X.sum(-2)  # [G, B*H, C]
    dP.mul_(M)
    dA.mul_(M)
    dq = (dP @ k).addcmul_(dqg, eg)
    dk = dP.mT @ q + dA.mT @ kb
    dk.addcmul_(dkd, ed)
    dkb_total = (dA @ k).addcmul_(dkb, eg)  # w.r.t. kb = beta k (from A, and from rhs = kb e^gamma)
    dk.addcmul_(dkb_total, beta[..., None])
    dbeta = (dkb_total * k).sum(-1) + (dvb * v).sum(-1)
    dv = dvb * beta[..., None]
    # gamma also appears in qg (e^gamma), rhs (e^gamma) and kd (e^{gamma_C - gamma})
    r = (dkd * kd).sum(-1)  # [G, B*H, C]
    dgamma += (dqg * qg).sum(-1) + (dkb * kb).sum(-1) * eg[..., 0] - r
    dgamma[..., -1] += dgamma_C + r.sum(-1)
    # gamma = cumsum(g) within the chunk  =>  dg_j = sum_{i >= j} dgamma_i
    dg = dgamma.flip(-1).cumsum(-1).flip(-1)
    return dq, dk, dv, dg, dbeta


def chunk_gated_delta_rule_bwd(q, k, v, gamma, beta, states, do, dht, scale: float, B: int, T: int):
    """Gradients of (o, final state) from the chunk-layout inputs saved by the forward.

    Walks the chunk groups backwards, recomputing each group's factors, and writes each group's
    gradients straight into [B, N*C, H, *] buffers (sliced to T on return).

    Args:
        q, k, v, gamma, beta, states: as saved by `ChunkGatedDeltaRuleFunction.forward`
        do: [B, T, H, V]; dht: [B, H, K, V] or None

    Returns:
        dq, dk: [B, T, H, K]; dv: [B, T, H, V]; dg, dbeta: [B, T, H]; dh0: [B, H, K, V]
    """
    N, BH, C, K = k.shape
    V = v.shape[-1]
    H = BH // B
    do = _to_chunks(do, C, q.dtype)  # [N, B*H, C, V]
    dq, dk = q.new_empty(B, N * C, H, K), q.new_empty(B, N * C, H, K)
    dv = q.new_empty(B, N * C, H, V)
    dg, dbeta = q.new_empty(B, N * C, H, 1), q.new_empty(B, N * C, H, 1)
    grad_views = [_chunk_view(x, C) for x in (dq, dk, dv, dg, dbeta)]  # [N, B, H, C, *] views
    # dS[n]: gradient w.r.t. the state entering chunk n (dS[N]: w.r.t. the final state)
    dS = q.new_empty(N + 1, BH, K, V)
    if dht is None:
        dS[N].zero_()
    else:
        dS[N] = dht.reshape(BH, K, V)
    G = _chunks_per_group(N, BH)
    for s in reversed(range(0, N, G)):
        e = min(s + G, N)
        args = q[s:e], k[s:e], v[s:e], gamma[s:e], beta[s:e]
        M, A, Tinv, W, P, qg, kd = _intra_chunk(*args)
        W_kT = W[..., V:].mT
        decay = gamma[s:e, :, -1, None, None].exp()  # [G, B*H, 1, 1]
        # reverse state walk: each chunk adds its direct read-out term qg^T dO and passes on
        #   dU_n = P^T dO + kd dS_{n+1},   dS_n = e^{gamma_C} dS_{n+1} + qg^T dO - W_k^T dU_n
        torch.matmul(qg.mT, do[s:e], out=dS[s:e])
        dU = P.mT @ do[s:e]  # [G, B*H, C, V]
        for i in reversed(range(e - s)):
            n = s + i
            dU[i].baddbmm_(kd[i], dS[n + 1])
            dS[n].addcmul_(dS[n + 1], decay[i]).baddbmm_(W_kT[i], dU[i], alpha=-1)
        grads = _chunk_grads(*args, states[s:e], dS[s + 1 : e + 1], do[s:e], dU, M, A, Tinv, W, P, qg, kd)
        grads[0].mul_(scale)  # q entered as scale * q
        for view, grad in zip(grad_views, grads):
            view[s:e] = grad.view(e - s, B, H, C, -1)
    return dq[:, :T], dk[:, :T], dv[:, :T], dg[:, :T, :, 0], dbeta[:, :T, :, 0], dS[0].view(B, H, K, V)


class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale: float, initial_state: torch.Tensor | None):
        B, T, H, K, V = *k.shape, v.shape[-1]
        qc, kc, vc, gamma, betac = _prepare(q, k, v, g, beta, scale, CHUNK_SIZE)
        h0 = None if initial_state is None else initial_state.reshape(B * H, K, V)
        o, states = chunk_gated_delta_rule_fwd(qc, kc, vc, gamma, betac, h0)
        # the inputs (in chunk layout, so the backward need not convert them again) and the N+1
        # boundary states; the backward recomputes every per-chunk factor from these
        ctx.save_for_backward(qc, kc, vc, gamma, betac, states)
        ctx.shape = (B, T)
        ctx.scale = scale
        ctx.dtypes = (
            q.dtype,
            k.dtype,
            v.dtype,
            g.dtype,
            beta.dtype,
            None if initial_state is None else initial_state.dtype,
        )
        ctx.set_materialize_grads(False)
        return _from_chunks(o, B, T), states[-1].view(B, H, K, V)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dht):
        q, k, v, gamma, beta, states = ctx.saved_tensors
        B, T = ctx.shape
        if do is None:  # only the final state was used
            do = q.new_zeros(B, T, k.shape[1] // B, v.shape[-1])
        grads = chunk_gated_delta_rule_bwd(q, k, v, gamma, beta, states, do, dht, ctx.scale, B, T)
        dq, dk, dv, dg, dbeta, dh0 = (
            None if dtype is None else grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes)
        )
        return dq, dk, dv, dg, dbeta, None, dh0


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `recurrent_gated_delta_rule` (see `sinkrec.ops.gated_delta_rule` for docs)."""
    o, final_state = ChunkGatedDeltaRuleFunction.apply(q, k, v, g, beta, scale, initial_state)
    return o, (final_state if output_final_state else None)
