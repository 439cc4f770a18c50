"""Sequence-mixing kernels, one folder per op: `__init__` (dispatcher, input checks, BACKENDS),
`naive.py` (the reference, the spec), and the fast paths (`chunk.py`, `compile.py`, `triton.py`,
`fla.py`). The backend is an argument of each entry point; its BACKENDS tuple lists the choices."""

from sinkrec.ops.dispatcher import BACKENDS as DISPATCHER_BACKENDS
from sinkrec.ops.dispatcher import dispatcher_attention
from sinkrec.ops.fused_gates import BACKENDS as FUSED_GATES_BACKENDS
from sinkrec.ops.fused_gates import GateOut, fused_gates
from sinkrec.ops.gated_delta import BACKENDS as GATED_DELTA_BACKENDS
from sinkrec.ops.gated_delta import gated_delta_rule
from sinkrec.ops.gated_norm import BACKENDS as GATED_NORM_BACKENDS
from sinkrec.ops.gated_norm import gated_rms_norm
from sinkrec.ops.short_conv import BACKENDS as SHORT_CONV_BACKENDS
from sinkrec.ops.short_conv import short_conv

__all__ = [
    "DISPATCHER_BACKENDS",
    "FUSED_GATES_BACKENDS",
    "GATED_DELTA_BACKENDS",
    "GATED_NORM_BACKENDS",
    "SHORT_CONV_BACKENDS",
    "GateOut",
    "dispatcher_attention",
    "fused_gates",
    "gated_delta_rule",
    "gated_rms_norm",
    "short_conv",
]
