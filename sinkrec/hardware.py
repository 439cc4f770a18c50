"""What this machine's CPU can do, as the trainer and the result tables report it (no heavy imports)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # the ones that change kernels
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bf16 dot products: CPU bf16 autocast can pay off


def cpu_info() -> tuple[str, set[str]]:
    """(CPU model name, ISA flags) as /proc/cpuinfo (and `lscpu`) show them; empty flags elsewhere."""
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return model, flags


def machine() -> str:
    """The CPU model and the ISA flags that change which CPU kernels run."""
    model, flags = cpu_info()
    have = [f for f in CPU_FLAGS if f in flags]
    return f"{model}, {os.cpu_count()} logical CPUs, flags: {' '.join(have) or 'none of ' + ' '.join(CPU_FLAGS)}"


def describe_precision(precision: object, accelerator: str, flags: set[str] | None = None) -> str:
    """The line the trainer prints at start: the precision the config chose, and whether this CPU has
    native bf16 (where it has, CPU bf16 autocast ran an ML-1M step 1.2-1.5x faster: `make bench-epoch
    ARGS=--bf16`, docs/results/ml1m-step-speed-bf16-2026-12-04.md)."""
    p = str(precision if precision is not None else "32-true")
    if accelerator not in ("cpu", "auto") or (accelerator == "auto" and _cuda()):  # not training on the CPU
        return f"precision: {p} (trainer.precision)"
    flags = cpu_info()[1] if flags is None else flags
    native = [f for f in BF16_FLAGS if f in flags]
    if "bf16" in p:
        if native:
            return f"precision: {p} (trainer.precision): CPU bf16 autocast, native bf16 dot products ({native[0]})"
        return (f"precision: {p} (trainer.precision) on a CPU without {' or '.join(BF16_FLAGS)}: bf16 is not "
                "native here and is not expected to beat 32-true; set --trainer.precision 32-true")
    if native:
        return (f"precision: {p} (trainer.precision); this CPU has {native[0]}: --trainer.precision bf16-mixed "
                "may be faster (make bench-epoch ARGS=--bf16)")
    return f"precision: {p} (trainer.precision; this CPU has no native bf16, so 32-true is the fast choice)"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
