"""The chunked gated delta rule (`chunk.py`'s WY form, same chunk layout and math) as C++ loops:
CPU, float32, built by `sinkrec.ops._cpp` at first use.

`chunk.py` batches each step over a group of chunk-heads and hands the state from chunk to chunk in
a Python loop: ~35 PyTorch ops per group forward and ~45 backward, on 32 x 32 matrices where a
batched GEMM call costs about as much as its arithmetic. Here one thread takes one sequence-head
(a row of B*H) and walks its chunks in order, every C x C / C x K product a plain loop over
row-major scratch in L1: forward, each chunk's (I + A)^{-1} (forward substitution), W, U, its output
and the leaving state; backward, the same walk in reverse with the factors recomputed per chunk
(nothing but the chunk-entering states is saved) and the gradients of `chunk._chunk_grads`.

The Python side is `chunk.py`'s: `_prepare` (inputs to chunk layout, gamma = the within-chunk
cumsum of g), `_Padded` / `_Packed` (which chunks start and end a sequence), and the conversion
of outputs and gradients back to [B, T, H, *]. Held equal to the chunk op and to the recurrent
reference, values and gradients (tests/ops/test_gated_delta_rule.py).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from sinkrec.ops import _cpp
from sinkrec.ops.gated_delta import chunk as _chunk
from sinkrec.ops.gated_delta.chunk import _from_chunks, _layout, _Packed, _Padded, _to_chunks

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

using I = int64_t;

// The chunk size C and the head dims K, V are template parameters: with the trip counts known, GCC
// keeps a product's output row in vector registers across its inner sum and unrolls the row (32
// floats = two AVX-512 vectors). Instantiated for C = 32 and K = V in {16, 32, 64, 128} (`DIMS`);
// other shapes run chunk.py.

// Products are latency-bound at these sizes (one output row is 2 vectors at N = 32, and each of its P
// multiply-adds waits for the last): R output rows at a time, R * N = 128 floats (8 AVX-512 registers)
// of independent accumulators.
template <I N>
static constexpr I rows_at_once() { return N >= 128 ? 1 : 128 / N; }

// c[M x N] (+)= alpha op(a) b, row-major with leading dims lc, la, lb; op(a) = a [M x P], or a^T with
// a [P x M] when TA
template <I M, I P, I N, bool TA>
static inline void matmul(float* c, I lc, const float* a, I la, const float* b, I lb, bool acc, float alpha) {
  constexpr I R = rows_at_once<N>() < M ? rows_at_once<N>() : M;
  static_assert(M % R == 0, "rows must split evenly");
  for (I i = 0; i < M; i += R) {
    float t[R][N];
    for (I r = 0; r < R; ++r) {
      if (acc) std::memcpy(t[r], c + (i + r) * lc, N * sizeof(float));
      else std::memset(t[r], 0, N * sizeof(float));
    }
    for (I l = 0; l < P; ++l) {
      const float* __restrict__ bl = b + l * lb;
      for (I r = 0; r < R; ++r) {
        const float s = alpha * (TA ? a[l * la + i + r] : a[(i + r) * la + l]);
#pragma omp simd
        for (I j = 0; j < N; ++j) t[r][j] += s * bl[j];
      }
    }
    for (I r = 0; r < R; ++r) std::memcpy(c + (i + r) * lc, t[r], N * sizeof(float));
  }
}

template <I M, I P, I N>
static inline void mm(float* c, I lc, const float* a, I la, const float* b, I lb, bool acc, float alpha = 1.f) {
  matmul<M, P, N, false>(c, lc, a, la, b, lb, acc, alpha);
}

template <I M, I P, I N>  // c (+)= alpha a^T b, a [P x M]
static inline void mm_tn(float* c, I lc, const float* a, I la, const float* b, I lb, bool acc, float alpha = 1.f) {
  matmul<M, P, N, true>(c, lc, a, la, b, lb, acc, alpha);
}

// t[N x M] = a[M x N]^T (a with leading dim la)
template <I M, I N>
static inline void transpose(float* __restrict__ t, const float* __restrict__ a, I la) {
  for (I i = 0; i < M; ++i)
    for (I j = 0; j < N; ++j) t[j * M + i] = a[i * la + j];
}

// one chunk's state-independent factors (chunk.py `_intra_chunk`)
template <I C, I K, I V>
struct Chunk {
  static constexpr I VK = V + K;
  alignas(64) float eg[C], ed[C], M[C * C], kb[C * K], kT[K * C], A[C * C], P[C * C], Tinv[C * C],
      rhs[C * VK], W[C * VK], qg[C * K], kd[C * K];

  // q, k [C x K], v [C x V], gm (gamma, the within-chunk cumsum of g), bt (beta) [C]
  void factors(const float* q, const float* k, const float* v, const float* gm, const float* bt) {
    const float gC = gm[C - 1];
#pragma omp simd
    for (I i = 0; i < C; ++i) {
      eg[i] = std::exp(gm[i]);
      ed[i] = std::exp(gC - gm[i]);
    }
    // exp only where j <= i, where gamma_i - gamma_j <= 0: above the diagonal it may overflow, and the
    // select drops it
    for (I i = 0; i < C; ++i) {
      const float gi = gm[i];
#pragma omp simd
      for (I j = 0; j < C; ++j) {
        const float e = std::exp(std::fmin(gi - gm[j], 0.f));
        M[i * C + j] = j <= i ? e : 0.f;
      }
#pragma omp simd
      for (I c = 0; c < K; ++c) kb[i * K + c] = bt[i] * k[i * K + c];
    }
    transpose<C, K>(kT, k, K);
    mm<C, K, C>(A, C, kb, K, kT, C, false);  // beta K K^T
    mm<C, K, C>(P, C, q, K, kT, C, false);  // Q K^T
#pragma omp simd
    for (I e = 0; e < C * C; ++e) {
      A[e] *= M[e];
      P[e] *= M[e];
    }
    // (I + A)^{-1} over A's strictly-lower part: row i = e_i - sum_{m < i} A_im row m
    // (two accumulators, even and odd m, for twice the independent multiply-adds)
    for (I i = 0; i < C; ++i) {
      float t0[C], t1[C];
      std::memset(t0, 0, sizeof(t0));
      std::memset(t1, 0, sizeof(t1));
      t0[i] = 1.f;
      I m = 0;
      for (; m + 1 < i; m += 2) {
        const float s0 = A[i * C + m], s1 = A[i * C + m + 1];
        const float* __restrict__ r0 = Tinv + m * C;
        const float* __restrict__ r1 = r0 + C;
#pragma omp simd
        for (I j = 0; j < C; ++j) {
          t0[j] -= s0 * r0[j];
          t1[j] -= s1 * r1[j];
        }
      }
      if (m < i) {
        const float s0 = A[i * C + m];
        const float* __restrict__ r0 = Tinv + m * C;
#pragma omp simd
        for (I j = 0; j < C; ++j) t0[j] -= s0 * r0[j];
      }
#pragma omp simd
      for (I j = 0; j < C; ++j) Tinv[i * C + j] = t0[j] + t1[j];
    }
    for (I i = 0; i < C; ++i) {  // rhs = [beta V | beta e^gamma K]
#pragma omp simd
      for (I c = 0; c < V; ++c) rhs[i * VK + c] = bt[i] * v[i * V + c];
#pragma omp simd
      for (I c = 0; c < K; ++c) rhs[i * VK + V + c] = kb[i * K + c] * eg[i];
    }
    mm<C, C, VK>(W, VK, Tinv, C, rhs, VK, false);  // [W_v | W_k]
    for (I i = 0; i < C; ++i)  // e^gamma Q reads the entering state, e^{gamma_C - gamma} K writes the leaving one
#pragma omp simd
      for (I c = 0; c < K; ++c) {
        qg[i * K + c] = q[i * K + c] * eg[i];
        kd[i * K + c] = k[i * K + c] * ed[i];
      }
  }

  // U [C x V] = W_v - W_k S0
  void u(float* U, const float* S0) const {
    for (I i = 0; i < C; ++i) std::memcpy(U + i * V, W + i * VK, V * sizeof(float));
    mm<C, K, V>(U, V, W + V, VK, S0, V, true, -1.f);
  }
};

struct Args {
  const float *q, *k, *v, *gamma, *beta, *states, *do_, *h0, *dht;
  float *o, *st_out, *final_, *dq, *dk, *dv, *dg, *dbeta, *dh0;
  const uint8_t *first, *last;
  const int64_t* seq;
  I N, BH;
};

template <I C, I K, I V>
static void fwd(const Args& a) {
  const I N = a.N, BH = a.BH;
  at::parallel_for(0, BH, 1, [&](I lo, I hi) {
    auto ch = std::make_unique<Chunk<C, K, V>>();
    alignas(64) float S[K * V], U[C * V];
    const float *qg = ch->qg, *kd = ch->kd;
    for (I bh = lo; bh < hi; ++bh) {
      for (I n = 0; n < N; ++n) {
        const I r = n * BH + bh;  // this chunk-head in the [N, BH] layout
        if (a.first[n]) {  // a sequence starts: its initial state, zero if none
          if (a.h0) std::memcpy(S, a.h0 + (a.seq[n] * BH + bh) * K * V, sizeof(S));
          else std::memset(S, 0, sizeof(S));
        }
        std::memcpy(a.st_out + r * K * V, S, sizeof(S));
        const float *qc = a.q + r * C * K, *kc = a.k + r * C * K, *gm = a.gamma + r * C;
        ch->factors(qc, kc, a.v + r * C * V, gm, a.beta + r * C);
        ch->u(U, S);
        float* oc = a.o + r * C * V;  // O = (e^gamma Q) S0 + (Q K^T o M) U
        mm<C, K, V>(oc, V, qg, K, S, V, false);
        mm<C, C, V>(oc, V, ch->P, C, U, V, true);
        const float decay = std::exp(gm[C - 1]);  // S_C = e^{gamma_C} S0 + kd^T U
#pragma omp simd
        for (I e = 0; e < K * V; ++e) S[e] *= decay;
        mm_tn<K, C, V>(S, V, kd, K, U, V, true);
        if (a.last[n]) std::memcpy(a.final_ + (a.seq[n] * BH + bh) * K * V, S, sizeof(S));
      }
    }
  });
}

template <I C, I K, I V>
static void bwd(const Args& a) {
  constexpr I VK = V + K;
  const I N = a.N, BH = a.BH;
  at::parallel_for(0, BH, 1, [&](I lo, I hi) {
    auto ch = std::make_unique<Chunk<C, K, V>>();
    struct Scratch {
      alignas(64) float dS[K * V], dS0[K * V], U[C * V], dU[C * V], S0T[V * K], dS1T[V * K],
          dqg[C * K], dkd[C * K], dW[C * VK], drhs[C * VK], WT[VK * C], UT[V * C], dA[C * C], dP[C * C],
          dkbt[C * K], dgam[C], col[C];
    };
    auto sc = std::make_unique<Scratch>();
    float *dS = sc->dS, *dS0 = sc->dS0, *U = sc->U, *dU = sc->dU;
    const float *qg = ch->qg, *kd = ch->kd;
    float *dqg = sc->dqg, *dkd = sc->dkd, *dW = sc->dW, *drhs = sc->drhs, *dA = sc->dA, *dP = sc->dP;
    float *dkbt = sc->dkbt, *dgam = sc->dgam, *col = sc->col;
    for (I bh = lo; bh < hi; ++bh) {
      for (I n = N - 1; n >= 0; --n) {
        const I rr = n * BH + bh;
        if (a.last[n]) std::memcpy(dS, a.dht + (a.seq[n] * BH + bh) * K * V, K * V * sizeof(float));
        const float *qc = a.q + rr * C * K, *kc = a.k + rr * C * K, *vc = a.v + rr * C * V;
        const float *gm = a.gamma + rr * C, *bt = a.beta + rr * C, *S0 = a.states + rr * K * V;
        const float* doc = a.do_ + rr * C * V;
        ch->factors(qc, kc, vc, gm, bt);
        ch->u(U, S0);
        const float decay = std::exp(gm[C - 1]);
        // dU = P^T dO + kd dS1;  dS0 = e^{gamma_C} dS1 + qg^T dO - W_k^T dU
        mm_tn<C, C, V>(dU, V, ch->P, C, doc, V, false);
        mm<C, K, V>(dU, V, kd, K, dS, V, true);
#pragma omp simd
        for (I e = 0; e < K * V; ++e) dS0[e] = decay * dS[e];
        mm_tn<K, C, V>(dS0, V, qg, K, doc, V, true);
        mm_tn<K, C, V>(dS0, V, ch->W + V, VK, dU, V, true, -1.f);
        const float dgamma_C = decay * dot(S0, dS, K * V);
        transpose<K, V>(sc->S0T, S0, V);
        transpose<K, V>(sc->dS1T, dS, V);
        mm<C, V, K>(dqg, K, doc, V, sc->S0T, K, false);  // dO S0^T
        mm<C, V, K>(dkd, K, U, V, sc->dS1T, K, false);  // U dS1^T
        for (I i = 0; i < C; ++i) std::memcpy(dW + i * VK, dU + i * V, V * sizeof(float));
        mm<C, V, K>(dW + V, VK, dU, V, sc->S0T, K, false, -1.f);  // dW = [dU | -dU S0^T]
        mm_tn<C, C, VK>(drhs, VK, ch->Tinv, C, dW, VK, false);  // (I + A)^{-T} dW
        transpose<C, VK>(sc->WT, ch->W, VK);
        mm<C, VK, C>(dA, C, drhs, VK, sc->WT, C, false, -1.f);  // -drhs W^T
        transpose<C, V>(sc->UT, U, V);
        mm<C, V, C>(dP, C, doc, V, sc->UT, C, false);  // dO U^T
        std::memset(col, 0, C * sizeof(float));
        for (I i = 0; i < C; ++i) {
          float rs = 0.f;
#pragma omp simd reduction(+ : rs)
          for (I j = 0; j < C; ++j) {
            const I e = i * C + j;
            const float da = j < i ? dA[e] : 0.f;  // only A's strictly-lower entries are parameters
            const float dp = j <= i ? dP[e] : 0.f;
            const float x = da * ch->A[e] + dp * ch->P[e];  // w.r.t. gamma_i - gamma_j
            rs += x;
            col[j] += x;
            dA[e] = da * ch->M[e];
            dP[e] = dp * ch->M[e];
          }
          dgam[i] = rs;
        }
#pragma omp simd
        for (I i = 0; i < C; ++i) dgam[i] -= col[i];
        float *dqc = a.dq + rr * C * K, *dkc = a.dk + rr * C * K, *dvc = a.dv + rr * C * V;
        mm<C, C, K>(dqc, K, dP, C, kc, K, false);  // dq = dP k + dqg e^gamma
        mm<C, C, K>(dkbt, K, dA, C, kc, K, false);  // w.r.t. kb = beta k: dA k + dkb e^gamma
        mm_tn<C, C, K>(dkc, K, dA, C, ch->kb, K, false);  // dk = dA^T kb + dP^T q + ...
        mm_tn<C, C, K>(dkc, K, dP, C, qc, K, true);
        float rsum = 0.f;
        for (I i = 0; i < C; ++i) {
          const float* dkb = drhs + i * VK + V;
          const float* dvb = drhs + i * VK;
          const float egi = ch->eg[i], edi = ch->ed[i], bi = bt[i];
#pragma omp simd
          for (I c = 0; c < K; ++c) {
            dqc[i * K + c] += dqg[i * K + c] * egi;
            dkbt[i * K + c] += dkb[c] * egi;
            dkc[i * K + c] += dkd[i * K + c] * edi + dkbt[i * K + c] * bi;
          }
#pragma omp simd
          for (I c = 0; c < V; ++c) dvc[i * V + c] = dvb[c] * bi;
          a.dbeta[rr * C + i] = dot(dkbt + i * K, kc + i * K, K) + dot(dvb, vc + i * V, V);
          const float r = dot(dkd + i * K, kd + i * K, K);
          rsum += r;
          dgam[i] += dot(dqg + i * K, qg + i * K, K) + dot(dkb, ch->kb + i * K, K) * egi - r;
        }
        dgam[C - 1] += dgamma_C + rsum;
        float acc = 0.f;  // gamma = cumsum(g): dg_j = sum_{i >= j} dgamma_i
        for (I i = C - 1; i >= 0; --i) {
          acc += dgam[i];
          a.dg[rr * C + i] = acc;
        }
        std::swap(dS, dS0);
        if (a.first[n]) std::memcpy(a.dh0 + (a.seq[n] * BH + bh) * K * V, dS, K * V * sizeof(float));
      }
    }
  });
}

// the instantiated shapes: C = 32, K = V in {16, 32, 64, 128}
template <bool FWD>
static void dispatch(I C, I K, I V, const Args& a) {
  TORCH_CHECK(C == 32 && K == V, "sinkrec_gated_delta: C = 32 and K = V only, got C ", C, " K ", K, " V ", V);
  switch (K) {
    case 16: return FWD ? fwd<32, 16, 16>(a) : bwd<32, 16, 16>(a);
    case 32: return FWD ? fwd<32, 32, 32>(a) : bwd<32, 32, 32>(a);
    case 64: return FWD ? fwd<32, 64, 64>(a) : bwd<32, 64, 64>(a);
    case 128: return FWD ? fwd<32, 128, 128>(a) : bwd<32, 128, 128>(a);
    default: TORCH_CHECK(false, "sinkrec_gated_delta: K = V in {16, 32, 64, 128} only, got ", K);
  }
}

// inputs in chunk layout [N, BH, C, *] (chunk.py `_prepare`); first / last uint8 [N], seq int64 [N]: whether
// chunk n starts / ends its sequence and which one; h0 [S, BH, K, V] or empty; final [S, BH, K, V] (written at
// each sequence's last chunk). -> {o [N, BH, C, V], states [N, BH, K, V] (the state entering each chunk)}
std::vector<torch::Tensor> chunk_fwd(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor gamma,
                                     torch::Tensor beta, torch::Tensor first, torch::Tensor last, torch::Tensor seq,
                                     torch::Tensor h0, torch::Tensor final_) {
  const I N = q.size(0), BH = q.size(1), C = q.size(2), K = q.size(3), V = v.size(3);
  auto o = torch::empty({N, BH, C, V}, q.options());
  auto states = torch::empty({N, BH, K, V}, q.options());
  Args a{};
  a.q = q.data_ptr<float>(); a.k = k.data_ptr<float>(); a.v = v.data_ptr<float>();
  a.gamma = gamma.data_ptr<float>(); a.beta = beta.data_ptr<float>();
  a.h0 = h0.numel() ? h0.data_ptr<float>() : nullptr;
  a.o = o.data_ptr<float>(); a.st_out = states.data_ptr<float>(); a.final_ = final_.data_ptr<float>();
  a.first = first.data_ptr<uint8_t>(); a.last = last.data_ptr<uint8_t>(); a.seq = seq.data_ptr<int64_t>();
  a.N = N; a.BH = BH;
  dispatch<true>(C, K, V, a);
  return {o, states};
}

// gradients from the forward's chunk-layout inputs and entering states; do [N, BH, C, V]; dht [S, BH, K, V]
// (the final states' gradient, zeros if none); dh0 [S, BH, K, V] (written at each sequence's first chunk).
// -> {dq, dk [N, BH, C, K], dv [N, BH, C, V], dg, dbeta [N, BH, C]} (dq w.r.t. the scaled q)
std::vector<torch::Tensor> chunk_bwd(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor gamma,
                                     torch::Tensor beta, torch::Tensor states, torch::Tensor do_,
                                     torch::Tensor first, torch::Tensor last, torch::Tensor seq,
                                     torch::Tensor dht, torch::Tensor dh0) {
  const I N = q.size(0), BH = q.size(1), C = q.size(2), K = q.size(3), V = v.size(3);
  auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);
  auto dg = torch::empty_like(gamma), dbeta = torch::empty_like(beta);
  Args a{};
  a.q = q.data_ptr<float>(); a.k = k.data_ptr<float>(); a.v = v.data_ptr<float>();
  a.gamma = gamma.data_ptr<float>(); a.beta = beta.data_ptr<float>(); a.states = states.data_ptr<float>();
  a.do_ = do_.data_ptr<float>(); a.dht = dht.data_ptr<float>();
  a.dq = dq.data_ptr<float>(); a.dk = dk.data_ptr<float>(); a.dv = dv.data_ptr<float>();
  a.dg = dg.data_ptr<float>(); a.dbeta = dbeta.data_ptr<float>(); a.dh0 = dh0.data_ptr<float>();
  a.first = first.data_ptr<uint8_t>(); a.last = last.data_ptr<uint8_t>(); a.seq = seq.data_ptr<int64_t>();
  a.N = N; a.BH = BH;
  dispatch<false>(C, K, V, a);
  return {dq, dk, dv, dg, dbeta};
}
"""

FUNCTIONS = ("chunk_fwd", "chunk_bwd")  # what _SOURCE exports (sinkrec.ops._cpp builds the kernels as one module)


KV_SIZES = (16, 32, 64, 128)  # the instantiated head dims (K = V)


def cpp_fits(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel runs these inputs: CPU, K = V in KV_SIZES, float32 accumulation (float64 stays
    on chunk.py, which accumulates in float64), the chunk size it is built for."""
    return (not q.is_cuda and q.shape[-1] == v.shape[-1] and q.shape[-1] in KV_SIZES and _chunk.CHUNK_SIZE == 32
            and torch.promote_types(v.dtype, torch.float32) == torch.float32)


def _bounds(chunks: _Padded | _Packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk bookkeeping as tensors: first, last (uint8) and seq (int64), one entry per chunk."""
    return (torch.tensor(chunks.first, dtype=torch.uint8), torch.tensor(chunks.last, dtype=torch.uint8),
            torch.tensor(chunks.seq, dtype=torch.int64))


class ChunkCppFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale: float, initial_state, cu_seqlens):
        B, T, H, K, V = *k.shape, v.shape[-1]
        packed, chunks, n_seq, (qc, kc, vc, gamma, betac) = _layout(q, k, v, g, beta, scale, cu_seqlens)
        BH = kc.shape[1]
        h0 = None if initial_state is None else initial_state.reshape(n_seq, BH, K, V).float().contiguous()
        final = qc.new_zeros(n_seq, BH, K, V) if h0 is None else h0.clone()
        bounds = _bounds(chunks)
        o, states = _cpp.module().chunk_fwd(qc, kc, vc, gamma, betac, *bounds,
                                        torch.empty(0) if h0 is None else h0, final)
        ctx.save_for_backward(qc, kc, vc, gamma, betac, states)
        ctx.bounds, ctx.packed, ctx.n_seq, ctx.shape, ctx.scale = bounds, packed, n_seq, (B, T), scale
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, g.dtype, beta.dtype,
                      None if initial_state is None else initial_state.dtype)
        ctx.set_materialize_grads(False)
        o = _from_chunks(o, B, T) if packed is None else packed.from_chunks(o)
        return o, final.view(n_seq * B, H, K, V)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dht):
        qc, kc, vc, gamma, betac, states = ctx.saved_tensors
        B, T = ctx.shape
        BH, C, K, V = kc.shape[1], kc.shape[2], kc.shape[3], vc.shape[3]
        H, packed = BH // B, ctx.packed
        if do is None:  # only the final state was used
            doc = torch.zeros_like(vc)
        else:
            doc = _to_chunks(do, C, torch.float32) if packed is None else packed.to_chunks(do, C, torch.float32)
        dht = qc.new_zeros(ctx.n_seq, BH, K, V) if dht is None else dht.float().reshape(ctx.n_seq, BH, K, V).contiguous()
        dh0 = dht.clone()  # a sequence with no positions passes its final-state gradient straight back
        dq, dk, dv, dg, dbeta = _cpp.module().chunk_bwd(qc, kc, vc, gamma, betac, states, doc, *ctx.bounds, dht, dh0)
        back = (lambda x: _from_chunks(x, B, T)) if packed is None else packed.from_chunks
        dq = back(dq)
        if ctx.scale != 1.0:
            dq.mul_(ctx.scale)  # q entered as scale * q
        dk, dv, dg, dbeta = back(dk), back(dv), back(dg[..., None])[..., 0], back(dbeta[..., None])[..., 0]
        grads = (dq, dk, dv, dg, dbeta, dh0.view(ctx.n_seq * B, H, K, V))
        dq, dk, dv, dg, dbeta, dh0 = (None if t is None else x.to(t) for x, t in zip(grads, ctx.dtypes))
        return dq, dk, dv, dg, dbeta, None, dh0, None


def chunk_cpp_gated_delta_rule(
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
    """Same contract as `recurrent_gated_delta_rule` (inputs `cpp_fits` accepts; see `sinkrec.ops.gated_delta_rule`)."""
    o, final_state = ChunkCppFunction.apply(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    return o, (final_state if output_final_state else None)
