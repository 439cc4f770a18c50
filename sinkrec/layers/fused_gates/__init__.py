"""Fused TDGD gate / purification math behind one dispatcher.

Backends (same contract as `reference.gates_reference`):
    reference  plain PyTorch, autograd backward (the spec)
    compile    `torch.compile` of the reference (inductor fuses the elementwise chain; CPU or GPU)
    triton     one Triton kernel forward + one backward (`triton.py`); GPU, or CPU under TRITON_INTERPRET=1
    auto       triton on CUDA when importable, else reference. On CPU `compile` is not the default
               because its first call compiles for seconds; `benchmarks/layer.py` measures its gain.
"""
from __future__ import annotations

import functools

import torch

from sinkrec.layers.fused_gates.reference import GateOut, gates_reference

GATE_BACKENDS = ("auto", "reference", "compile", "triton")


@functools.cache
def _compiled(memory: bool, purify_write: bool, diff_read: bool, temporal: bool):
    # one compiled function per switch combination (each its own graph cache, so ablation runs
    # never hit dynamo's recompile limit); dynamic=True: one graph for every (B, T)
    fn = functools.partial(gates_reference, memory=memory, purify_write=purify_write, diff_read=diff_read,
                           temporal=temporal)
    return torch.compile(fn, dynamic=True)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_gate_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in GATE_BACKENDS:
        raise ValueError(f"fused_gates: gate_backend={backend!r} is not one of {GATE_BACKENDS}")
    if backend != "auto":
        return backend
    return "triton" if x.is_cuda and triton_available() else "reference"


def fused_gates(*args, backend: str = "auto", **kwargs) -> GateOut:
    """Dispatch to a backend; arguments as `gates_reference`."""
    impl = resolve_gate_backend(backend, args[0])
    if impl == "reference":
        return gates_reference(*args, **kwargs)
    if impl == "compile":
        flags = {name: kwargs.pop(name, True) for name in ("memory", "purify_write", "diff_read", "temporal")}
        return _compiled(**flags)(*args, **kwargs)
    from sinkrec.layers.fused_gates.triton import gates_triton  # lazy: triton is optional

    return gates_triton(*args, **kwargs)


__all__ = ["GATE_BACKENDS", "GateOut", "fused_gates", "gates_reference", "resolve_gate_backend"]
