"""TDGD's gated output norm y = RMSNorm(x) * SiLU(g): the dispatcher and its checks.

Backends (all share the contract of `naive.gated_rms_norm_reference`):
    reference  ATen's RMSNorm times SiLU, autograd backward (`naive.py`)
    torch      the same through `rms_norm`'s hand-written l2norm backward (`naive.py`), any device
    cpp        one C++ loop per pass (`cpp.py`; float32 CPU tensors; needs a C++ compiler)
    auto       cpp for float32 CPU tensors where it builds, else torch
"""
from __future__ import annotations

import torch

from sinkrec.ops import _cpp
from sinkrec.ops._cpp import available as cpp_available
from sinkrec.ops.gated_norm.cpp import gated_rms_norm_cpp
from sinkrec.ops.gated_norm.naive import gated_rms_norm_reference, gated_rms_norm_torch

BACKENDS = ("auto", "reference", "torch", "cpp")

__all__ = ["BACKENDS", "cpp_available", "gated_rms_norm", "gated_rms_norm_reference"]


def resolve_gated_norm_backend(backend: str, x: torch.Tensor, g: torch.Tensor) -> str:
    """Map `backend` (possibly "auto") to the implementation that will run for inputs x, g."""
    if backend not in BACKENDS:
        raise ValueError(f"gated_rms_norm: backend={backend!r} is not one of {BACKENDS}")
    fits_cpp = not x.is_cuda and x.dtype == g.dtype == torch.float32
    if backend == "cpp":
        _cpp.check(fits_cpp, "gated_rms_norm: backend", "float32 CPU tensors", f"x {x.dtype}, g {g.dtype} on {x.device}",
                   "Use 'auto' to fall back")
    if backend != "auto":
        return backend
    return "cpp" if fits_cpp and cpp_available() else "torch"


def gated_rms_norm(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                   backend: str = "auto") -> torch.Tensor:
    """x, g [..., V] (same shape), weight [V] -> RMSNorm(x) * weight * SiLU(g) [..., V]."""
    if x.shape != g.shape or weight.shape != x.shape[-1:]:
        raise ValueError(f"gated_rms_norm: x and g must have one shape [..., V] and weight [V], got x "
                         f"{tuple(x.shape)}, g {tuple(g.shape)}, weight {tuple(weight.shape)}")
    impl = resolve_gated_norm_backend(backend, x, g)
    if impl == "cpp":
        return gated_rms_norm_cpp(x, g, weight, eps)
    if impl == "reference":
        return gated_rms_norm_reference(x, g, weight, eps)
    return gated_rms_norm_torch(x, g, weight, eps)
