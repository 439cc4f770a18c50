"""GPU tier: flash-linear-attention's Triton `chunk_gated_delta_rule`, imported only when used.

fla is an optional dependency (`pip install -e '.[gpu]'`); importing it needs Triton and its
kernels need CUDA, so nothing here may run at import time of `sinkrec`.
"""

from __future__ import annotations

import torch


def fla_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `recurrent_gated_delta_rule`; inputs must be CUDA tensors."""
    if not q.is_cuda:
        raise RuntimeError(
            f"backend='fla' runs Triton kernels and needs CUDA tensors, got device {q.device}; "
            "use backend='chunk' (or 'auto') on CPU"
        )
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as e:
        raise RuntimeError(
            "backend='fla' needs fla-core and triton (pip install -e '.[gpu]'); "
            f"importing them failed: {e}. Use backend='chunk' instead."
        ) from e
    # fla keeps the state in fp32 and its kernels accumulate in fp32 whatever the input dtype
    return chunk_gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),  # fla's type: LongTensor
    )
