"""The gated output norm of TDGD, by definition: y = RMSNorm(x) * SiLU(g) (Gated DeltaNet's output
gate; SINKREC.md section 2), RMSNorm over the last dim with a learned weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sinkrec.modules.norms import rms_norm, rms_norm_reference


def gated_rms_norm_reference(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x, g [..., V], weight [V] -> x / sqrt(mean(x^2) + eps) * weight * SiLU(g), the norm in float32
    (as `RMSNorm`); autograd backward."""
    return rms_norm_reference(x.float(), weight.float(), eps).to(x.dtype) * F.silu(g)


def gated_rms_norm_torch(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The same through `rms_norm` (l2norm's hand-written backward): the PyTorch fast path, any
    device and dtype."""
    return rms_norm(x.float(), weight.float(), eps).to(x.dtype) * F.silu(g)
