"""Short causal depthwise convolution + SiLU as one C++ loop per pass (CPU, float32), compiled at
first use with `torch.utils.cpp_extension.load_inline` into $TORCH_EXTENSIONS_DIR.

The same math as `channels_last.py` (and the contract of `naive.short_conv_reference`), but each
pass touches every element once: the forward reads x and writes act(y); the backward recomputes y
from x (W multiply-adds, cheaper than storing and re-reading it), and produces dx and dw in one sweep
over time blocks, with dy = act'(y) * dout kept in a small per-block buffer. The PyTorch fast path
runs ~2W + 4 elementwise passes for the same work (docs/MODEL.md, "Layer benchmark").

Built by `sinkrec.ops._cpp` (-O3 -ffast-math, the CPU's vector ISA: the SiLU's exp vectorizes
through libmvec); results differ from the reference by float rounding only
(tests/ops/test_short_conv.py holds them equal to 1e-5). Only float32 on CPU; `short_conv` falls
back to channels_last for any other dtype or device, and when the extension cannot be built (no C++
compiler): `cpp_available()` says which.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from sinkrec.ops import _cpp
from sinkrec.ops.short_conv.channels_last import _taps

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

// x [B, T, C] contiguous float, w [W, C] contiguous (tap W-1 reads the current position)
// sig (sinkrec.ops._cpp.COMMON) inside `omp simd` loops: with -ffast-math GCC calls glibc's vector expf

// o[c] = y[r, c] = sum_{s < W, s <= t} w[W-1-s, c] x[r-s, c]: row r (time t) of the conv before the
// activation; the forward writes it, the backward recomputes it
static inline void conv_row(float* __restrict__ o, const float* xp, const float* wp, int64_t r, int64_t t,
                            int64_t W, int64_t C) {
  const float* __restrict__ wl = wp + (W - 1) * C;
  const float* __restrict__ xr = xp + r * C;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) o[c] = wl[c] * xr[c];
  for (int64_t s = 1; s < W && s <= t; ++s) {
    const float* __restrict__ ws = wp + (W - 1 - s) * C;
    const float* __restrict__ xs = xp + (r - s) * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] += ws[c] * xs[c];
  }
}

torch::Tensor conv_fwd(torch::Tensor x, torch::Tensor w, bool silu) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), W = w.size(0);
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * T, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* o = op + r * C;
      conv_row(o, xp, wp, r, r % T, W, C);
      if (silu) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = o[c] * sig(o[c]);
      }
    }
  });
  return out;
}

// returns {dx (or empty), dw [W, C] float32}
std::vector<torch::Tensor> conv_bwd(torch::Tensor x, torch::Tensor w, torch::Tensor dout, bool silu,
                                    bool want_dx, bool want_dw) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), W = w.size(0);
  auto dx = want_dx ? torch::empty_like(x) : torch::Tensor();
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* gp = dout.data_ptr<float>();
  float* dxp = want_dx ? dx.data_ptr<float>() : nullptr;
  const int64_t R = 64;  // time rows per block
  const int64_t nblk = (T + R - 1) / R;
  const int nthreads = at::get_num_threads();
  std::vector<float> dw_part(want_dw ? (size_t)nthreads * W * C : 0, 0.f);
  at::parallel_for(0, B * nblk, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> dyb((R + W) * C);  // dy of rows t0 .. t1 + W - 2 (those dx[t0 .. t1) reads)
    float* dwl = want_dw ? dw_part.data() + (size_t)at::get_thread_num() * W * C : nullptr;
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t b = blk / nblk, t0 = (blk % nblk) * R, t1 = std::min(T, t0 + R);
      const int64_t te = std::min(T, t1 + W - 1);
      // dy rows t0 .. te - 1: without the activation, dout itself (no copy)
      const float* dy0 = silu ? dyb.data() : gp + (b * T + t0) * C;
      for (int64_t t = t0; t < te && silu; ++t) {  // dy[t] = act'(y[t]) * dout[t], y recomputed from x
        const int64_t r = b * T + t;
        float* __restrict__ d = dyb.data() + (t - t0) * C;
        const float* __restrict__ g = gp + r * C;
        conv_row(d, xp, wp, r, t, W, C);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float y = d[c], sg = sig(y);
          d[c] = g[c] * sg * (1.f + y * (1.f - sg));
        }
      }
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r = b * T + t;
        const float* __restrict__ d = dy0 + (t - t0) * C;
        if (want_dx) {  // dx[t] = sum_s w[W-1-s] dy[t+s], t + s < T
          float* __restrict__ o = dxp + r * C;
          const float* __restrict__ wl = wp + (W - 1) * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = wl[c] * d[c];
          for (int64_t s = 1; s < W && t + s < T; ++s) {
            const float* __restrict__ ws = wp + (W - 1 - s) * C;
            const float* __restrict__ ds = d + s * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) o[c] += ws[c] * ds[c];
          }
        }
        if (want_dw) {  // dw[W-1-s] += dy[t] x[t-s], t >= s
          for (int64_t s = 0; s < W && s <= t; ++s) {
            float* __restrict__ acc = dwl + (W - 1 - s) * C;
            const float* __restrict__ xs = xp + (r - s) * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) acc[c] += d[c] * xs[c];
          }
        }
      }
    }
  });
  auto dw = torch::zeros({W, C}, x.options());
  if (want_dw) {
    float* dwp = dw.data_ptr<float>();
    for (int i = 0; i < nthreads; ++i)
      for (int64_t j = 0; j < W * C; ++j) dwp[j] += dw_part[(size_t)i * W * C + j];
  }
  return {want_dx ? dx : torch::Tensor(), dw};
}
"""

FUNCTIONS = ("conv_fwd", "conv_bwd")  # what _SOURCE exports (sinkrec.ops._cpp builds the kernels as one module)


class ShortConvCppFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, silu: bool) -> torch.Tensor:
        x = x.contiguous()
        taps = _taps(weight, x.dtype)  # [W, C]
        ctx.save_for_backward(x, weight)
        ctx.silu = silu
        return _cpp.module().conv_fwd(x, taps, silu)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: torch.Tensor):
        x, weight = ctx.saved_tensors
        taps = _taps(weight, x.dtype)
        want_dx, want_dw = ctx.needs_input_grad[:2]
        dx, dw = _cpp.module().conv_bwd(x, taps, dout.contiguous(), ctx.silu, want_dx, want_dw)
        return (dx if want_dx else None), (dw.t()[:, None, :].to(weight.dtype) if want_dw else None), None


def short_conv_cpp(x: torch.Tensor, weight: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """Same contract as `naive.short_conv_reference` (float32 CPU tensors)."""
    return ShortConvCppFunction.apply(x, weight, activation == "silu")
