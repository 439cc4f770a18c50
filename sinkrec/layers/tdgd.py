"""TDGD layer (Temporal-aware, state-relation Differential Gated DeltaNet) and the looped block.

Data flow of one block (SINKREC.md sections 1-3):
    h --RVQMemory--> h + g * W_r m,  m          (storage; skipped when memory is off)
      --TDGD-------> h + dropout(y)              (transition: one gated delta rule)
      --SwiGLU-----> h + ffn(h)
With memory off the block is exactly a Gated DeltaNet block (short conv, l2-normed q/k,
decay + write gates, output gate), which is the "gdn" baseline.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sinkrec.config import SinkRecConfig
from sinkrec.modules import RMSNorm, RVQMemory, ShortConv, SwiGLU, l2norm
from sinkrec.modules.packed import packed_index
from sinkrec.ops import fused_gates, gated_delta_rule, gated_rms_norm
from sinkrec.ops.fused_gates.naive import coverage_rho

REPEAT_SCALE = 8.0  # repeat_gate: the multiplier of c_rep in rho's pre-activation (see TDGD.__init__)


class TDGD(nn.Module):
    """Returns the residual update y [B, T, D] (not h + y). Built from the model config: d_model,
    n_heads, the switches memory / purify_write / diff_read / temporal, conv_size and the backends."""

    def __init__(self, cfg: SinkRecConfig) -> None:
        super().__init__()
        H, K = cfg.n_heads, cfg.d_model // cfg.n_heads  # divisibility: SinkRecConfig.validate
        V = K
        self.H, self.K, self.V = H, K, V
        self.memory, self.purify_write, self.diff_read, self.temporal = (
            cfg.memory, cfg.purify_write, cfg.diff_read, cfg.temporal)
        self.kernel_backend, self.gate_backend = cfg.kernel_backend, cfg.gate_backend
        self.norm = RMSNorm(cfg.d_model)
        # one input projection parameter (run as two matmuls, see forward):
        #   [q | k | v] (H*K, H*K, H*V, through the short conv) | output gate (H*V) | w_a.u | w_b.u
        #   (H each; no bias, as in the spec). GDN's parameters are a subset of SinkRec's.
        self.n_conv = H * (2 * K + V)
        self.w_in = nn.Linear(cfg.d_model, self.n_conv + H * V + 2 * H, bias=False)
        self.conv = ShortConv(self.n_conv, cfg.conv_size, activation="silu", backend=cfg.conv_backend)
        # Gated DeltaNet / Mamba2 init: decay rate A in [1, 16], softplus(dt_bias) in [1e-3, 1e-1]
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        # c_a > 0: a long gap since the previous event forgets more (sessions end, tastes move)
        self.c_a = nn.Parameter(torch.full((H,), 0.5))
        self.c_b = nn.Parameter(torch.zeros(H))
        if self.memory:
            self.w_mkv = nn.Linear(cfg.d_model, H * (K + V), bias=False)  # memory key | memory value
            self.w_l = nn.Linear(cfg.d_model, H, bias=False)  # differential-read weight lam = sigmoid(w_l.u)
            # rho = sigmoid(4 <k, km> + b_rho), b_rho = -2 (rho_bias_init): small unless the key points
            # at the memory key
            self.s_rho = nn.Parameter(torch.full((H,), 4.0))
            self.b_rho = nn.Parameter(torch.full((H,), float(cfg.rho_bias_init)))
            # repeat_gate: rho's pre-activation + REPEAT_SCALE * c_rep * (the item occurred earlier); c_rep = 0
            # is the spec at init. Adam moves a parameter by about lr per step: unscaled, c_rep would need
            # thousands of steps to reach the scale of rho's logits (s_rho = 4)
            self.c_rep = nn.Parameter(torch.zeros(H)) if cfg.repeat_gate else None
        else:
            # unused by the memory-off gates; buffers keep the fused-gate call signature uniform
            self.register_buffer("s_rho", torch.zeros(H), persistent=False)
            self.register_buffer("b_rho", torch.zeros(H), persistent=False)
            self.c_rep = None
        self.o_norm = RMSNorm(V)
        self.w_o = nn.Linear(H * V, cfg.d_model, bias=False)

    def forward(
        self, h: torch.Tensor, m: torch.Tensor | None, phi: torch.Tensor, mask: torch.Tensor,
        return_record: bool = False, cache: dict[str, torch.Tensor] | None = None,
        cu_seqlens: torch.Tensor | None = None, repeat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict | None, dict[str, torch.Tensor] | None]:
        """h [B, T, D], m [B, T, D] | None, phi [B, T] float, mask [B, T] bool -> (y [B, T, D], record,
        cache after the last position | None).

        `cache` ({"conv": [B, W - 1, n_conv], "S": [B, H, K, V]}, see init_cache) continues the
        sequences from a previous window (T = 1 is the O(1)-per-event streaming step); None starts them.
        `cu_seqlens` [S + 1] (sinkrec/modules/packed.py): h is [1, T, D] packed sequences; the conv and
        the delta rule restart at every sequence start (record["S"] is then [S, H, K, V]).
        `repeat` bool [B, T] (needed with repeat_gate): the position's item occurred earlier in its sequence."""
        H, K, V = self.H, self.K, self.V
        rho_bias = None
        if self.c_rep is not None:
            if repeat is None:
                raise ValueError("TDGD: repeat_gate=True needs repeat= (bool [B, T]: the item occurred earlier)")
            rho_bias = REPEAT_SCALE * self.c_rep * repeat[..., None].to(self.c_rep.dtype)  # [B, T, H]
        u = self.norm(h)
        # projections: [q | k | v] through the short conv, output gate og, gate logits a_x, b_x.
        # Three matmuls over row blocks of w_in's weight (one parameter), so that qkv and og come out
        # contiguous: as one [q | k | v | og | a | b] GEMM (N = 260) the CPU GEMM takes a slow path, and as
        # [q | k | v | og] (N = 256) the conv must copy its strided input, SiLU(og) runs strided and the
        # backward concatenates the two gradients (one thread, T = 4096: layer fwd + bwd 7% faster split)
        n_wide = self.n_conv + H * V
        qkv = F.linear(u, self.w_in.weight[: self.n_conv])
        og = F.linear(u, self.w_in.weight[self.n_conv : n_wide])
        a_x, b_x = F.linear(u, self.w_in.weight[n_wide:]).split([H, H], dim=-1)
        conv_out, conv_buf = self.conv(qkv, None if cache is None else cache["conv"], cu_seqlens)  # SiLU'd
        qk, v = conv_out.split([2 * H * K, H * V], dim=-1)
        q, k = l2norm(qk.unflatten(-1, (2 * H, K))).split(H, dim=-2)  # one norm pass: [B, T, 2H, K]
        v, og = v.unflatten(-1, (H, V)), og.unflatten(-1, (H, V))
        km = vm = l_x = None
        if self.memory:  # the memory pair this position read, and the differential-read weight
            km, vm = self.w_mkv(m).split([H * K, H * V], dim=-1)
            km, vm = l2norm(km.unflatten(-1, (H, K))), vm.unflatten(-1, (H, V))
            l_x = self.w_l(u)
        gates = fused_gates(
            q, k, v, km, vm, a_x, b_x, l_x, phi, mask,
            self.A_log, self.dt_bias, self.c_a, self.c_b, self.s_rho, self.b_rho,
            memory=self.memory, purify_write=self.purify_write, diff_read=self.diff_read,
            temporal=self.temporal, backend=self.gate_backend, rho_bias=rho_bias,
        )
        # scale=1: the spec reads o = S q~ exactly; o_norm below removes the overall scale
        # under autocast the gates can come back in float32 beside bf16 projections; the kernel
        # wants one dtype and accumulates in float32 whatever it gets
        dt = torch.promote_types(torch.promote_types(gates.q.dtype, k.dtype), gates.v.dtype)
        o, state = gated_delta_rule(
            gates.q.to(dt), k.to(dt), gates.v.to(dt), gates.g, gates.beta, scale=1.0,
            initial_state=None if cache is None else cache["S"],
            output_final_state=return_record or cache is not None, cu_seqlens=cu_seqlens,
            backend=self.kernel_backend,
        )  # o: [B, T, H, V]
        if self.memory:
            o = torch.addcmul(o, gates.r[..., None], vm)  # the position reads its own memory pair
        # RMSNorm(o) * SiLU(og), one C++ pass each way on float32 CPU tensors (sinkrec/ops/gated_norm)
        y = self.w_o(gated_rms_norm(o, og, self.o_norm.weight, self.o_norm.eps).flatten(-2))  # [B, T, D]
        record = None
        if return_record:  # what the sink diagnostics read (sinkrec.diagnostics)
            # beta: the write strength the state actually gets (purified: b * (1 - rho));
            # rho: memory coverage (zero without memory)
            rho = coverage_rho(k, km, self.s_rho, self.b_rho, rho_bias) if self.memory else \
                torch.zeros_like(gates.beta)
            # q / q_read: the query before / after the differential read's subtraction; km: the memory key
            record = {"S": state, "k": k, "v": v, "o": o, "beta": gates.beta, "rho": rho, "q": q,
                      "q_read": gates.q, "km": km}
        return y, record, None if cache is None else {"conv": conv_buf, "S": state}

    def init_cache(self, B: int, device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """The start of B sequences: zero conv buffer and zero state (float32, see gated_delta_rule)."""
        return {
            "conv": self.conv.init_buffer(B, device, dtype),
            "S": torch.zeros(B, self.H, self.K, self.V, device=device, dtype=torch.float32),
        }


def recurring_codes(codes: torch.Tensor, mask: torch.Tensor, n_codes: int,
                    cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """codes [B, T, L] (RVQ code tuples), mask [B, T] -> bool [B, T]: the position's code tuple
    already occurred at an earlier real position of the same row (a recurring local pattern).
    `cu_seqlens` [S + 1]: the row is B = 1 packed sequences and "earlier" means earlier in the
    same sequence."""
    B, T, L = codes.shape
    key = torch.zeros(B, T, dtype=torch.long, device=codes.device)
    for level in range(L):
        key = key * n_codes + codes[..., level].long()
    if cu_seqlens is not None:  # equal tuples in different sequences get different keys
        key = key + packed_index(cu_seqlens, T)[0] * n_codes ** L
    pos = torch.arange(T, device=codes.device).expand(B, T)
    key = torch.where(mask, key, -1 - pos)  # pads get unique keys: they never match
    sorted_key, order = key.sort(dim=1, stable=True)  # stable: earlier positions first within a key
    first = torch.ones_like(mask)
    first[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    seen = torch.zeros_like(mask).scatter_(1, order, ~first)
    return seen & mask


def recurring_items(items: torch.Tensor, mask: torch.Tensor, num_items: int,
                    cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """items [B, T] (ids 1..num_items) -> bool [B, T]: the item already occurred at an earlier real
    position of its sequence (recurring_codes with the item id as the one code)."""
    return recurring_codes(items[..., None], mask, num_items + 1, cu_seqlens)


class SinkRecBlock(nn.Module):
    """memory (storage) -> TDGD (transition) -> SwiGLU FFN. Weights are shared across loops."""

    def __init__(self, cfg: SinkRecConfig) -> None:
        super().__init__()
        self.n_codes, self.coverage_weight = cfg.n_codes, cfg.coverage_weight
        self.memory = RVQMemory(cfg.d_model, cfg.n_levels, cfg.n_codes, cfg.conv_size, cfg.ema_decay,
                                conv_backend=cfg.conv_backend) \
            if cfg.memory else None
        self.tdgd = TDGD(cfg)
        self.ffn = SwiGLU(cfg.d_model, dropout=cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h, phi, mask, return_record: bool = False, cache: dict | None = None,
                cu_seqlens: torch.Tensor | None = None, coverage_target: torch.Tensor | None = None,
                repeat: torch.Tensor | None = None):
        """h [B, T, D] (zero at pads) -> (h [B, T, D], commitment loss, coverage loss, record | None,
        cache | None). `cache` (init_cache) continues the sequences from a previous window.
        `cu_seqlens` [S + 1]: h is [1, T, D] packed sequences (not together with `cache`).
        `coverage_target` bool [B, T]: what the coverage loss trains rho towards; None = this pass's
        recurring RVQ code tuples. `repeat` bool [B, T]: the item occurred earlier (repeat_gate)."""
        m, commit, codes, new = None, h.new_zeros(()), None, None if cache is None else {}
        if self.memory is not None:
            h, m, commit, codes, buf = self.memory(h, mask, None if cache is None else cache["memory"], cu_seqlens)
            if cache is not None:
                new["memory"] = buf
        supervise = self.memory is not None and self.coverage_weight > 0 and self.training
        y, record, tdgd_cache = self.tdgd(h, m, phi, mask, return_record or supervise,
                                          None if cache is None else cache["tdgd"], cu_seqlens, repeat)
        if cache is not None:
            new["tdgd"] = tdgd_cache
        coverage = h.new_zeros(())
        if supervise:
            if coverage_target is None:
                coverage_target = recurring_codes(codes, mask, self.n_codes, cu_seqlens)
            target = coverage_target.to(record["rho"].dtype)  # [B, T]
            rho = record["rho"].clamp(1e-6, 1 - 1e-6)  # [B, T, H]
            bce = F.binary_cross_entropy(rho, target[..., None].expand_as(rho), reduction="none").mean(-1)
            coverage = (bce * mask).sum() / mask.sum().clamp_min(1)
        h = h + self.dropout(y)
        h = h + self.ffn(h)
        if not return_record:
            record = None
        elif record is not None:
            record["codes"] = codes
        return h, commit, coverage, record, new

    def init_cache(self, B: int, device=None, dtype=torch.float32) -> dict:
        cache = {"tdgd": self.tdgd.init_cache(B, device, dtype)}
        if self.memory is not None:
            cache["memory"] = self.memory.init_buffer(B, device, dtype)
        return cache
