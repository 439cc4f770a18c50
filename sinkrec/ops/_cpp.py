"""Building the C++ CPU kernels (`short_conv/cpp.py`, `gated_norm/cpp.py`): one place for the compiler
flags, the per-instruction-set module name and the on/off switch.

Each kernel is compiled at first use with `torch.utils.cpp_extension.load_inline` into
$TORCH_EXTENSIONS_DIR (~50 s once per kernel and CPU instruction set, then cached), with -O3
-ffast-math and the CPU's vector ISA, so GCC vectorizes exp through glibc's vector math library
(libmvec). Results differ from the PyTorch references by float rounding only.
"""
from __future__ import annotations

import os
import shutil

import torch


def flags() -> tuple[str, list[str]]:
    """The CPU capability ("default" | "avx2" | "avx512" ...) and compiler flags for its vector width.
    The capability goes into each module's name, so the build cache keeps one build per instruction
    set and a copied cache dir never runs AVX-512 on an AVX2 CPU."""
    cap = torch.backends.cpu.get_cpu_capability().lower()
    isa = {"avx512": ["-mavx512f", "-mavx2", "-mfma"], "avx2": ["-mavx2", "-mfma"]}.get(cap, [])
    return cap, ["-O3", "-fopenmp-simd", "-ffast-math", *isa]


def enabled() -> bool:
    """False when SINKREC_NO_CPP=1 or there is no C++ compiler ($CXX, else c++): the PyTorch fast
    paths then run."""
    return not os.environ.get("SINKREC_NO_CPP") and shutil.which(os.environ.get("CXX", "c++")) is not None


def build(stem: str, decl: str, source: str, functions: list[str]):
    """Compile (or load the cached build of) one kernel module; raises when the build fails."""
    from torch.utils.cpp_extension import load_inline

    cap, cflags = flags()
    return load_inline(name=f"{stem}_{cap}", cpp_sources=[decl, source], functions=functions,
                       extra_cflags=cflags, extra_ldflags=["-lmvec"], verbose=False)


def buildable(module) -> bool:
    """True when `module()` (a cached `build` call) builds here; False when C++ is off or the build
    fails (no headers, a compiler error): the caller's PyTorch fallback then runs."""
    if not enabled():
        return False
    try:
        module()
        return True
    except Exception:  # noqa: BLE001  no compiler, no headers, a failed build: the fallback runs
        return False
