"""Short causal depthwise convolution (the q/k/v conv of TDGD, the pattern conv of the RVQ memory):
the dispatcher and its checks.

Backends (all share the contract of `naive.short_conv_reference`):
    reference      `F.conv1d` over the [B, C, T] transpose, autograd backward (`naive.py`)
    channels_last  W shifted multiply-adds in [B, T, C], the activation fused, hand-written backward
                   (`channels_last.py`); ~2x faster forward + backward on CPU (one layer's conv + SiLU)
    cpp            the same as one C++ loop per pass, compiled at first use (`cpp.py`; float32 CPU
                   tensors; needs a C++ compiler)
    auto           cpp for float32 CPU tensors where it builds, else channels_last on CPU; reference
                   on CUDA (cuDNN's depthwise conv, not measured against channels_last there)
"""
from __future__ import annotations

import torch

from sinkrec.ops import _cpp
from sinkrec.ops._cpp import available as cpp_available
from sinkrec.ops.short_conv.channels_last import short_conv_channels_last
from sinkrec.ops.short_conv.cpp import short_conv_cpp
from sinkrec.ops.short_conv.naive import short_conv_reference

BACKENDS = ("auto", "reference", "channels_last", "cpp")
ACTIVATIONS = (None, "silu")

__all__ = ["ACTIVATIONS", "BACKENDS", "cpp_available", "resolve_conv_backend", "short_conv", "short_conv_reference"]


def resolve_conv_backend(backend: str, x: torch.Tensor) -> str:
    """Map `backend` (possibly "auto") to the implementation that will run for input `x`."""
    if backend not in BACKENDS:
        raise ValueError(f"short_conv: conv_backend={backend!r} is not one of {BACKENDS}")
    if backend == "cpp":
        _cpp.check(not x.is_cuda and x.dtype == torch.float32, "short_conv: conv_backend", "float32 CPU tensors",
                   f"{x.dtype} on {x.device}", "Use 'auto' to fall back to channels_last")
    if backend != "auto":
        return backend
    if x.is_cuda:
        return "reference"
    return "cpp" if x.dtype == torch.float32 and cpp_available() else "channels_last"


def short_conv(x: torch.Tensor, weight: torch.Tensor, activation: str | None = None,
               backend: str = "auto") -> torch.Tensor:
    """x [B, T, C] (any strides), weight [C, 1, W] -> act(causal depthwise conv of x) [B, T, C];
    the W - 1 positions before x are zeros."""
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[0] != x.shape[-1] or weight.shape[1] != 1:
        raise ValueError(f"short_conv: x must be [B, T, C] and weight [C, 1, W] with the same C, got "
                         f"x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"short_conv: activation={activation!r} is not one of {ACTIVATIONS}")
    impl = resolve_conv_backend(backend, x)
    if impl == "reference":
        return short_conv_reference(x, weight, activation)
    if impl == "cpp":
        return short_conv_cpp(x, weight, activation)
    return short_conv_channels_last(x, weight, activation)
