"""Sequence-mixing kernels. One public entry per op; the backend is an argument."""

from sinkrec.ops.backend import BACKENDS, gated_delta_rule
from sinkrec.ops.dispatcher import dispatcher_attention

__all__ = ["BACKENDS", "dispatcher_attention", "gated_delta_rule"]
