"""Exact full-ranking metrics over the whole catalogue, in item chunks, summed across ranks.

Protocol: every item 1..N is a candidate; the pad item 0 never is. History items stay candidates
unless an `exclude` list is given (the user's history is removed; the target itself never is): the
protocol of HSTU, SASRec+ and eSASRec, whose published numbers are comparable to the excluded
metrics only (sinkrec.lit_module.ranking_names). The trainer logs both conventions.

Ties count AGAINST the target:  rank = 1 + #{i in candidates, i != target : s_i >= s_target}.
So a model that scores everything equal gets rank N, not 1. Per target:
    HR@k = [rank <= k]    NDCG@k = [rank <= k] / log2(rank + 1)    MRR = 1 / rank (untruncated)
With k >= N every target is a hit (HR@k = 1).

Scores are computed `chunk_size` items at a time, so memory is O(n_targets * chunk_size), never
users x items. The target's own score is read from the same chunked matmul that scores the other
items (not from a separate dot product), so exactly equal embeddings give exactly equal scores.
Across ranks, per-rank SUMS and COUNTS are summed (RankingAccumulator, a torchmetrics Metric),
then divided: exact, not an average of per-rank averages.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torchmetrics import Metric

KIND_GROUPS = {1: "habit", 0: "dynamic"}  # SinkBench target kinds (CONTRACTS §1 side column `kind`)


def _chunks(num_items: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    for lo in range(1, num_items + 1, chunk_size):
        yield lo, min(lo + chunk_size, num_items + 1)


def _chunk_scores(h: torch.Tensor, table: torch.Tensor, lo: int, hi: int, targets: torch.Tensor,
                  exclude: torch.Tensor | None) -> torch.Tensor:
    """Scores of items lo..hi-1 [n, hi - lo]; excluded history items (except the target) -> -inf."""
    # in h's dtype even under bf16 autocast (trainer.precision bf16-mixed): bf16 keeps 8 bits of mantissa,
    # so many candidates would tie with the target, and ties count against it
    with torch.autocast(h.device.type, enabled=False):
        s = h @ table[lo:hi].t()
    if exclude is not None:
        hit = (exclude >= lo) & (exclude < hi) & (exclude != targets[:, None])  # [n, H]
        rows, cols = hit.nonzero(as_tuple=True)
        s[rows, exclude[rows, cols] - lo] = float("-inf")
    return s


@torch.no_grad()
def target_ranks(
    hidden: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    exclude: torch.Tensor | None = None,
    chunk_size: int = 8192,
) -> torch.Tensor:
    """Rank of each target among all items 1..N (ties against the target; see module docstring).

    Args:
        hidden: [n, D] query vectors, one per target.
        table: [N + 1, D] item table; row 0 is padding and never a candidate.
        targets: [n] item ids in 1..N.
        exclude: optional [n, H] item ids (0 = none) removed from the candidates of each row
            (the user's history); the target itself is never removed.
        chunk_size: items scored per matmul.
    Returns:
        ranks: [n] int64 in 1..N.
    """
    n, N = targets.shape[0], table.shape[0] - 1
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=targets.device)
    if targets.min() < 1 or targets.max() > N:
        raise ValueError(f"target ids must lie in 1..{N}, got [{int(targets.min())}, {int(targets.max())}]")
    # scores at >= float32, also under bf16 autocast (_chunk_scores)
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, table.dtype), torch.float32)
    h, table = hidden.to(dtype), table.to(dtype)
    chunks = list(_chunks(N, chunk_size))
    cached = None
    # pass 1: the target's score, taken from the same matmul that scores its neighbours
    tgt = torch.empty(n, dtype=h.dtype, device=h.device)
    for lo, hi in chunks:
        inside = (targets >= lo) & (targets < hi)
        if not inside.any():
            continue
        s = _chunk_scores(h, table, lo, hi, targets, exclude)
        if len(chunks) == 1:
            cached = s
        tgt[inside] = s[inside, targets[inside] - lo]
    # pass 2: count the other candidates scoring >= the target (the target itself is one of them)
    ge = torch.zeros(n, dtype=torch.long, device=h.device)
    for lo, hi in chunks:
        s = cached if cached is not None else _chunk_scores(h, table, lo, hi, targets, exclude)
        ge += (s >= tgt[:, None]).sum(1)
    ranks = ge  # = 1 + #others >= target, since the target counts itself once
    # a NaN target score compares False everywhere: count it as the worst rank, never as a hit
    return torch.where(torch.isnan(tgt), torch.full_like(ranks, N), ranks.clamp_min(1))


def metric_names(ks: Sequence[int]) -> list[str]:
    return [f"hr_{k}" for k in ks] + [f"ndcg_{k}" for k in ks] + ["mrr"]


def rank_sums(ranks: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Per-metric sums over targets, float64 [len(metric_names(ks))] (divide by the count later)."""
    r = ranks.double()
    hr = [(r <= k).double().sum() for k in ks]
    ndcg = [((r <= k).double() / torch.log2(r + 1.0)).sum() for k in ks]
    return torch.stack([*hr, *ndcg, (1.0 / r).sum()]) if len(r) else torch.zeros(2 * len(ks) + 1,
                                                                                  dtype=torch.float64)


class RankingAccumulator(Metric):
    """Sums of HR/NDCG/MRR and target counts per group ("all", and per SinkBench kind when present).

    A torchmetrics Metric: its one state, the float64 table `sums` [groups, metrics + 1] (last
    column = target count), is summed across ranks in `compute` (dist_reduce_fx="sum") and only
    then divided, so the metrics are exact over the whole world, not an average of rank averages."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (10, 50, 200)) -> None:
        super().__init__()
        self.ks = tuple(ks)
        self.names = metric_names(self.ks)
        self.groups = ("all", *KIND_GROUPS.values())
        self.add_state("sums", default=torch.zeros(len(self.groups), len(self.names) + 1, dtype=torch.float64),
                       dist_reduce_fx="sum")

    def update(self, ranks: torch.Tensor, kinds: torch.Tensor | None = None) -> None:
        """ranks [n] (target_ranks), kinds [n] SinkBench target kinds or None."""
        ranks = ranks.detach().to(self.sums.device)
        self._add(0, ranks)
        if kinds is not None:
            kinds = kinds.detach().to(self.sums.device)
            for g, code in enumerate(KIND_GROUPS, start=1):
                self._add(g, ranks[kinds == code])

    def _add(self, g: int, ranks: torch.Tensor) -> None:
        self.sums[g, :-1] += rank_sums(ranks, self.ks).to(self.sums.device)
        self.sums[g, -1] += len(ranks)

    def compute(self) -> dict[str, float]:
        """{"hr_10": ..., "count": ..., "habit/hr_10": ...}, over every rank's targets."""
        out: dict[str, float] = {}
        for g, row in zip(self.groups, self.sums.cpu()):
            count = float(row[-1])
            if g != "all" and count == 0:
                continue  # no kinds in this dataset
            prefix = "" if g == "all" else f"{g}/"
            for name, total in zip(self.names, row[:-1]):
                out[prefix + name] = float(total) / count if count else math.nan
            out[prefix + "count"] = count
        return out


@torch.no_grad()
def top_k(hidden: torch.Tensor, table: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
          chunk_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Best k items (ids 1..N) per row, chunk by chunk: (scores [n, k], item ids [n, k])."""
    n, N = hidden.shape[0], table.shape[0] - 1
    k = min(k, N)
    best_s = hidden.new_full((n, 0), float("-inf"))
    best_i = torch.zeros(n, 0, dtype=torch.long, device=hidden.device)
    no_target = torch.zeros(n, dtype=torch.long, device=hidden.device)
    for lo, hi in _chunks(N, chunk_size):
        s = _chunk_scores(hidden.to(table.dtype), table, lo, hi, no_target, exclude)
        ids = torch.arange(lo, hi, device=hidden.device).expand(n, -1)
        cand_s, cand_i = torch.cat([best_s, s], 1), torch.cat([best_i, ids], 1)
        best_s, idx = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
        best_i = cand_i.gather(1, idx)
    return best_s, best_i
