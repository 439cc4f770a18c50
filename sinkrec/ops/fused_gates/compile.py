"""`torch.compile` of the reference gates (`naive.py`): inductor fuses the elementwise chain.

On CPU the compile pins inductor's vector ISA into the compile options (`cpp.simdlen`, see
`_cpu_compile_options`). Without it, torch 2.13's inductor picks the ISA at codegen time (from
the CPU, or from ATEN_CPU_CAPABILITY) but its FX-graph / AOTAutograd cache key does not record
it: C++ generated for one ISA and cached on disk was reused under another and compiled with that
ISA's flags. Measured here: AVX-512 code built for AVX2 gave errors up to 5e32, AVX2 code built
for AVX-512 corrupted the heap (`free(): invalid next size`), and either built without an ISA
failed to compile. Any cache shared across ISAs hits this: a TORCHINDUCTOR_CACHE_DIR on shared
storage, a remote cache, or one run under another ATEN_CPU_CAPABILITY.
"""
from __future__ import annotations

import functools

import torch

from sinkrec.ops.fused_gates.naive import GateOut, gates_reference

_FLAGS = ("memory", "purify_write", "diff_read", "temporal")


def _cpu_compile_options() -> dict[str, int]:
    """Inductor options that make the CPU compile's cache key name the vector ISA it generates for.

    `cpp.simdlen` is part of the saved inductor config, which every inductor cache key hashes
    (for the forward and the backward graph alike). Set to the bit width that inductor would pick
    by itself (512, 256, or 0 = no vectorisation), it selects the same ISA as before, but entries
    cached for another ISA no longer match."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return {"cpp.simdlen": pick_vec_isa().bit_width()}


@functools.cache
def _compiled(memory: bool, purify_write: bool, diff_read: bool, temporal: bool, device_type: str = "cpu"):
    # one compiled function per switch combination and device type (each its own graph cache, so
    # ablation runs never hit dynamo's recompile limit); dynamic=True: one graph for every (B, T)
    fn = functools.partial(gates_reference, memory=memory, purify_write=purify_write, diff_read=diff_read,
                           temporal=temporal)
    options = _cpu_compile_options() if device_type == "cpu" else None
    return torch.compile(fn, dynamic=True, options=options)


def gates_compile(*args, **kwargs) -> GateOut:
    """Same contract as `gates_reference`."""
    flags = {name: kwargs.pop(name, True) for name in _FLAGS}
    return _compiled(**flags, device_type=args[0].device.type)(*args, **kwargs)
