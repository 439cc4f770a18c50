"""Short causal depthwise convolution, the reference (the definition the fast path must equal):

    y[b, t, c] = act( sum_{j < W} w[c, j] * x[b, t - (W - 1) + j, c] ),   x[b, t < 0, c] = 0

x [B, T, C], weight [C, 1, W] (the layout of a depthwise `nn.Conv1d`), act = identity or SiLU.
Runs as one `F.conv1d` over the time-major transpose [B, C, T]."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def short_conv_reference(x: torch.Tensor, weight: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    C, W = x.shape[-1], weight.shape[-1]
    if x.shape[1] == 0:  # conv1d refuses an empty time axis
        return x * 0 + weight.sum() * 0  # zeros, still connected to both inputs
    y = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), weight.to(x.dtype), groups=C).transpose(1, 2)
    return F.silu(y) if activation == "silu" else y
