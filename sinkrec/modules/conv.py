"""Short causal depthwise convolution with an O(1) streaming step.

The full-sequence path left-pads by (kernel - 1) zeros, so the first real event of a
LEFT-padded batch sees zeros exactly as the streaming path does when it starts from an
all-zero buffer (pad positions carry zero hidden states, see `SinkRec.forward`). Packed
sequences (`cu_seqlens`, sinkrec/modules/packed.py) get the same (kernel - 1) zeros before each
sequence's first event, so no tap reads across a boundary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sinkrec.modules.packed import packed_index


class ShortConv(nn.Module):
    """Depthwise causal conv over time: y_t = sum_{j<W} w_j * x_{t-W+1+j}.

    x: [B, T, C] -> y: [B, T, C]. No bias, so an all-zero window gives exactly zero.
    """

    def __init__(self, channels: int, kernel_size: int = 4) -> None:
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor, buf: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, C] -> (y [B, T, C], the buffer after x | None).

        `buf` [B, W - 1, C] holds the inputs just before x (a previous window of the same sequences);
        None means zeros, the start of a sequence. The new buffer is returned only when `buf` is given,
        so a window-by-window pass that carries it equals one pass over the whole sequence.
        `cu_seqlens` [S + 1]: x is [1, T, C] packed sequences; every sequence starts from zeros."""
        C = x.shape[-1]
        if cu_seqlens is not None:
            if buf is not None:
                raise ValueError("ShortConv: a carried buffer and cu_seqlens are not supported together")
            return self._packed(x, cu_seqlens), None
        if buf is None:
            xp = F.pad(x.transpose(1, 2), (self.kernel_size - 1, 0))  # [B, C, T + W - 1]
        else:
            xp = torch.cat([buf.to(x.dtype), x], dim=1).transpose(1, 2)
        y = F.conv1d(xp, self.weight, groups=C).transpose(1, 2)  # [B, T, C]
        # a copy, not a view: a view would keep the whole window's input alive in the carried cache
        new_buf = None if buf is None else xp[..., xp.shape[-1] - (self.kernel_size - 1):].transpose(1, 2).clone()
        return y, new_buf

    def _packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """x [1, T, C] packed: each sequence is moved right by (W - 1) zeros per earlier sequence plus
        its own, one conv runs over the spread-out row, and each event reads its output back."""
        W, (_, T, C) = self.kernel_size, x.shape
        seq, _ = packed_index(cu_seqlens, T)
        dest = torch.arange(T, device=x.device) + (W - 1) * (seq + 1)  # [T]: W - 1 zeros before each sequence
        n_seq = cu_seqlens.shape[0] - 1
        spread = x.new_zeros(1, T + (W - 1) * n_seq, C).index_copy(1, dest, x)
        y = F.conv1d(spread.transpose(1, 2), self.weight, groups=C).transpose(1, 2)  # ends at W - 1 + i
        return y.index_select(1, dest - (W - 1))

    def init_buffer(self, B: int, device=None, dtype=None) -> torch.Tensor:
        """The last W-1 inputs, oldest first: [B, W - 1, C]."""
        return torch.zeros(B, self.kernel_size - 1, self.channels, device=device, dtype=dtype)
