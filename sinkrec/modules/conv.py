"""Short causal depthwise convolution with an O(1) streaming step.

The full-sequence path left-pads by (kernel - 1) zeros, so the first real event of a
LEFT-padded batch sees zeros exactly as the streaming path does when it starts from an
all-zero buffer (pad positions carry zero hidden states, see `SinkRec.forward`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortConv(nn.Module):
    """Depthwise causal conv over time: y_t = sum_{j<W} w_j * x_{t-W+1+j}.

    x: [B, T, C] -> y: [B, T, C]. No bias, so an all-zero window gives exactly zero.
    """

    def __init__(self, channels: int, kernel_size: int = 4) -> None:
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[-1]
        x = F.pad(x.transpose(1, 2), (self.kernel_size - 1, 0))  # [B, C, T + W - 1]
        return F.conv1d(x, self.weight, groups=C).transpose(1, 2)  # [B, T, C]

    def init_buffer(self, B: int, device=None, dtype=None) -> torch.Tensor:
        """The last W-1 inputs, oldest first: [B, W - 1, C]."""
        return torch.zeros(B, self.kernel_size - 1, self.channels, device=device, dtype=dtype)

    def step(self, x: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One event. x: [B, C], buf: [B, W - 1, C] -> (y [B, C], new buf)."""
        window = torch.cat([buf, x[:, None]], dim=1)  # [B, W, C]
        y = torch.einsum("bwc,cw->bc", window, self.weight[:, 0])
        return y, window[:, 1:]
