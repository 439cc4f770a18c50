"""The gated output norm y = RMSNorm(x) * SiLU(g) as one C++ loop per pass (CPU, float32), built by
`sinkrec.ops._cpp` at first use.

PyTorch runs it as ~5 elementwise passes forward (the norm's reduction, its scale, the weight,
SiLU, the product) and ~9 backward, each streaming [rows, V] through memory. Here each pass reads a
row of x and g once and writes its result: forward y; backward dx, dg and the weight gradient
(per-thread partial sums), with 1/rms recomputed from x (cheaper than storing and re-reading it).
Equal to `naive.gated_rms_norm_reference` up to float rounding (tests/ops/test_gated_norm.py).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from sinkrec.ops import _cpp

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

// 1 / sqrt(mean(x^2) + eps) of one row (sig, dot: sinkrec.ops._cpp.COMMON)
static inline float inv_rms(const float* __restrict__ x, int64_t V, float eps) {
  return 1.f / std::sqrt(dot(x, x, V) / (float)V + eps);
}

// x, g [R, V] contiguous, w [V] -> y [R, V] = x r w silu(g)
torch::Tensor gnorm_fwd(torch::Tensor x, torch::Tensor g, torch::Tensor w, double eps) {
  const int64_t V = x.size(-1), R = x.numel() / V;
  auto y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *gp = g.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, R, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* __restrict__ xr = xp + r * V;
      const float* __restrict__ gr = gp + r * V;
      float* __restrict__ yr = yp + r * V;
      const float s = inv_rms(xr, V, (float)eps);
#pragma omp simd
      for (int64_t c = 0; c < V; ++c) yr[c] = xr[c] * s * wp[c] * gr[c] * sig(gr[c]);
    }
  });
  return y;
}

// -> {dx, dg, dw [V]}: with n = x r, a = n w, y = a silu(g):
//   dg = dy a silu'(g), da = dy silu(g), dw = sum_rows da n, dx = r (dn - n mean(dn n)) with dn = da w
std::vector<torch::Tensor> gnorm_bwd(torch::Tensor x, torch::Tensor g, torch::Tensor w, torch::Tensor dy,
                                     double eps) {
  const int64_t V = x.size(-1), R = x.numel() / V;
  auto dx = torch::empty_like(x), dg = torch::empty_like(g);
  const float *xp = x.data_ptr<float>(), *gp = g.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float* dyp = dy.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *dgp = dg.data_ptr<float>();
  const int nthreads = at::get_num_threads();
  std::vector<float> dw_part((size_t)nthreads * V, 0.f);
  at::parallel_for(0, R, 1024, [&](int64_t lo, int64_t hi) {
    float* __restrict__ dwl = dw_part.data() + (size_t)at::get_thread_num() * V;
    std::vector<float> dn(V);
    for (int64_t r = lo; r < hi; ++r) {
      const float* __restrict__ xr = xp + r * V;
      const float* __restrict__ gr = gp + r * V;
      const float* __restrict__ dyr = dyp + r * V;
      float* __restrict__ dgr = dgp + r * V;
      float* __restrict__ dxr = dxp + r * V;
      float* __restrict__ dnr = dn.data();
      const float s = inv_rms(xr, V, (float)eps);
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < V; ++c) {
        const float n = xr[c] * s, z = gr[c], sg = sig(z);
        const float da = dyr[c] * z * sg;
        dgr[c] = dyr[c] * n * wp[c] * sg * (1.f + z * (1.f - sg));
        dwl[c] += da * n;
        dnr[c] = da * wp[c];
        dot += dnr[c] * n;
      }
      const float m = dot / (float)V;
#pragma omp simd
      for (int64_t c = 0; c < V; ++c) dxr[c] = s * (dnr[c] - xr[c] * s * m);
    }
  });
  auto dw = torch::zeros({V}, x.options());
  float* dwp = dw.data_ptr<float>();
  for (int i = 0; i < nthreads; ++i)
    for (int64_t c = 0; c < V; ++c) dwp[c] += dw_part[(size_t)i * V + c];
  return {dx, dg, dw};
}
"""

FUNCTIONS = ("gnorm_fwd", "gnorm_bwd")  # what _SOURCE exports (sinkrec.ops._cpp builds the kernels as one module)


class GatedRMSNormCppFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x, g, w = x.contiguous(), g.contiguous(), weight.detach().float().contiguous()
        ctx.save_for_backward(x, g, w)
        ctx.eps, ctx.w_dtype = eps, weight.dtype
        return _cpp.module().gnorm_fwd(x, g, w, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, g, w = ctx.saved_tensors
        dx, dg, dw = _cpp.module().gnorm_bwd(x, g, w, dy.contiguous(), ctx.eps)
        want_dx, want_dg, want_dw = ctx.needs_input_grad[:3]
        return (dx if want_dx else None), (dg if want_dg else None), (dw.to(ctx.w_dtype) if want_dw else None), None


def gated_rms_norm_cpp(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Same contract as `naive.gated_rms_norm_reference` (float32 CPU tensors)."""
    return GatedRMSNormCppFunction.apply(x, g, weight, eps)
