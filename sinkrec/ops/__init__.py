"""Sequence-mixing kernels. One public entry per op; the backend is an argument."""

from sinkrec.ops.backend import BACKENDS, gated_delta_rule

__all__ = ["BACKENDS", "gated_delta_rule"]
