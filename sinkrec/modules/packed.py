"""Packed (ragged) batches, fla's `cu_seqlens` convention: B = 1 and the T axis holds S sequences back
to back, sequence s at positions cu_seqlens[s]:cu_seqlens[s + 1] (cu_seqlens int [S + 1], 0 first,
T last, non-decreasing). Every cross-position operation of the recurrent models reads these
boundaries; the helpers here turn them into per-position indices without a host sync."""
from __future__ import annotations

import itertools

import torch


def packed_index(cu_seqlens: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cu_seqlens [S + 1], n = cu_seqlens[-1] -> (seq [n] long: the sequence of each position,
    pos [n] long: its index inside that sequence, 0 at each sequence's first event).
    Empty sequences (equal neighbouring bounds) own no position."""
    cu = cu_seqlens.to(torch.long)
    t = torch.arange(n, device=cu.device)
    seq = torch.searchsorted(cu[1:], t, right=True)  # the s with cu[s] <= t < cu[s + 1]
    return seq, t - cu[seq]


def unpack_left(x: torch.Tensor, cu_seqlens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Packed x [1, N] -> the sequences `keep` [K] as LEFT-padded rows [K, T] (0 = pad), the layout
    of an unpacked batch (for code that reads [B, T] batches, e.g. the sink diagnostics)."""
    bounds = cu_seqlens.tolist()
    parts = [x[0, bounds[s] : bounds[s + 1]] for s in keep.tolist()]
    out = x.new_zeros(len(parts), max([1, *(len(p) for p in parts)]))
    for r, p in enumerate(parts):
        if len(p):
            out[r, out.shape[1] - len(p) :] = p
    return out


def check_packed(items: torch.Tensor, ts: torch.Tensor, cu_seqlens: torch.Tensor, who: str) -> None:
    """The model-side checks of a packed batch (the delta-rule op checks the bounds themselves)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64) \
            or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{who}: cu_seqlens must be a 1-D int32/int64 tensor [S + 1] (cumulative sequence "
                         f"starts), got {cu_seqlens!r:.80}")
    if items.dim() != 2 or items.shape[0] != 1 or ts.shape != items.shape:
        raise ValueError(f"{who}: with cu_seqlens, items and ts must be [1, N] packed sequences, got items "
                         f"{tuple(items.shape)} and ts {tuple(ts.shape)}")
    bounds = cu_seqlens.tolist()
    N = items.shape[1]
    if bounds[0] != 0 or bounds[-1] != N or any(b < a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"{who}: cu_seqlens must be non-decreasing from 0 to N = {N} (the packed length), "
                         f"got {bounds[:8]}{' ...' if len(bounds) > 8 else ''}")
    if bool((items == 0).any()):
        raise ValueError(f"{who}: a packed batch holds no pad items (item 0); sequence s is exactly "
                         "positions cu_seqlens[s]:cu_seqlens[s + 1]")
