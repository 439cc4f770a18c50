"""Short causal depthwise convolution with an O(1) streaming step.

The full-sequence path left-pads by (kernel - 1) zeros, so the first real event of a
LEFT-padded batch sees zeros exactly as the streaming path does when it starts from an
all-zero buffer (pad positions carry zero hidden states, see `SinkRec.forward`). Packed
sequences (`cu_seqlens`, sinkrec/modules/packed.py) get the same (kernel - 1) zeros before each
sequence's first event, so no tap reads across a boundary. The convolution itself is the op
`sinkrec.ops.short_conv` (a reference and a [B, T, C] fast path, `backend`), with the activation
fused into it.
"""
from __future__ import annotations

import torch
from torch import nn

from sinkrec.modules.packed import packed_index
from sinkrec.ops.short_conv import ACTIVATIONS, BACKENDS, short_conv


class ShortConv(nn.Module):
    """Depthwise causal conv over time: y_t = act(sum_{j<W} w_j * x_{t-W+1+j}), act = identity or SiLU.

    x: [B, T, C] -> y: [B, T, C]. No bias, so an all-zero window gives exactly zero (SiLU(0) = 0).
    `backend`: see sinkrec.ops.short_conv.
    """

    def __init__(self, channels: int, kernel_size: int = 4, activation: str | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        if activation not in ACTIVATIONS or backend not in BACKENDS:
            raise ValueError(f"ShortConv: activation={activation!r} must be one of {ACTIVATIONS} and "
                             f"backend={backend!r} one of {BACKENDS}")
        self.channels, self.kernel_size = channels, kernel_size
        self.activation, self.backend = activation, backend
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor, buf: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, C] -> (y [B, T, C], the buffer after x | None).

        `buf` [B, W - 1, C] holds the inputs just before x (a previous window of the same sequences);
        None means zeros, the start of a sequence. The new buffer is returned only when `buf` is given,
        so a window-by-window pass that carries it equals one pass over the whole sequence.
        `cu_seqlens` [S + 1]: x is [1, T, C] packed sequences; every sequence starts from zeros."""
        if cu_seqlens is not None:
            if buf is not None:
                raise ValueError("ShortConv: a carried buffer and cu_seqlens are not supported together")
            return self._packed(x, cu_seqlens), None
        if buf is None:
            return self._conv(x), None
        W = self.kernel_size
        xp = torch.cat([buf.to(x.dtype), x], dim=1)  # [B, W - 1 + T, C]: the buffer replaces the zeros
        y = self._conv(xp)[:, W - 1:]  # outputs from position W - 1 on read no implicit zero
        # a copy, not a view: a view would keep the whole window's input alive in the carried cache
        return y, xp[:, xp.shape[1] - (W - 1):].clone()

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        return short_conv(x, self.weight, self.activation, self.backend)

    def _packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """x [1, T, C] packed: each sequence is moved right by (W - 1) zeros per earlier sequence (the
        conv's own zero padding precedes the first), one conv runs over the spread-out row, and each
        event reads its output back."""
        W, (_, T, C) = self.kernel_size, x.shape
        seq, _ = packed_index(cu_seqlens, T)
        dest = torch.arange(T, device=x.device) + (W - 1) * seq  # [T]: W - 1 zeros between sequences
        n_seq = cu_seqlens.shape[0] - 1
        spread = x.new_zeros(1, T + (W - 1) * max(n_seq - 1, 0), C).index_copy(1, dest, x)
        return self._conv(spread).index_select(1, dest)  # each event's output, read where it landed

    def init_buffer(self, B: int, device=None, dtype=None) -> torch.Tensor:
        """The last W-1 inputs, oldest first: [B, W - 1, C]."""
        return torch.zeros(B, self.kernel_size - 1, self.channels, device=device, dtype=dtype)
