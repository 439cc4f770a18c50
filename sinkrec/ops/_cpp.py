"""The C++ CPU kernels (`<op>/cpp.py` of short_conv, gated_norm, fused_gates, gated_delta), built as
one extension module: one compile (~60 s the first time, once per CPU instruction set, then cached
in $TORCH_EXTENSIONS_DIR) instead of one per op, since parsing torch's headers is most of it.

Each kernel file holds `_SOURCE` (C++) and `FUNCTIONS` (what it exports). Here each source goes into
its own namespace, with its #include lines hoisted to the top and `COMMON`'s helpers (sig, dot) in
view, and its functions are exported to Python. Compiled with -O3 -ffast-math and the CPU's vector ISA, so GCC
vectorizes exp through glibc's vector math library (libmvec); results differ from the PyTorch
references by float rounding only (each op's tests hold them equal).
"""
from __future__ import annotations

import importlib
import os
import shutil
from functools import cache

import torch

KERNELS = ("short_conv", "gated_norm", "fused_gates", "gated_delta")  # sinkrec/ops/<name>/cpp.py

# helpers every kernel may call (each kernel's namespace sees them)
COMMON = r"""
#include <cmath>
#include <cstdint>

namespace common {
// the logistic function; inside `omp simd` loops its exp vectorizes through libmvec (-ffast-math)
static inline float sig(float z) { return 1.f / (1.f + std::exp(-z)); }

// <a, b> over n floats (n a constant at most call sites, once inlined)
static inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}
}  // namespace common
"""


def flags() -> tuple[str, list[str]]:
    """The CPU capability ("default" | "avx2" | "avx512" ...) and compiler flags for its vector width.
    The capability goes into the module's name, so the build cache keeps one build per instruction
    set and a copied cache dir never runs AVX-512 on an AVX2 CPU."""
    cap = torch.backends.cpu.get_cpu_capability().lower()
    isa = {"avx512": ["-mavx512f", "-mavx2", "-mfma"], "avx2": ["-mavx2", "-mfma"]}.get(cap, [])
    return cap, ["-O3", "-fopenmp-simd", "-ffast-math", *isa]


def enabled() -> bool:
    """False when SINKREC_NO_CPP=1 or there is no C++ compiler ($CXX, else c++): the PyTorch paths
    then run."""
    return not os.environ.get("SINKREC_NO_CPP") and shutil.which(os.environ.get("CXX", "c++")) is not None


def source() -> tuple[str, list[str]]:
    """The one translation unit (COMMON, then every kernel in its namespace) and the exported function names."""
    includes, bodies, functions = [], [COMMON], []
    for name in KERNELS:
        kernel = importlib.import_module(f"sinkrec.ops.{name}.cpp")
        lines = kernel._SOURCE.strip("\n").splitlines()
        includes += [line for line in lines if line.startswith("#include") and line not in includes]
        body = "\n".join(line for line in lines if not line.startswith("#include"))
        bodies.append(f"namespace {name} {{\nusing namespace common;\n{body}\n}}  // namespace {name}\n"
                      + "".join(f"using {name}::{f};\n" for f in kernel.FUNCTIONS))
        functions += kernel.FUNCTIONS
    return "\n".join(includes) + "\n\n" + "\n".join(bodies), functions


@cache
def module():
    """Compile (or load the cached build of) the kernels; raises when the build fails."""
    from torch.utils.cpp_extension import load_inline

    cap, cflags = flags()
    text, functions = source()
    return load_inline(name=f"sinkrec_cpu_kernels_{cap}", cpp_sources=[text], functions=functions,
                       extra_cflags=cflags, extra_ldflags=["-lmvec"], verbose=False)


@cache
def available() -> bool:
    """True when the kernels build (or are already built) here; False when C++ is off (`enabled`) or the
    build fails (no headers, a compiler error): every op's PyTorch path then runs."""
    if not enabled():
        return False
    try:
        module()
        return True
    except Exception:  # noqa: BLE001  no compiler, no headers, a failed build: the fallbacks run
        return False


def check(fits: bool, key: str, needs: str, got: str, fallback: str) -> None:
    """The explicit `<key>='cpp'` choice of an op's dispatcher: raise, saying what the kernel runs and
    what it got, unless the inputs fit (`fits`) and the kernels build here."""
    if not (fits and available()):
        raise ValueError(f"{key}='cpp' runs {needs} where the C++ kernels build; got {got}, kernels "
                         f"{'built' if available() else 'not buildable here'}. {fallback}")
