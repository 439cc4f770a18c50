"""Short causal depthwise convolution in the [B, T, C] layout, with a hand-written backward.

The reference (`naive.py`) transposes to [B, C, T] for `F.conv1d`: on CPU that costs two transposed
copies each way, a depthwise conv backward that oneDNN runs slowly, and a SiLU (and its backward)
over a transposed, strided tensor. Measured on one layer's [4, 4096, 192] input, one thread:
conv + SiLU forward and backward ~150-280 ms there, ~20-26 ms here (docs/MODEL.md).

Here the W taps are W shifted multiply-adds over contiguous channels:

    forward    y = w[:, W-1] * x;  y[:, s:] += w[:, W-1-s] * x[:, :T-s]   (s = 1 .. W-1);  out = act(y)
    backward   dy = act'(y) * dout
               dx = w[:, W-1] * dy;  dx[:, :T-s] += w[:, W-1-s] * dy[:, s:]
               dw[:, W-1-s] = sum_{b, t} dy[:, s:] * x[:, :T-s]

every pass unit-stride. The passes run block by block (`_blocks`: whole sequences when they are
short, else windows of time), so each block's W passes read it from L2 instead of streaming the whole
tensor from memory W times (a layer's input is ~13 MB; one block ~1 MB). It saves x and the
pre-activation y (one [B, T, C] tensor more than autograd through the reference would hold), and x as a
contiguous copy when it came in strided."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

BLOCK_ELEMENTS = 1 << 18  # elements of x per block (1 MiB in float32): a block's passes stay in L2


def _blocks(B: int, T: int, C: int, W: int) -> list[tuple[slice, int, int]]:
    """(batch slice, t0, t1) blocks covering [B, T] with about BLOCK_ELEMENTS elements each: whole
    sequences of several batch rows when a sequence is short, else one row's windows of time (of at
    least W positions; a window's taps read the positions before it from the previous one)."""
    per_seq = T * C
    if per_seq >= BLOCK_ELEMENTS:
        R = max(W, BLOCK_ELEMENTS // max(C, 1))
        return [(slice(b, b + 1), t0, min(t0 + R, T)) for b in range(B) for t0 in range(0, T, R)]
    rows = max(1, BLOCK_ELEMENTS // max(per_seq, 1))
    return [(slice(b0, min(b0 + rows, B)), 0, T) for b0 in range(0, B, rows)]


def _taps(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [C, 1, W] -> [W, C], contiguous: each tap row broadcasts over [B, T, C] at unit stride
    (a strided [C] row, as weight[:, 0, j] is, makes every multiply-add ~5x slower on CPU)."""
    return weight[:, 0, :].t().to(dtype).contiguous()


class ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, silu: bool) -> torch.Tensor:
        (B, T, C), W = x.shape, weight.shape[-1]
        # a column slice of a wider projection (TDGD's [q | k | v] of w_in) is read 2W times here and in
        # the backward: one copy first makes every pass unit-stride
        x = x.contiguous()
        taps = _taps(weight, x.dtype)  # [W, C]; tap W - 1 reads the current position
        y, out = torch.empty_like(x), torch.empty_like(x) if silu else None
        for b, t0, t1 in _blocks(B, T, C, W):
            yb = torch.mul(x[b, t0:t1], taps[W - 1], out=y[b, t0:t1])
            for s in range(1, W):  # y[t] += w[W-1-s] x[t - s] for t >= s
                lo = max(t0, s)
                if lo < t1:
                    y[b, lo:t1].addcmul_(x[b, lo - s : t1 - s], taps[W - 1 - s])
            if silu:
                torch.ops.aten.silu.out(yb, out=out[b, t0:t1])
        ctx.save_for_backward(x, weight, y)
        ctx.silu = silu
        return out if silu else y

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: torch.Tensor):
        x, weight, y = ctx.saved_tensors
        (B, T, C), W = x.shape, weight.shape[-1]
        dy = torch.ops.aten.silu_backward(dout, y) if ctx.silu else dout.contiguous()
        want_dx, want_dw = ctx.needs_input_grad[:2]  # the RVQ's pattern conv reads a detached input
        taps = _taps(weight, dy.dtype)
        dx = torch.empty_like(dy) if want_dx else None
        acc = torch.promote_types(weight.dtype, torch.float32)  # bf16 inputs: the sums in float32
        dw = weight.new_zeros(W, C, dtype=acc) if want_dw else None  # [W, C]
        for b, t0, t1 in _blocks(B, T, C, W):
            if want_dx:  # dx[t] = sum_s w[W-1-s] dy[t + s] for t + s < T
                torch.mul(dy[b, t0:t1], taps[W - 1], out=dx[b, t0:t1])
                for s in range(1, W):
                    hi = min(t1, T - s)
                    if t0 < hi:
                        dx[b, t0:hi].addcmul_(dy[b, t0 + s : hi + s], taps[W - 1 - s])
            if want_dw:  # dw[W-1-s] = sum_{t >= s} dy[t] x[t - s]
                for s in range(W):
                    lo = max(t0, s)
                    if lo < t1:
                        dw[W - 1 - s] += (dy[b, lo:t1] * x[b, lo - s : t1 - s]).sum((0, 1), dtype=acc)
        if want_dw:
            dw = dw.t()[:, None, :].to(weight.dtype)
        return dx, dw, None


def short_conv_channels_last(x: torch.Tensor, weight: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """Same contract as `naive.short_conv_reference`."""
    return ShortConvFunction.apply(x, weight, activation == "silu")
