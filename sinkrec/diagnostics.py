"""Semantic-state-sink diagnostics (SINKREC.md section 7).

Given the final delta-rule state S_T ([K, V] per head, fla layout: keys index rows) and the
positions R whose item recurs >= m times in the sequence:
    occupancy   O = ||P_R S_T||_F^2 / ||S_T||_F^2, P_R = projector onto the span of the repeated
                items' keys, to compare with the repeated share |R| / T (O >> |R|/T: repeats hog
                the state). Departure from the spec's span{k_t : t in R}: each repeated item
                contributes ONE direction, the mean of its keys. With a few hundred repeated
                positions and K = 32 the per-position keys (each shaped by its own conv context)
                span all of R^K, so the spec's O is 1 for every model and measures nothing
                (seen on SinkBench: 1.0 for SinkRec and GDN alike).
    eff. rank   exp(H(sigma / ||sigma||_1)) of S_T's singular values
    read bias   mean over real t of cos(o_t, mean_{t in R} v_t)
Functions take one layer's tensors for a batch and return per-(sequence, head) values.
"""
from __future__ import annotations

import torch


def repeated_mask(items: torch.Tensor, min_repeats: int = 3) -> torch.Tensor:
    """items [B, T] -> bool [B, T]: real positions whose item occurs >= min_repeats times in the row.
    Uses a [B, T, T] comparison: fine for validation batches (T of a few thousand)."""
    real = items != 0
    counts = (items[:, :, None] == items[:, None, :]).sum(-1)  # [B, T]
    return real & (counts >= min_repeats)


def occupancy(S: torch.Tensor, k: torch.Tensor, rep: torch.Tensor, items: torch.Tensor | None = None,
              rank_tol: float = 1e-4) -> torch.Tensor:
    """S [B, H, K, V], k [B, T, H, K], rep [B, T], items [B, T] | None -> O [B, H] (NaN where a row
    has no repeats). With `items`, the subspace is spanned by each repeated item's mean key;
    without, by every repeated position's key."""
    B, H = S.shape[:2]
    out = torch.full((B, H), float("nan"), device=S.device)
    for b in range(B):
        if not rep[b].any():
            continue
        if items is not None:
            _, group = torch.unique(items[b, rep[b]], return_inverse=True)  # [n_R] -> distinct item index
            n_items = int(group.max()) + 1
        for h in range(H):
            keys = k[b, rep[b], h].float()  # [n_R, K]
            if items is not None:  # one direction per repeated item: the mean of its keys
                keys = torch.zeros(n_items, keys.shape[-1], device=keys.device).index_add_(0, group, keys)
            _, s, vh = torch.linalg.svd(keys, full_matrices=False)
            basis = vh[s > rank_tol * s.max().clamp_min(1e-12)]  # [r, K] orthonormal rows
            Sbh = S[b, h].float()
            total = Sbh.pow(2).sum()
            out[b, h] = (basis @ Sbh).pow(2).sum() / total.clamp_min(1e-12)
    return out


def effective_rank(S: torch.Tensor) -> torch.Tensor:
    """S [B, H, K, V] -> exp(entropy of normalised singular values) [B, H], in [1, min(K, V)]."""
    s = torch.linalg.svdvals(S.float())  # [B, H, min(K, V)]
    p = s / s.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum(-1))


def readout_bias(o: torch.Tensor, v: torch.Tensor, rep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """o, v [B, T, H, V], rep, mask [B, T] -> mean cos(o_t, mean repeated v) over real t: [B, H]
    (NaN where a row has no repeats)."""
    w = rep[..., None, None].float()  # [B, T, 1, 1]
    v_rep = (v.float() * w).sum(1) / w.sum(1).clamp_min(1)  # [B, H, V]
    cos = torch.nn.functional.cosine_similarity(o.float(), v_rep[:, None], dim=-1, eps=1e-8)  # [B, T, H]
    m = mask[..., None].float()
    out = (cos * m).sum(1) / m.sum(1).clamp_min(1)
    return torch.where(rep.any(1)[:, None], out, torch.full_like(out, float("nan")))


@torch.no_grad()
def sink_diagnostics(model: torch.nn.Module, items: torch.Tensor, ts: torch.Tensor,
                     min_repeats: int = 3) -> dict[str, float]:
    """Sink measures averaged over (loop, block) passes, heads and the sequences that have
    repeats. Models without a recurrent state (SASRec) return {}."""
    was_training = model.training
    model.eval()  # no dropout, no codebook EMA updates
    try:
        out = model(items, ts, return_states=True)
    finally:
        model.train(was_training)
    if not out.states:
        return {}
    mask = items != 0
    rep = repeated_mask(items, min_repeats)
    has_rep = rep.any(1)
    if not has_rep.any():
        return {}
    share = (rep.sum(1).float() / mask.sum(1).clamp_min(1).float())[has_rep].mean().item()
    occ, erank, bias = [], [], []
    for rec in out.states:
        occ.append(torch.nanmean(occupancy(rec["S"], rec["k"], rep, items)).item())
        erank.append(effective_rank(rec["S"]).mean().item())
        bias.append(torch.nanmean(readout_bias(rec["o"], rec["v"], rep, mask)).item())
    mean = lambda xs: sum(xs) / len(xs)
    return {
        "sink/occupancy": mean(occ),
        "sink/repeated_share": share,
        "sink/occupancy_excess": mean(occ) - share,
        "sink/effective_rank": mean(erank),
        "sink/readout_bias": mean(bias),
    }
