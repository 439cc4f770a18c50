"""Normalisations shared by every block: RMSNorm and L2 normalisation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


class RMSNorm(nn.Module):
    """RMSNorm over the last dim. Computed in float32 because the 1/rms factor of a
    near-zero vector (pad positions, l2-normed keys of silenced heads) is unstable in bf16."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is one fused ATen kernel; same value as x * rsqrt(mean(x^2) + eps) * weight
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def l2norm_reference(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Unit L2 norm over the last dim, y = x / sqrt(|x|^2 + eps); an all-zero vector (pad) stays zero.
    The definition `l2norm` must equal (autograd backward)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class _L2Norm(torch.autograd.Function):
    """`l2norm_reference` with a hand-written backward: one reduction forward (no x^2 temporary)
    and dx = (dy - y <y, dy>) / sqrt(|x|^2 + eps) backward, about half the reference's passes over
    [..., K] (its autograd goes through pow, sum, rsqrt and two products)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        rinv = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().add_(eps).rsqrt_().to(x.dtype)
        y = x * rinv
        ctx.save_for_backward(y, rinv)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        y, rinv = ctx.saved_tensors
        yy = torch.linalg.vecdot(y, dy, dim=-1).unsqueeze_(-1)  # <y, dy>
        return torch.addcmul(dy, y, yy, value=-1).mul_(rinv), None


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Unit L2 norm over the last dim (`l2norm_reference`, faster backward); a zero vector stays zero."""
    return _L2Norm.apply(x, eps)


class SwiGLU(nn.Module):
    """Pre-RMSNorm SwiGLU feed-forward block (returns the residual update, not h + update)."""

    def __init__(self, d_model: int, hidden_mult: float = 8 / 3, dropout: float = 0.0) -> None:
        super().__init__()
        # round the hidden width to a multiple of 8 for matmul-friendly shapes
        hidden = round(d_model * hidden_mult / 8) * 8
        self.norm = RMSNorm(d_model)
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a, b = self.w_in(self.norm(h)).chunk(2, dim=-1)
        return self.dropout(self.w_out(F.silu(a) * b))
