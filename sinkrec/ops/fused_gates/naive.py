"""PyTorch reference for the fused TDGD gate / purification math (the spec; autograd backward).

Per position and head (SINKREC.md section 2), with k, q, km already l2-normalised:
    rho   = sigmoid(s_rho * <k, km> + b_rho [+ rho_bias])     memory coverage
    g     = -exp(A_log) * softplus(a_x + c_a * phi + dt_bias)  log decay (<= 0)
    b     = sigmoid(b_x + c_b * phi)                           write strength
    beta~ = b * (1 - rho)                                      purified write strength
    v~    = v - rho * vm                                       purified value
    q~    = q - sigmoid(l_x) * km                              differential read
    r     = rho * <q, km>                                      memory read coefficient
then `o = gated_delta_rule(q~, k, v~, g, beta~) + r * vm`. At pads (mask = 0): g = beta~ = 0,
so the state does not change. Switches (each a real code path):
    memory=False        rho = 0, q~ = q, v~ = v, r = None  (plain Gated DeltaNet gates)
    purify_write=False  beta~ = b, v~ = v   (rho still feeds the read term)
    diff_read=False     q~ = q
    temporal=False      phi is ignored (c_a, c_b unused)
`rho_bias` [B, T, H] (optional, default None = the spec): a per-position term added to rho's
pre-activation (SinkRecConfig.repeat_gate: c_rep * "the item occurred earlier in the sequence").
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class GateOut(NamedTuple):
    q: torch.Tensor  # [B, T, H, K] read query q~
    v: torch.Tensor  # [B, T, H, V] written value v~
    g: torch.Tensor  # [B, T, H]    log decay
    beta: torch.Tensor  # [B, T, H] write strength beta~
    r: torch.Tensor | None  # [B, T, H] memory read coefficient (None without memory)


def coverage_rho(k: torch.Tensor, km: torch.Tensor, s_rho: torch.Tensor, b_rho: torch.Tensor,
                 rho_bias: torch.Tensor | None = None) -> torch.Tensor:
    """rho [B, T, H] = sigmoid(s_rho <k, km> + b_rho [+ rho_bias]): the memory coverage (k, km [B, T, H, K])."""
    z = s_rho * (k * km).sum(-1) + b_rho
    return torch.sigmoid(z if rho_bias is None else z + rho_bias)


def gates_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    km: torch.Tensor | None,
    vm: torch.Tensor | None,
    a_x: torch.Tensor,
    b_x: torch.Tensor,
    l_x: torch.Tensor | None,
    phi: torch.Tensor,
    mask: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    c_a: torch.Tensor,
    c_b: torch.Tensor,
    s_rho: torch.Tensor,
    b_rho: torch.Tensor,
    memory: bool = True,
    purify_write: bool = True,
    diff_read: bool = True,
    temporal: bool = True,
    rho_bias: torch.Tensor | None = None,
) -> GateOut:
    """Shapes: q, k, km [B, T, H, K]; v, vm [B, T, H, V]; a_x, b_x, l_x [B, T, H];
    phi, mask [B, T]; A_log, dt_bias, c_a, c_b, s_rho, b_rho [H]; rho_bias [B, T, H] or None."""
    mask = mask.to(a_x.dtype)[..., None]  # [B, T, 1], broadcasts over heads
    za, zb = a_x + dt_bias, b_x
    if temporal:
        phi = phi.to(a_x.dtype)[..., None]  # [B, T, 1]
        za, zb = za + c_a * phi, zb + c_b * phi
    g = -A_log.exp() * F.softplus(za) * mask
    b = torch.sigmoid(zb) * mask
    if not memory:
        return GateOut(q, v, g, b, None)
    rho = coverage_rho(k, km, s_rho, b_rho, rho_bias)  # [B, T, H]
    r = rho * (q * km).sum(-1)
    if purify_write:
        beta, v = b * (1 - rho), v - rho[..., None] * vm
    else:
        beta = b
    if diff_read:
        q = q - torch.sigmoid(l_x)[..., None] * km
    return GateOut(q, v, g, beta, r)
