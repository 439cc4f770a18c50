"""Next-item losses over the tied item table.

full     softmax cross-entropy over all N items at every non-pad target (item 0 never predicted)
sampled  sampled softmax for catalogues of millions: candidates = the batch's unique targets
         (in-batch negatives) + `num_negatives` uniform draws, each logit corrected by
         -log(expected number of draws of that item) (logQ correction, Yi et al. 2019 / mixed
         negative sampling, Yang et al. 2020) so the estimator is not biased toward popular items.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def full_softmax_loss(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, D], table [N + 1, D] (row 0 = pad), targets [B, T] (0 = ignore) -> mean CE."""
    sel = targets != 0
    h = hidden[sel]  # [P, D]: only positions with a target pay for the [P, N + 1] logits
    logits = (h @ table.t()).float()  # [P, N + 1]
    logits[:, 0] = float("-inf")  # the pad item is never a valid prediction
    if h.shape[0] == 0:
        return hidden.sum() * 0.0
    return F.cross_entropy(logits, targets[sel])


def sampled_softmax_loss(
    hidden: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    num_negatives: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sampled softmax with in-batch + uniform negatives and logQ correction.

    The candidate set is unique(targets in batch ∪ uniform draws), so every target is a
    candidate and no accidental-hit masking is needed. With P targets and U uniform draws an
    item with c in-batch occurrences is expected c + U/N times among the P + U draws; that
    count (up to a constant, which cancels in the softmax) is the logQ correction.
    """
    sel = targets != 0
    h, pos = hidden[sel], targets[sel]  # [P, D], [P]
    if h.shape[0] == 0:
        return hidden.sum() * 0.0
    N = table.shape[0] - 1
    uniform = torch.randint(1, N + 1, (num_negatives,), device=pos.device, generator=generator)
    cand, inverse = torch.unique(torch.cat([pos, uniform]), return_inverse=True)  # cand: [C]
    in_batch = torch.bincount(inverse[: pos.shape[0]], minlength=cand.shape[0]).float()  # [C]
    expected = in_batch + num_negatives / N
    logits = (h @ table[cand].t()).float() - expected.log()  # [P, C]
    return F.cross_entropy(logits, inverse[: pos.shape[0]])
