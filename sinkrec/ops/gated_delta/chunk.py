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
triangular inverse. Only the state hand-off S0 -> S_C is a Python loop over the chunks: three
small ops per chunk, or, for few sequence-heads per step (`_affine_walk`), one matmul per chunk
after substituting U: S_C = (e^{gamma_C} I - (e^{gamma_C - gamma} K)^T W_k) S0 + (e^{gamma_C - gamma} K)^T W_v,
whose matrix and offset are batched with the rest (`_transition`).

Packed sequences (`cu_seqlens`, B = 1): each sequence is laid out from a fresh chunk and
zero-padded to whole chunks (`_Packed`), so the per-chunk math above is unchanged; the state walk
starts each sequence's first chunk from that sequence's initial state and writes its last chunk's
leaving state to that sequence's final state. At most C - 1 padding positions per sequence.

The backward is hand-written (`ChunkGatedDeltaRuleFunction`): the forward saves the inputs (in
chunk layout), the N chunk-entering states, O(T/C * K * V), and each group's factors (M, [A ; P],
(I + A)^{-1}, W, ...: O(T * (C + K + V)), linear in T); the backward walks the chunk groups in
reverse and reuses them. With `SAVE_FACTORS = False` it recomputes each group's factors instead,
so only one group's C x C temporaries exist at any time (less memory, ~10% more time). Only exp of
gamma_i - gamma_j (j <= i), of gamma and of gamma_C - gamma are taken, never exp(-gamma), so a
strong decay underflows to 0 instead of overflowing.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

CHUNK_SIZE = 32  # 32 measured ~25% faster than 64 on CPU (fewer C^2 FLOPs; see benchmarks/ops.py)
# chunk-heads (chunks x B*H) batched per step; see _chunks_per_group
GROUP_CHUNK_HEADS = 64  # 64 measured ~8% faster than 32 and 128 at T = 200-16384 (2 MiB L2, one thread)
# the state walk is the affine one (one matmul per chunk, `_affine_walk`) up to this many sequence-heads
AFFINE_WALK_MAX_ROWS = 8
# the backward reuses the forward's per-group factors instead of recomputing them (see
# ChunkGatedDeltaRuleFunction.forward); False recomputes, for the least memory
SAVE_FACTORS = True


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


class _Packed:
    """Chunk layout of B = 1 packed sequences (`cu_seqlens`): every sequence starts a fresh chunk
    and is zero-padded to a whole number of chunks, so no chunk holds two sequences and the per-chunk
    math is that of one sequence; only the state hand-off between chunks resets at a boundary.
    Costs at most C - 1 padding positions per sequence, not N x the longest length.

    slots [T]: where token t lands in the flat [N_chunks * C] layout; first / last / seq: per
    chunk, whether it starts / ends its sequence and which sequence it belongs to (Python lists,
    read by the state loops); n_chunks: total chunks."""

    def __init__(self, cu_seqlens: torch.Tensor, C: int) -> None:
        cu = cu_seqlens.to(device="cpu", dtype=torch.long)
        lens = cu[1:] - cu[:-1]  # [N]
        per_seq = (lens + C - 1) // C  # chunks of each sequence
        start_chunk = torch.cumsum(per_seq, 0) - per_seq  # [N] first chunk of each sequence
        T = int(cu[-1])
        seq_of_token = torch.repeat_interleave(torch.arange(len(lens)), lens)  # [T]
        slots = start_chunk[seq_of_token] * C + torch.arange(T) - cu[:-1][seq_of_token]
        self.slots = slots.to(cu_seqlens.device)
        self.n_chunks = int(per_seq.sum())
        self.seq = torch.repeat_interleave(torch.arange(len(lens)), per_seq).tolist()
        self.first = [False] * self.n_chunks
        self.last = [False] * self.n_chunks
        for s0, n in zip(start_chunk.tolist(), per_seq.tolist()):
            if n:
                self.first[s0], self.last[s0 + n - 1] = True, True

    def to_chunks(self, x: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
        """[1, T, H, D] -> [N_chunks, H, C, D] in `dtype`, zero-padded per sequence; one copy."""
        H, D = x.shape[2:]
        out = torch.zeros(self.n_chunks, H, C, D, dtype=dtype, device=x.device)
        out.permute(0, 2, 1, 3)[self.slots // C, self.slots % C] = x[0].to(dtype)
        return out

    def from_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """[N_chunks, H, C, D] -> [1, T, H, D] (drops the padding); one gather."""
        C = x.shape[2]
        return x.permute(0, 2, 1, 3)[self.slots // C, self.slots % C][None]

    def from_flat(self, x: torch.Tensor) -> torch.Tensor:
        """[1, N_chunks * C, H, D] -> [1, T, H, D]."""
        return x[:, self.slots]


class _Padded:
    """Chunk layout of B equal-length sequences folded into B*H rows (each row one sequence): the
    chunk bookkeeping of `_Packed` for the unpacked case (one sequence per row, chunks 0..N-1)."""

    def __init__(self, T: int, C: int) -> None:
        self.n_chunks = -(-T // C)
        self.seq = [0] * self.n_chunks
        self.first = [n == 0 for n in range(self.n_chunks)]
        self.last = [n == self.n_chunks - 1 for n in range(self.n_chunks)]


def _prepare(q, k, v, g, beta, scale: float, C: int, packed: _Packed | None):
    """Inputs in chunk layout and the accumulation dtype; g becomes its within-chunk cumsum gamma."""
    acc = torch.promote_types(v.dtype, torch.float32)
    conv = _to_chunks if packed is None else packed.to_chunks
    q = conv(q, C, acc)  # [N, B*H, C, K]
    if scale != 1.0:
        q.mul_(scale)
    k = conv(k, C, acc)  # [N, B*H, C, K]
    v = conv(v, C, acc)  # [N, B*H, C, V]
    # every chunk holds one sequence (packed: padded per sequence), so the cumsum never crosses one
    gamma = conv(g[..., None], C, acc)[..., 0].cumsum_(-1)  # [N, B*H, C]
    beta = conv(beta[..., None], C, acc)[..., 0]  # [N, B*H, C]
    return q, k, v, gamma, beta


def _layout(q, k, v, g, beta, scale: float, cu_seqlens: torch.Tensor | None):
    """The chunk layout of one call (shared with the C++ kernel, cpp.py): the packing (None unpacked), which
    chunks start and end a sequence, the number of sequences, and `_prepare`'s inputs."""
    packed = None if cu_seqlens is None else _Packed(cu_seqlens, CHUNK_SIZE)
    chunks = _Padded(k.shape[1], CHUNK_SIZE) if packed is None else packed
    n_seq = 1 if packed is None else len(cu_seqlens) - 1
    return packed, chunks, n_seq, _prepare(q, k, v, g, beta, scale, CHUNK_SIZE, packed)


def _chunks_per_group(N: int, BH: int) -> int:
    """How many chunks (of every sequence and head) one batched step processes.

    All N at once means fewest Python calls, but then the [N, B*H, C, C] temporaries run to tens
    of MB: every elementwise pass streams from DRAM, every fresh buffer page-faults, and the
    backward would hold O(T * C) memory. ~GROUP_CHUNK_HEADS chunk-heads per step keep the
    working set in L2 while each matmul still batches enough C x C blocks to amortise a call.
    """
    return max(1, min(N, GROUP_CHUNK_HEADS // BH))


def _unit_lower_inverse(A: torch.Tensor, block: int = 16) -> torch.Tensor:
    """(I + A)^{-1} for the strictly-lower part of A [..., C, C] (diagonal and upper part ignored).

    Invert the diagonal block x block blocks with one batched triangular solve, then merge
    neighbouring blocks, doubling their size, with [[T11, 0], [-T22 A21 T11, T22]]. On CPU this
    is ~2x faster than one solve on the full C x C matrices, whose batched trsm is poorly
    vectorised at C = 32-64, and the merges are plain batched matmuls.
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
        KQ:   [G, B*H, 2C, K] [beta K ; Q] stacked along positions (one operand for both C x C products)
        AP:   [G, B*H, 2C, C] [A ; P] with A = (beta K K^T) o M (its strictly-lower part is A_ij above;
              the diagonal is junk: solves ignore it) and P = (Q K^T) o M, the causal intra-chunk read-out
        Tinv: [G, B*H, C, C] (I + A)^{-1}, the UT transform
        W:    [G, B*H, C, V+K] [W_v | W_k] = (I + A)^{-1} [beta V | beta e^gamma K]
        qg:   [G, B*H, C, K] e^gamma Q, reads the entering state
        kd:   [G, B*H, C, K] e^{gamma_C - gamma} K, writes into the leaving state
    """
    C = k.shape[-2]
    # exp before masking: above the diagonal gamma_i - gamma_j >= 0 may overflow to inf, which
    # tril_ then overwrites; cheaper than masked_fill(-inf) + exp
    M = (gamma[..., :, None] - gamma[..., None, :]).exp_().tril_()
    KQ = torch.cat([k * beta[..., None], q], dim=-2)  # [G, B*H, 2C, K]
    AP = KQ @ k.mT  # one product for beta K K^T and Q K^T: [G, B*H, 2C, C]
    AP.unflatten(-2, (2, C)).mul_(M[..., None, :, :])
    eg = gamma.exp()[..., None]  # [G, B*H, C, 1]
    rhs = torch.cat([v * beta[..., None], KQ[..., :C, :] * eg], dim=-1)  # [G, B*H, C, V+K]
    Tinv = _unit_lower_inverse(AP[..., :C, :])
    W = Tinv @ rhs
    qg = q * eg
    kd = k * (gamma[..., -1:] - gamma).exp_()[..., None]
    return M, KQ, AP, Tinv, W, qg, kd


def _affine_walk(BH: int) -> bool:
    """Which state walk: the affine one (`_transition`, one matmul per chunk, plus batched K x K
    products) pays off when a step carries few sequence-heads, i.e. long sequences in small batches,
    where the per-chunk calls dominate; with many rows per step (ML-1M: B*H = 256 at T = 200) the
    extra products cost more than the calls they save. Measured on one thread of an AVX-512 EPYC:
    +20% at B*H = 2 (T = 16384), even at 8, -5% at 256 (`make bench-layer-ab`, docs/MODEL.md)."""
    return BH <= AFFINE_WALK_MAX_ROWS


def _transition(W: torch.Tensor, kd: torch.Tensor, gamma: torch.Tensor, V: int) -> torch.Tensor:
    """A [G, B*H, K, K] = e^{gamma_C} I - kd^T W_k, the linear map of the entering state in the
    leaving one: with U = W_v - W_k S0, S_C = e^{gamma_C} S0 + kd^T U = A S0 + kd^T W_v. Folding the
    three per-chunk steps into one matrix leaves the sequential state walk one matmul per chunk
    (and its reverse, dS0 = A^T dS_C + ..., likewise)."""
    A = (kd.mT @ W[..., V:]).neg_()
    A.diagonal(dim1=-2, dim2=-1).add_(gamma[..., -1:].exp())
    return A


def chunk_gated_delta_rule_fwd(q, k, v, gamma, beta, h0: torch.Tensor | None, chunks: _Padded | _Packed,
                               n_seq: int = 1, keep: list | None = None):
    """Chunk-layout forward.

    Args:
        q, k: [N, B*H, C, K] (q already scaled); v: [N, B*H, C, V]; gamma, beta: [N, B*H, C]
        h0: [S, B*H, K, V] or None, the initial state of each of the S sequences (S = 1 unpacked)
        chunks: which chunks start / end a sequence, and which sequence each belongs to
        n_seq: S, the number of sequences
        keep: a list to append each group's `_intra_chunk` factors to (for the backward), or None

    Returns:
        o: [N, B*H, C, V]
        states: [N, B*H, K, V] the state entering each chunk
        final: [S, B*H, K, V] the state after each sequence's last position
    """
    N, BH, _, K = k.shape
    V = v.shape[-1]
    o = torch.empty_like(v)
    states = q.new_empty(N, BH, K, V)
    # a sequence with no positions (packed) keeps its initial state
    final = q.new_zeros(n_seq, BH, K, V) if h0 is None else h0.to(q.dtype, copy=True)
    G = _chunks_per_group(N, BH)
    affine = _affine_walk(BH)
    for s in range(0, N, G):
        e = min(s + G, N)
        factors = _intra_chunk(q[s:e], k[s:e], v[s:e], gamma[s:e], beta[s:e])
        if keep is not None:
            keep.append(factors)
        _, _, AP, _, W, qg, kd = factors
        P = AP[..., k.shape[-2] :, :]
        W_v, W_k = W[..., :V], W[..., V:]
        if affine:  # one small matmul per chunk: S_C = A S0 + b
            A, b = _transition(W, kd, gamma[s:e], V), kd.mT @ W_v
        else:  # three: U = W_v - W_k S0, then S_C = e^{gamma_C} S0 + kd^T U
            U, kdT = W_v.contiguous(), kd.mT
            decay = gamma[s:e, :, -1, None, None].exp()  # [G, B*H, 1, 1] e^{gamma_C}
        # the only sequential part: hand each chunk's final state to the next, starting each
        # sequence from its own initial state
        for i, n in enumerate(range(s, e)):
            if chunks.first[n]:
                states[n] = final[chunks.seq[n]]  # its initial state (zero if none)
            out = final[chunks.seq[n]] if chunks.last[n] else states[n + 1]
            if affine:
                torch.baddbmm(b[i], A[i], states[n], out=out)
            else:
                U[i].baddbmm_(W_k[i], states[n], alpha=-1)
                torch.mul(states[n], decay[i], out=out)
                out.baddbmm_(kdT[i], U[i])
        if affine:
            U = torch.matmul(W_k, states[s:e]).neg_().add_(W_v)  # U = W_v - W_k S0
        torch.matmul(qg, states[s:e], out=o[s:e])
        o[s:e].add_(P @ U)
    return o, states, final


def _chunk_grads(q, k, v, gamma, beta, S0, dS1, do, dU, M, KQ, AP, Tinv, W, qg, kd):
    """Input gradients of a group of chunks once dU (w.r.t. U) and dS1 (w.r.t. the state leaving
    each chunk) are known. All arguments are [G, B*H, ...] chunk-layout tensors.

    Returns dq (w.r.t. the scaled q), dk, dv [G, B*H, C, *] and dg, dbeta [G, B*H, C].
    """
    C, V = k.shape[-2], v.shape[-1]
    W_v, W_k = W[..., :V], W[..., V:]
    U = W_v - W_k @ S0  # [G, B*H, C, V]
    decay = gamma[..., -1].exp()  # [G, B*H]
    dgamma_C = (S0 * dS1).sum((-2, -1)).mul_(decay)  # through e^{gamma_C} S0 in the leaving state
    # O = qg S0 + P U
    dqg = do @ S0.mT  # [G, B*H, C, K]
    # S_C = e^{gamma_C} S0 + kd^T U
    dkd = U @ dS1.mT  # [G, B*H, C, K]
    # U = W_v - W_k S0 and W = (I + A)^{-1} rhs  =>  drhs = (I + A)^{-T} dW,  dA = -drhs W^T
    dW = torch.cat([dU, -(dU @ S0.mT)], dim=-1)  # [G, B*H, C, V+K]
    drhs = Tinv.mT @ dW
    # [dA ; dP], stacked like [A ; P]: only A's strictly-lower entries are parameters
    dAP = torch.cat([(drhs @ W.mT).tril_(-1).neg_(), do @ U.mT], dim=-2)  # [G, B*H, 2C, C]
    dvb, dkb = drhs[..., :V], drhs[..., V:]

    eg = gamma.exp()[..., None]  # [G, B*H, C, 1]
    ed = (gamma[..., -1:] - gamma).exp_()[..., None]  # [G, B*H, C, 1]
    kb = KQ[..., :C, :]
    # M enters both A = (kb k^T) o M and P = (q k^T) o M; dM o M = dA o A + dP o P is the gradient
    # w.r.t. gamma_i - gamma_j, i.e. +rowsum for gamma_i and -colsum for gamma_j
    X = (dAP * AP).unflatten(-2, (2, C)).sum(-3)  # [G, B*H, C, C]
    dgamma = X.sum(-1) - X.sum(-2)  # [G, B*H, C]
    dAP.unflatten(-2, (2, C)).mul_(M[..., None, :, :])
    dkq = dAP @ k  # [dA k ; dP k]: [G, B*H, 2C, K]
    dq = dkq[..., C:, :].addcmul_(dqg, eg)
    dk = dAP.mT @ KQ  # dA^T kb + dP^T q
    dk.addcmul_(dkd, ed)
    dkb_total = dkq[..., :C, :].addcmul_(dkb, eg)  # w.r.t. kb = beta k (from A, and from rhs = kb e^gamma)
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


def chunk_gated_delta_rule_bwd(q, k, v, gamma, beta, states, do, dht, scale: float, B: int, T: int,
                               chunks: _Padded | _Packed, packed: _Packed | None, n_seq: int,
                               factors: list | None = None):
    """Gradients of (o, final states) from the chunk-layout inputs saved by the forward.

    Walks the chunk groups backwards, taking each group's factors from `factors` (the forward's,
    `keep`) or, when None, recomputing them, and writes each group's gradients straight into
    [B, N*C, H, *] buffers (cut back to the T real positions on return).

    Args:
        q, k, v, gamma, beta, states: as saved by `ChunkGatedDeltaRuleFunction.forward`
        do: [B, T, H, V]; dht: [S, B*H, K, V] or None (gradient w.r.t. each sequence's final state)
        factors: the forward's per-group `_intra_chunk` results, in group order, or None

    Returns:
        dq, dk: [B, T, H, K]; dv: [B, T, H, V]; dg, dbeta: [B, T, H]; dh0: [S, B*H, K, V]
    """
    N, BH, C, K = k.shape
    V = v.shape[-1]
    H = BH // B
    do = _to_chunks(do, C, q.dtype) if packed is None else packed.to_chunks(do, C, q.dtype)  # [N, B*H, C, V]
    dq, dk = q.new_empty(B, N * C, H, K), q.new_empty(B, N * C, H, K)
    dv = q.new_empty(B, N * C, H, V)
    dg, dbeta = q.new_empty(B, N * C, H, 1), q.new_empty(B, N * C, H, 1)
    grad_views = [_chunk_view(x, C) for x in (dq, dk, dv, dg, dbeta)]  # [N, B, H, C, *] views
    # dS[n]: gradient w.r.t. the state entering chunk n, so dS[n + 1] is the one w.r.t. the state
    # leaving chunk n; where chunk n ends a sequence, dS[n + 1] is set to that sequence's final-state
    # gradient once chunk n + 1 (the next sequence's first) has passed its own to dh0
    dS = q.new_empty(N + 1, BH, K, V)
    dht = q.new_zeros(n_seq, BH, K, V) if dht is None else dht
    dh0 = dht.clone()  # a sequence with no positions passes its final-state gradient straight back
    G = _chunks_per_group(N, BH)
    affine = _affine_walk(BH)
    for s in reversed(range(0, N, G)):
        e = min(s + G, N)
        args = q[s:e], k[s:e], v[s:e], gamma[s:e], beta[s:e]
        M, KQ, AP, Tinv, W, qg, kd = _intra_chunk(*args) if factors is None else factors.pop()
        P = AP[..., C:, :]
        # reverse state walk: with dU_n = P^T dO + kd dS_{n+1} (the gradient w.r.t. U),
        #   dS_n = e^{gamma_C} dS_{n+1} + qg^T dO - W_k^T dU_n = A^T dS_{n+1} + (qg^T dO - W_k^T P^T dO)
        torch.matmul(qg.mT, do[s:e], out=dS[s:e])
        dU = P.mT @ do[s:e]  # [G, B*H, C, V]; P^T dO for now
        if affine:
            A = _transition(W, kd, gamma[s:e], V)
            dS[s:e].sub_(W[..., V:].mT @ dU)
        else:
            W_kT = W[..., V:].mT
            decay = gamma[s:e, :, -1, None, None].exp()  # [G, B*H, 1, 1]
        for i in reversed(range(e - s)):
            n = s + i
            if chunks.last[n]:
                dS[n + 1] = dht[chunks.seq[n]]
            if affine:
                dS[n].baddbmm_(A[i].mT, dS[n + 1])
            else:
                dU[i].baddbmm_(kd[i], dS[n + 1])
                dS[n].addcmul_(dS[n + 1], decay[i]).baddbmm_(W_kT[i], dU[i], alpha=-1)
            if chunks.first[n]:
                dh0[chunks.seq[n]] = dS[n]
        if affine:
            dU.add_(kd @ dS[s + 1 : e + 1])
        grads = _chunk_grads(*args, states[s:e], dS[s + 1 : e + 1], do[s:e], dU, M, KQ, AP, Tinv, W, qg, kd)
        if scale != 1.0:
            grads[0].mul_(scale)  # q entered as scale * q
        for view, grad in zip(grad_views, grads):
            view[s:e] = grad.view(e - s, B, H, C, -1)
    if packed is None:
        dq, dk, dv, dg, dbeta = (x[:, :T] for x in (dq, dk, dv, dg, dbeta))
    else:
        dq, dk, dv, dg, dbeta = (packed.from_flat(x) for x in (dq, dk, dv, dg, dbeta))
    return dq, dk, dv, dg[..., 0], dbeta[..., 0], dh0


class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale: float, initial_state: torch.Tensor | None,
                cu_seqlens: torch.Tensor | None = None):
        B, T, H, K, V = *k.shape, v.shape[-1]
        packed, chunks, n_seq, (qc, kc, vc, gamma, betac) = _layout(q, k, v, g, beta, scale, cu_seqlens)
        # states of the rows [B*H] of each sequence: unpacked, one sequence of B*H rows; packed
        # (B = 1), N sequences of H rows
        h0 = None if initial_state is None else initial_state.reshape(n_seq, B * H, K, V)
        # with gradients wanted, the backward reuses each group's factors (M, [A ; P], (I + A)^{-1}, W, ...)
        # instead of recomputing them: ~2.5x the saved inputs' memory (still O(T), no T^2 term) for
        # ~8% of the op's forward + backward time (measured side by side; docs/MODEL.md)
        keep = [] if SAVE_FACTORS and any(ctx.needs_input_grad) else None
        o, states, final = chunk_gated_delta_rule_fwd(qc, kc, vc, gamma, betac, h0, chunks, n_seq, keep)
        # the inputs (in chunk layout, so the backward need not convert them again) and the
        # chunk-entering states
        ctx.save_for_backward(qc, kc, vc, gamma, betac, states)
        ctx.factors = keep
        ctx.shape = (B, T)
        ctx.scale = scale
        ctx.chunks, ctx.packed, ctx.n_seq = chunks, packed, n_seq
        ctx.dtypes = (
            q.dtype,
            k.dtype,
            v.dtype,
            g.dtype,
            beta.dtype,
            None if initial_state is None else initial_state.dtype,
        )
        ctx.set_materialize_grads(False)
        o = _from_chunks(o, B, T) if packed is None else packed.from_chunks(o)
        return o, final.view(n_seq * B, H, K, V)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dht):
        q, k, v, gamma, beta, states = ctx.saved_tensors
        B, T = ctx.shape
        H, K, V = k.shape[1] // B, k.shape[-1], v.shape[-1]
        if do is None:  # only the final state was used
            do = q.new_zeros(B, T, H, V)
        if dht is not None:
            dht = dht.to(q.dtype).reshape(ctx.n_seq, B * H, K, V)
        grads = chunk_gated_delta_rule_bwd(q, k, v, gamma, beta, states, do, dht, ctx.scale, B, T,
                                           ctx.chunks, ctx.packed, ctx.n_seq, ctx.factors)
        ctx.factors = None
        grads = (*grads[:5], grads[5].view(ctx.n_seq * B, H, K, V))
        dq, dk, dv, dg, dbeta, dh0 = (
            None if dtype is None else grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes)
        )
        return dq, dk, dv, dg, dbeta, None, dh0, None


def chunk_gated_delta_rule(
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
    """Same contract as `recurrent_gated_delta_rule` (see `sinkrec.ops.gated_delta_rule` for docs)."""
    o, final_state = ChunkGatedDeltaRuleFunction.apply(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    return o, (final_state if output_final_state else None)
