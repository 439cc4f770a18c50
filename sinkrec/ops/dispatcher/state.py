"""The streaming state of dispatcher attention (one small file so naive, chunk and the layer share it)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class DispatcherState(NamedTuple):
    """Per batch element, head and dispatcher j, the prefix seen so far: J x (V + 2) numbers.

    c_j = num_j / den_j with num_j = sum_s exp(a_js - m_j) v_s and den_j = sum_s exp(a_js - m_j).
    """

    m: torch.Tensor  # [B, H, J] running max of the logits (-inf before the first real position)
    num: torch.Tensor  # [B, H, J, V] numerator, relative to exp(m)
    den: torch.Tensor  # [B, H, J] denominator, relative to exp(m)
