"""Gated delta rule: the dispatcher (one public function, the backend is an argument) and its checks.

Backends (all share the contract of `naive.py`):
    recurrent  per-step PyTorch reference; the O(1)-per-event streaming inference path
    chunk      chunkwise-parallel WY form in PyTorch (chunk.CHUNK_SIZE = 32)
    cpp        the same chunk algorithm and layout as C++ loops (`cpp.py`): CPU, K = V in {16, 32, 64,
               128}, float32 accumulation (float32 / bf16 / fp16 inputs), needs a C++ compiler (built at
               first use, ~50 s, then cached); ~2x the chunk op's speed (docs/MODEL.md)
    fla        flash-linear-attention Triton kernels; CUDA only, imported lazily
    auto       fla on CUDA when importable; else recurrent for T == 1 (a single streaming step,
               where padding to a whole chunk would be pure waste); else cpp where it runs, else chunk:
               the CPU training path
"""

from __future__ import annotations

import torch

from sinkrec.ops import _cpp
from sinkrec.ops._cpp import available as cpp_available
from sinkrec.ops._optional import fla_available
from sinkrec.ops.gated_delta.chunk import chunk_gated_delta_rule
from sinkrec.ops.gated_delta.cpp import chunk_cpp_gated_delta_rule, cpp_fits
from sinkrec.ops.gated_delta.fla import fla_gated_delta_rule
from sinkrec.ops.gated_delta.naive import recurrent_gated_delta_rule

BACKENDS = ("auto", "recurrent", "chunk", "cpp", "fla")

__all__ = ["BACKENDS", "gated_delta_rule", "resolve_backend"]

_IMPLS = {
    "recurrent": recurrent_gated_delta_rule,
    "chunk": chunk_gated_delta_rule,
    "cpp": chunk_cpp_gated_delta_rule,
    "fla": fla_gated_delta_rule,
}


def resolve_backend(backend: str, q: torch.Tensor, v: torch.Tensor | None = None) -> str:
    """Map `backend` (possibly "auto") to the implementation that will run for inputs `q` (and `v`,
    whose head dim the cpp backend must see equal to q's; v = q when None)."""
    if backend not in BACKENDS:
        raise ValueError(f"gated_delta_rule: backend={backend!r} is not one of {BACKENDS}")
    v = q if v is None else v
    if backend == "cpp":
        _cpp.check(cpp_fits(q, v), "gated_delta_rule: backend", "CPU tensors with K = V in {16, 32, 64, 128} and "
                   "float32 accumulation", f"K = {q.shape[-1]}, V = {v.shape[-1]}, {q.dtype} on {q.device}",
                   "Use 'auto' (falls back to 'chunk') or 'chunk'")
    if backend != "auto":
        return backend
    if q.is_cuda and fla_available():
        return "fla"
    if q.shape[1] == 1:
        return "recurrent"
    return "cpp" if cpp_fits(q, v) and cpp_available() else "chunk"


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
) -> None:
    named = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
    if initial_state is not None:
        named["initial_state"] = initial_state
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"gated_delta_rule: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"gated_delta_rule: {name} must be a floating-point tensor, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"gated_delta_rule: {name} is on {x.device} but q is on {q.device}")
    if q.dim() != 4:
        raise ValueError(f"gated_delta_rule: q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(
            f"gated_delta_rule: k must match q's [B, T, H, K] = {tuple(q.shape)}, got {tuple(k.shape)} "
            "(a K mismatch between q and k?)"
        )
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(
            f"gated_delta_rule: v must be [B, T, H, V] with (B, T, H) = {(B, T, H)} from q, "
            f"got shape {tuple(v.shape)}"
        )
    V = v.shape[-1]
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, H):
            raise ValueError(
                f"gated_delta_rule: {name} must be [B, T, H] = {(B, T, H)}, got {tuple(x.shape)}"
            )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"gated_delta_rule: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    n_states = B if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, q)
    if initial_state is not None and initial_state.shape != (n_states, H, K, V):
        lead = "B" if cu_seqlens is None else "N"
        raise ValueError(
            f"gated_delta_rule: initial_state must be [{lead}, H, K, V] = {(n_states, H, K, V)}, "
            f"got {tuple(initial_state.shape)} (state is K x V: keys index rows"
            + ("" if cu_seqlens is None else "; one state per packed sequence, N = len(cu_seqlens) - 1")
            + ")"
        )


def _check_cu_seqlens(cu_seqlens: torch.Tensor, q: torch.Tensor) -> int:
    """Checks fla's packing convention; returns the number of sequences N."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise TypeError(f"gated_delta_rule: cu_seqlens must be an int32 or int64 tensor, got {got}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            "gated_delta_rule: cu_seqlens must be 1-D [N + 1] (cumulative sequence starts, N >= 1), "
            f"got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"gated_delta_rule: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    B, T = q.shape[:2]
    if B != 1:
        raise ValueError(
            f"gated_delta_rule: with cu_seqlens the sequences are packed along T and B must be 1, "
            f"got B = {B} (flatten the batch: x.reshape(1, B * T, ...), cu_seqlens = arange(B + 1) * T)"
        )
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != T:
        raise ValueError(
            f"gated_delta_rule: cu_seqlens must start at 0 and end at T = {T} (the packed length), "
            f"got cu_seqlens[0] = {bounds[0]}, cu_seqlens[-1] = {bounds[-1]}"
        )
    bad = next((i for i in range(len(bounds) - 1) if bounds[i + 1] < bounds[i]), None)
    if bad is not None:
        raise ValueError(
            f"gated_delta_rule: cu_seqlens must be non-decreasing (cumulative starts), got "
            f"cu_seqlens[{bad}] = {bounds[bad]} > cu_seqlens[{bad + 1}] = {bounds[bad + 1]}"
        )
    return len(bounds) - 1


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Gated delta rule (Gated DeltaNet), flash-linear-attention conventions.

    Per batch element and head, with state `S` of shape [K, V]:
        S_t = exp(g_t) * S_{t-1}
        S_t = S_t + beta_t * k_t (v_t - S_t^T k_t)^T
        o_t = S_t^T (scale * q_t)
    i.e. `S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`, exactly fla's
    `naive_recurrent_gated_delta_rule`. Positions with `g = 0, beta = 0` leave the state unchanged,
    which is how padding is expressed.

    Args:
        q (torch.Tensor):
            queries `[B, T, H, K]`, expected l2-normalised over K by the caller (not normalised here).
        k (torch.Tensor):
            keys `[B, T, H, K]`, expected l2-normalised over K by the caller.
        v (torch.Tensor):
            values `[B, T, H, V]`, same dtype as q and k.
        g (torch.Tensor):
            log decay `[B, T, H]` (<= 0 for a contracting state), any float dtype.
        beta (torch.Tensor):
            write strength `[B, T, H]`, usually in [0, 1], any float dtype.
        scale (Optional[float]):
            multiplies q; `1 / sqrt(K)` when None.
        initial_state (Optional[torch.Tensor]):
            `[B, H, K, V]` state before the first position (e.g. the final state of the previous
            piece of the sequence); `[N, H, K, V]`, one per sequence, with `cu_seqlens`. Zeros when
            None. Receives gradients.
        output_final_state (bool):
            also return the state after the last position (of each sequence, with `cu_seqlens`).
        cu_seqlens (Optional[torch.Tensor]):
            int32 / int64 `[N + 1]`, fla's packing: with B = 1, the T axis holds N sequences back to
            back, sequence i at positions cu_seqlens[i]:cu_seqlens[i + 1] (so cu_seqlens[0] = 0,
            cu_seqlens[-1] = T, non-decreasing). Each sequence starts from its own initial state,
            and no state crosses a boundary. Equals running each sequence on its own.
        backend (str):
            "auto" | "recurrent" | "chunk" | "cpp" | "fla" (see module docstring). All compute in float32
            (float64 inputs stay float64), whatever the input dtype.

    Returns:
        o (torch.Tensor):
            `[B, T, H, V]` in the dtype of v.
        final_state (Optional[torch.Tensor]):
            `[B, H, K, V]` (`[N, H, K, V]` with `cu_seqlens`) in float32 (float64 for float64 inputs) if `output_final_state` else None.
            Kept at full precision so a stream of T=1 calls does not round the state every event.
    """
    _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    impl = _IMPLS[resolve_backend(backend, q, v)]
    # the kernels pick their own precision (float32 accumulation); an enclosing autocast region must
    # not turn their internal matmuls and triangular solves into bf16 (CPU has no bf16 trsm)
    with torch.autocast(q.device.type, enabled=False):
        o, final_state = impl(
            q,
            k,
            v,
            g,
            beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
    return o.to(v.dtype), final_state
