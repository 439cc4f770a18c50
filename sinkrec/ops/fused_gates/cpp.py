"""The TDGD gates with memory (`naive.gates_reference`, memory=True) as one C++ loop per pass: CPU,
float32, built by `sinkrec.ops._cpp` at first use.

The reference runs ~20 PyTorch ops forward and about twice that backward, each a pass over
[B, T, H] or [B, T, H, K] tensors. Here one pass over the positions computes every output of a
(position, head): the two dot products <k, km> and <q, km>, the gates, q~ and v~; and one pass
back recomputes those scalars and writes every input gradient, with the [H] parameters' gradients
summed in per-thread partials. The [B, T, H, *] inputs may be strided views (TDGD passes slices
of projections) as long as their last dim is contiguous and B and T merge into one stride.

Without memory the gates are a few [B, T, H] elementwise ops and q~, v~ are q, v themselves:
`gates_cpp` then runs the reference. `phi` (the time gaps) is data: a phi that requires grad
takes the reference too. Equal to the reference up to float rounding (tests/model/test_fused_gates.py).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from sinkrec.ops import _cpp
from sinkrec.ops.fused_gates.naive import GateOut, gates_reference

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

// Each pass works on blocks of positions in three loops: the per-row dot products and
// pre-activations, then every exp / log of the block in one `omp simd` loop (vectorized through
// libmvec under -ffast-math; one scalar call per row would cost more than the row's arithmetic),
// then the rows' vector outputs.
static constexpr int64_t BLOCK = 128;  // positions per block

// sig, dot: sinkrec.ops._cpp.COMMON
static inline float softplus(float z) { return std::fmax(z, 0.f) + std::log(1.f + std::exp(-std::fabs(z))); }

// a [BT, H, D] view with a contiguous last dim: element (p, h, c) at p * s0 + h * s1 + c
struct Rows {
  const float* p; int64_t s0, s1;
  explicit Rows(const torch::Tensor& t) : p(t.data_ptr<float>()), s0(t.stride(0)), s1(t.stride(1)) {}
  const float* at(int64_t pos, int64_t h) const { return p + pos * s0 + h * s1; }
};
// a [BT, H] view: element (p, h) at p * s0 + h * s1
struct Cols {
  const float* p; int64_t s0, s1;
  explicit Cols(const torch::Tensor& t) : p(t.data_ptr<float>()), s0(t.stride(0)), s1(t.stride(1)) {}
  float at(int64_t pos, int64_t h) const { return p[pos * s0 + h * s1]; }
};

// the inputs both passes read
struct In {
  Rows Q, Kk, KM, VM;
  Cols A, Bx, L;
  const float *ph, *mk, *pp, *bias;
  int64_t H, K, V;
  bool purify, diff, temporal;
  // pre-activations of row o = p * H + h: za (decay), zb (write), zr (coverage, needs kk = <k, km>), zl
  void pre(int64_t p, int64_t h, float& za, float& zb, float& zr, float& zl, float& kk) const {
    const float t = temporal ? ph[p] : 0.f;
    za = A.at(p, h) + pp[H + h] + pp[2 * H + h] * t;
    zb = Bx.at(p, h) + pp[3 * H + h] * t;
    kk = dot(Kk.at(p, h), KM.at(p, h), K);
    zr = pp[4 * H + h] * kk + pp[5 * H + h] + (bias ? bias[p * H + h] : 0.f);
    zl = diff ? L.at(p, h) : 0.f;
  }
};

static In make_in(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& km, const torch::Tensor& vm,
                  const torch::Tensor& a_x, const torch::Tensor& b_x, const torch::Tensor& l_x,
                  const torch::Tensor& phi, const torch::Tensor& mask, const torch::Tensor& par,
                  const torch::Tensor& rho_bias, bool purify, bool diff, bool temporal) {
  const bool has_bias = rho_bias.defined() && rho_bias.numel() > 0;
  return In{Rows(q), Rows(k), Rows(km), Rows(vm), Cols(a_x), Cols(b_x), Cols(l_x),
            phi.data_ptr<float>(), mask.data_ptr<float>(), par.data_ptr<float>(),
            has_bias ? rho_bias.data_ptr<float>() : nullptr, q.size(1), q.size(2), vm.size(2),
            purify, diff, temporal};
}

// par [6, H]: A_log, dt_bias, c_a, c_b, s_rho, b_rho. rho_bias: [BT, H] (contiguous) or an empty tensor.
// -> {q~ [BT, H, K] (a copy of q without diff_read), v~ [BT, H, V] (of v without purify_write), g, beta, r [BT, H]}
std::vector<torch::Tensor> gates_fwd(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor km,
                                     torch::Tensor vm, torch::Tensor a_x, torch::Tensor b_x, torch::Tensor l_x,
                                     torch::Tensor phi, torch::Tensor mask, torch::Tensor par,
                                     torch::Tensor rho_bias, bool purify, bool diff, bool temporal) {
  const In in = make_in(q, k, km, vm, a_x, b_x, l_x, phi, mask, par, rho_bias, purify, diff, temporal);
  const int64_t BT = q.size(0), H = in.H, K = in.K, V = in.V;
  auto opt = torch::TensorOptions().dtype(torch::kFloat32);
  auto qo = torch::empty({BT, H, K}, opt), vo = torch::empty({BT, H, V}, opt);
  auto g = torch::empty({BT, H}, opt), beta = torch::empty({BT, H}, opt), r = torch::empty({BT, H}, opt);
  const Rows Vv(v);
  float *qop = qo.data_ptr<float>(), *vop = vo.data_ptr<float>();
  float *gp = g.data_ptr<float>(), *bp = beta.data_ptr<float>(), *rp = r.data_ptr<float>();
  at::parallel_for(0, (BT + BLOCK - 1) / BLOCK, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(6 * BLOCK * H);
    float *za = buf.data(), *zb = za + BLOCK * H, *zr = zb + BLOCK * H, *zl = zr + BLOCK * H;
    float *qk = zl + BLOCK * H, *gm = qk + BLOCK * H;
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t p0 = blk * BLOCK, p1 = std::min(BT, p0 + BLOCK), n = (p1 - p0) * H;
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t i = (p - p0) * H + h;
          float kk;
          in.pre(p, h, za[i], zb[i], zr[i], zl[i], kk);
          qk[i] = dot(in.Q.at(p, h), in.KM.at(p, h), K);
          gm[i] = -std::exp(in.pp[h]) * in.mk[p];  // g = gm softplus(za)
        }
      float *g0 = gp + p0 * H, *b0 = bp + p0 * H, *r0 = rp + p0 * H;
      const float* m0 = in.mk + p0;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float rho = sig(zr[i]), b = sig(zb[i]) * m0[i / H];
        g0[i] = gm[i] * softplus(za[i]);
        r0[i] = rho * qk[i];
        b0[i] = purify ? b * (1.f - rho) : b;
        zr[i] = purify ? rho : 0.f;  // the factor of vm in v~
        zl[i] = diff ? sig(zl[i]) : 0.f;  // the factor of km in q~
      }
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t i = (p - p0) * H + h, o = p * H + h;
          const float rv = zr[i], sl = zl[i];
          const float* __restrict__ vr = Vv.at(p, h);
          const float* __restrict__ vmr = in.VM.at(p, h);
          float* __restrict__ vout = vop + o * V;
#pragma omp simd
          for (int64_t c = 0; c < V; ++c) vout[c] = vr[c] - rv * vmr[c];
          const float* __restrict__ qr = in.Q.at(p, h);
          const float* __restrict__ kmr = in.KM.at(p, h);
          float* __restrict__ qout = qop + o * K;
#pragma omp simd
          for (int64_t c = 0; c < K; ++c) qout[c] = qr[c] - sl * kmr[c];
        }
    }
  });
  return {qo, vo, g, beta, r};
}

// dqo [BT, H, K], dvo [BT, H, V], dg, dbeta, dr [BT, H], all contiguous.
// -> {dq, dk, dkm [BT, H, K], dvm [BT, H, V] (empty without purify_write), da, db, dl, drho_bias [BT, H],
//     dpar [6, H]}; dv = dvo (the caller's)
std::vector<torch::Tensor> gates_bwd(torch::Tensor q, torch::Tensor k, torch::Tensor km, torch::Tensor vm,
                                     torch::Tensor a_x, torch::Tensor b_x, torch::Tensor l_x, torch::Tensor phi,
                                     torch::Tensor mask, torch::Tensor par, torch::Tensor rho_bias,
                                     torch::Tensor dqo, torch::Tensor dvo, torch::Tensor dg, torch::Tensor dbeta,
                                     torch::Tensor dr, bool purify, bool diff, bool temporal) {
  const In in = make_in(q, k, km, vm, a_x, b_x, l_x, phi, mask, par, rho_bias, purify, diff, temporal);
  const int64_t BT = q.size(0), H = in.H, K = in.K, V = in.V;
  auto opt = torch::TensorOptions().dtype(torch::kFloat32);
  auto dq = torch::empty({BT, H, K}, opt), dk = torch::empty({BT, H, K}, opt), dkm = torch::empty({BT, H, K}, opt);
  auto dvm = purify ? torch::empty({BT, H, V}, opt) : torch::Tensor();
  auto da = torch::empty({BT, H}, opt), db = torch::empty({BT, H}, opt), dl = torch::empty({BT, H}, opt);
  auto dbias = torch::empty({BT, H}, opt);
  const float *dqop = dqo.data_ptr<float>(), *dvop = dvo.data_ptr<float>();
  const float *dgp = dg.data_ptr<float>(), *dbp = dbeta.data_ptr<float>(), *drp = dr.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dkmp = dkm.data_ptr<float>();
  float* dvmp = purify ? dvm.data_ptr<float>() : nullptr;
  float *dap = da.data_ptr<float>(), *dbxp = db.data_ptr<float>(), *dlp = dl.data_ptr<float>();
  float* dbiasp = dbias.data_ptr<float>();
  const float* pp = in.pp;
  const int nthreads = at::get_num_threads();
  std::vector<float> dpar_part((size_t)nthreads * 6 * H, 0.f);
  at::parallel_for(0, (BT + BLOCK - 1) / BLOCK, 1, [&](int64_t lo, int64_t hi) {
    float* dpar = dpar_part.data() + (size_t)at::get_thread_num() * 6 * H;
    std::vector<float> buf(10 * BLOCK * H);
    float *za = buf.data(), *zb = za + BLOCK * H, *zr = zb + BLOCK * H, *zl = zr + BLOCK * H;
    float *kk = zl + BLOCK * H, *qk = kk + BLOCK * H, *dvv = qk + BLOCK * H, *dqm = dvv + BLOCK * H;
    float *sp = dqm + BLOCK * H, *ph = sp + BLOCK * H;
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t p0 = blk * BLOCK, p1 = std::min(BT, p0 + BLOCK), n = (p1 - p0) * H;
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t i = (p - p0) * H + h, o = p * H + h;
          in.pre(p, h, za[i], zb[i], zr[i], zl[i], kk[i]);
          qk[i] = dot(in.Q.at(p, h), in.KM.at(p, h), K);
          dvv[i] = purify ? dot(dvop + o * V, in.VM.at(p, h), V) : 0.f;  // <dv~, vm>
          dqm[i] = diff ? dot(dqop + o * K, in.KM.at(p, h), K) : 0.f;  // <dq~, km>
          ph[i] = temporal ? in.ph[p] : 0.f;
        }
      const float* m0 = in.mk + p0;
      const float *dg0 = dgp + p0 * H, *db0 = dbp + p0 * H, *dr0 = drp + p0 * H;
      float *da0 = dap + p0 * H, *dbx0 = dbxp + p0 * H, *dl0 = dlp + p0 * H, *dbias0 = dbiasp + p0 * H;
      // the transcendentals and every scalar gradient; za, zb, zr, zl, sp are reused for dza, dzb, dzr,
      // the factor sl of km in q~ and the factor rho of vm in v~
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float m = m0[i / H];
        const float sb = sig(zb[i]), b = sb * m, rho = sig(zr[i]), sl = diff ? sig(zl[i]) : 0.f;
        sp[i] = softplus(za[i]);  // dA_log = dg g = dg (-e^{A_log} softplus(za) m), times e^{A_log} below
        za[i] = dg0[i] * m * sig(za[i]);  // dza, times -e^{A_log} below
        const float drho = dr0[i] * qk[i] - (purify ? db0[i] * b + dvv[i] : 0.f);
        const float dbb = purify ? db0[i] * (1.f - rho) : db0[i];
        zb[i] = dbb * m * sb * (1.f - sb);  // dzb
        dbx0[i] = zb[i];
        zr[i] = drho * rho * (1.f - rho);  // dzr
        dbias0[i] = zr[i];
        dl0[i] = diff ? -sl * (1.f - sl) * dqm[i] : 0.f;
        qk[i] = dr0[i] * rho;  // dqk
        zl[i] = sl;
        dvv[i] = purify ? rho : 0.f;
        sp[i] *= -dg0[i] * m;
      }
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t i = (p - p0) * H + h, o = p * H + h;
          const float ea = std::exp(pp[h]), dza = -ea * za[i];
          da0[i] = dza;
          dpar[h] += ea * sp[i];
          dpar[H + h] += dza;
          dpar[2 * H + h] += dza * ph[i];
          dpar[3 * H + h] += zb[i] * ph[i];
          dpar[4 * H + h] += zr[i] * kk[i];
          dpar[5 * H + h] += zr[i];
          const float dkk = zr[i] * pp[4 * H + h], dqk = qk[i], sl = zl[i], rho = dvv[i];
          const float* __restrict__ qr = in.Q.at(p, h);
          const float* __restrict__ kr = in.Kk.at(p, h);
          const float* __restrict__ kmr = in.KM.at(p, h);
          const float* __restrict__ dqor = dqop + o * K;
          float* __restrict__ dqr = dqp + o * K;
          float* __restrict__ dkr = dkp + o * K;
          float* __restrict__ dkmr = dkmp + o * K;
#pragma omp simd
          for (int64_t c = 0; c < K; ++c) {
            dqr[c] = dqor[c] + dqk * kmr[c];
            dkr[c] = dkk * kmr[c];
            dkmr[c] = dkk * kr[c] + dqk * qr[c] - sl * dqor[c];
          }
          if (purify) {
            const float* __restrict__ dvor = dvop + o * V;
            float* __restrict__ dvmr = dvmp + o * V;
#pragma omp simd
            for (int64_t c = 0; c < V; ++c) dvmr[c] = -rho * dvor[c];
          }
        }
    }
  });
  auto dpar = torch::zeros({6, H}, opt);
  float* dpp = dpar.data_ptr<float>();
  for (int i = 0; i < nthreads; ++i)
    for (int64_t j = 0; j < 6 * H; ++j) dpp[j] += dpar_part[(size_t)i * 6 * H + j];
  return {dq, dk, dkm, dvm, da, db, dl, dbias, dpar};
}
"""

FUNCTIONS = ("gates_fwd", "gates_bwd")  # what _SOURCE exports (sinkrec.ops._cpp builds the kernels as one module)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H(, D)] -> [B*T, H(, D)] with a contiguous last dim; a view where the strides allow."""
    if x.stride(-1) != 1 or x.stride(0) != x.shape[1] * x.stride(1):
        x = x.contiguous()
    return x.flatten(0, 1)


class GatesCppFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, km, vm, a_x, b_x, l_x, phi, mask, A_log, dt_bias, c_a, c_b, s_rho, b_rho,
                rho_bias, purify_write: bool, diff_read: bool, temporal: bool):
        B, T, H, K = q.shape
        V = v.shape[-1]
        par = torch.stack([A_log, dt_bias, c_a, c_b, s_rho, b_rho]).detach().contiguous()
        l_x = l_x if diff_read else a_x  # unread without the differential read
        bias = torch.empty(0) if rho_bias is None else rho_bias.contiguous().flatten(0, 1)  # [B*T, H], dense
        ins = [_rows(x) for x in (q, k, v, km, vm, a_x, b_x, l_x)] + [
            phi.reshape(-1).float().contiguous(), mask.reshape(-1).float(), par, bias]
        qo, vo, g, beta, r = _cpp.module().gates_fwd(*ins, purify_write, diff_read, temporal)
        ctx.save_for_backward(*ins[:2], *ins[3:])  # all but v
        ctx.flags = (purify_write, diff_read, temporal)
        ctx.has_bias = rho_bias is not None
        return qo.view(B, T, H, K), vo.view(B, T, H, V), g.view(B, T, H), beta.view(B, T, H), r.view(B, T, H)

    @staticmethod
    @once_differentiable
    def backward(ctx, dqo, dvo, dg, dbeta, dr):
        q, k, km, vm, a_x, b_x, l_x, phi, mask, par, bias = ctx.saved_tensors
        purify_write, diff_read, temporal = ctx.flags
        B, T, H, K = dqo.shape
        V = dvo.shape[-1]
        c = lambda x, *shape: x.contiguous().view(*shape)
        dq, dk, dkm, dvm, da, db, dl, dbias, dpar = _cpp.module().gates_bwd(
            q, k, km, vm, a_x, b_x, l_x, phi, mask, par, bias, c(dqo, B * T, H, K), c(dvo, B * T, H, V),
            c(dg, B * T, H), c(dbeta, B * T, H), c(dr, B * T, H), purify_write, diff_read, temporal)
        bt = (B, T, H)
        return (dq.view(B, T, H, K), dk.view(B, T, H, K), dvo, dkm.view(B, T, H, K),
                dvm.view(B, T, H, V) if purify_write else None, da.view(bt), db.view(bt),
                dl.view(bt) if diff_read else None, None, None, *dpar.unbind(0),
                dbias.view(bt) if ctx.has_bias else None, None, None, None)


def gates_cpp(q, k, v, km, vm, a_x, b_x, l_x, phi, mask, A_log, dt_bias, c_a, c_b, s_rho, b_rho,
              memory: bool = True, purify_write: bool = True, diff_read: bool = True, temporal: bool = True,
              rho_bias: torch.Tensor | None = None) -> GateOut:
    """Same contract as `gates_reference` (float32 CPU tensors)."""
    if not memory or phi.requires_grad:
        return gates_reference(q, k, v, km, vm, a_x, b_x, l_x, phi, mask, A_log, dt_bias, c_a, c_b, s_rho, b_rho,
                               memory=memory, purify_write=purify_write, diff_read=diff_read, temporal=temporal,
                               rho_bias=rho_bias)
    return GateOut(*GatesCppFunction.apply(q, k, v, km, vm, a_x, b_x, l_x, phi, mask, A_log, dt_bias, c_a, c_b,
                                           s_rho, b_rho, rho_bias, purify_write, diff_read, temporal))
