"""Availability of the optional GPU dependencies (triton, fla-core), in one place.

Checked with `importlib.util.find_spec`, which locates a package without executing it: importing
triton here would be wrong, because triton reads TRITON_INTERPRET once, when it is first imported
(the CPU parity tests set it in a subprocess), and fla's import pulls in triton and its kernels.
The backends import their package lazily, when they are used, and fail there with a message.
"""

from __future__ import annotations

import importlib.util
from functools import cache


@cache
def available(*packages: str) -> bool:
    """True when every one of `packages` is importable (checked without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in packages)


def triton_available() -> bool:
    return available("triton")


def fla_available() -> bool:
    """fla-core's kernels are Triton kernels: both packages must be there."""
    return available("fla", "triton")
