"""Fused TDGD gate / purification math: the dispatcher (one public function, the backend is an
argument) and its checks.

Backends (all share the contract of `naive.gates_reference`):
    reference  plain PyTorch, autograd backward (`naive.py`, the spec)
    compile    `torch.compile` of the reference (`compile.py`; inductor fuses the elementwise chain; CPU or GPU)
    triton     one Triton kernel forward + one backward (`triton.py`); GPU, or CPU under TRITON_INTERPRET=1
    cpp        one C++ loop forward + one backward (`cpp.py`); float32 CPU tensors, needs a C++ compiler
               (built at first use, ~50 s, then cached); without memory it runs the reference
    auto       triton on CUDA when importable (the reference with rho_bias), cpp for float32 CPU tensors
               where it builds, else reference. `compile` is never the default: its first call compiles
               for seconds; `benchmarks/layer.py` measures the backends' gain.
"""
from __future__ import annotations

import torch

from sinkrec.ops import _cpp
from sinkrec.ops._cpp import available as cpp_available
from sinkrec.ops._optional import triton_available
from sinkrec.ops.fused_gates.cpp import gates_cpp
from sinkrec.ops.fused_gates.naive import GateOut, gates_reference

BACKENDS = ("auto", "reference", "compile", "triton", "cpp")

__all__ = ["BACKENDS", "GateOut", "cpp_available", "fused_gates", "gates_reference", "resolve_gate_backend"]


def resolve_gate_backend(backend: str, x: torch.Tensor, rho_bias: bool = False) -> str:
    """Map `backend` (possibly "auto") to the implementation that will run for input `x` (`rho_bias`:
    whether a per-position rho term comes with it, which the triton kernel does not take)."""
    if backend not in BACKENDS:
        raise ValueError(f"fused_gates: gate_backend={backend!r} is not one of {BACKENDS}")
    fits_cpp = not x.is_cuda and x.dtype == torch.float32
    if backend == "cpp":
        _cpp.check(fits_cpp, "fused_gates: gate_backend", "float32 CPU tensors", f"{x.dtype} on {x.device}",
                   "Use 'auto' to fall back")
    if backend != "auto":
        return backend
    if x.is_cuda:
        return "triton" if triton_available() and not rho_bias else "reference"
    return "cpp" if fits_cpp and cpp_available() else "reference"


def _check_inputs(q, k, v, km, vm, a_x, b_x, l_x, phi, mask, params, memory: bool, diff_read: bool,
                  temporal: bool) -> None:
    if q.dim() != 4:
        raise ValueError(f"fused_gates: q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    want = {"k": (k, (B, T, H, K)), "a_x": (a_x, (B, T, H)), "b_x": (b_x, (B, T, H)), "mask": (mask, (B, T))}
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"fused_gates: v must be [B, T, H, V] with (B, T, H) = {(B, T, H)} from q, "
                         f"got shape {tuple(v.shape)}")
    if temporal:
        want["phi"] = (phi, (B, T))
    if memory:
        want |= {"km": (km, (B, T, H, K)), "vm": (vm, tuple(v.shape))}
        if diff_read:
            want["l_x"] = (l_x, (B, T, H))
    want |= {name: (p, (H,)) for name, p in params.items()}
    for name, (x, shape) in want.items():
        if x is None:
            raise ValueError(f"fused_gates: {name} is None but must be a tensor of shape {shape}"
                             + (" (memory=True needs km, vm and, with diff_read, l_x)" if memory else ""))
        if tuple(x.shape) != shape:
            raise ValueError(f"fused_gates: {name} must have shape {shape} (B, T, H, K from q), "
                             f"got {tuple(x.shape)}")


def fused_gates(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    km: torch.Tensor | None,
    vm: torch.Tensor | None,
    a_x: torch.Tensor,
    b_x: torch.Tensor,
    l_x: torch.Tensor | None,
    phi: torch.Tensor,
    mask: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    c_a: torch.Tensor,
    c_b: torch.Tensor,
    s_rho: torch.Tensor,
    b_rho: torch.Tensor,
    *,
    memory: bool = True,
    purify_write: bool = True,
    diff_read: bool = True,
    temporal: bool = True,
    backend: str = "auto",
    rho_bias: torch.Tensor | None = None,
) -> GateOut:
    """The TDGD gates of every position (see `naive.py` for the math and the switches).

    Shapes: q, k, km [B, T, H, K]; v, vm [B, T, H, V]; a_x, b_x, l_x [B, T, H]; phi, mask [B, T];
    A_log, dt_bias, c_a, c_b, s_rho, b_rho [H]. km, vm, l_x may be None when memory=False (l_x also
    when diff_read=False), phi when temporal=False. `rho_bias` [B, T, H] (memory only; reference and
    compile backends): a per-position term added to rho's pre-activation.
    Returns GateOut(q~ [B, T, H, K], v~ [B, T, H, V], g, beta~, r [B, T, H] or None).
    """
    impl = resolve_gate_backend(backend, q, rho_bias is not None)
    params = {"A_log": A_log, "dt_bias": dt_bias, "c_a": c_a, "c_b": c_b, "s_rho": s_rho, "b_rho": b_rho}
    _check_inputs(q, k, v, km, vm, a_x, b_x, l_x, phi, mask, params, memory, diff_read, temporal)
    args = (q, k, v, km, vm, a_x, b_x, l_x, phi, mask, *params.values())
    flags = {"memory": memory, "purify_write": purify_write, "diff_read": diff_read, "temporal": temporal}
    if rho_bias is not None:
        if not memory or tuple(rho_bias.shape) != tuple(a_x.shape):
            raise ValueError(f"fused_gates: rho_bias must have shape {tuple(a_x.shape)} (B, T, H) and needs "
                             f"memory=True; got shape {tuple(rho_bias.shape)}, memory={memory}")
        if impl == "triton":
            raise ValueError("fused_gates: rho_bias (SinkRecConfig.repeat_gate) is not implemented in the "
                             "triton gate kernel; use gate_backend 'reference', 'compile', 'cpp' or 'auto'")
        flags["rho_bias"] = rho_bias
    if impl == "reference":
        return gates_reference(*args, **flags)
    if impl == "cpp":
        return gates_cpp(*args, **flags)
    if impl == "compile":
        from sinkrec.ops.fused_gates.compile import gates_compile

        return gates_compile(*args, **flags)
    from sinkrec.ops.fused_gates.triton import gates_triton  # lazy: triton is optional

    return gates_triton(*args, **flags)
