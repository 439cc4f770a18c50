"""Semantic-state-sink diagnostics (SINKREC.md section 7, made measurable; docs/MODEL.md).

Given the final delta-rule state S_T ([K, V] per head, fla layout: keys index rows) and the
positions R of repeated events (ground truth where the data has it, e.g. SinkBench's habit events;
else positions whose item recurs >= m times in the sequence):

    excess occupancy  X_r = (||P_r S_T||_F^2 / ||S_T||_F^2) / (r / K)
        P_r projects onto the top-r subspace of the repeated items' mean keys (each repeated item
        contributes its mean key, weighted by how often it occurs), r = min(rank, #directions) < K.
        A random r-dimensional subspace holds r / K of the energy of any state on average, so
        X = 1 means the repeats get their fair share of the state (no sink) and X -> K / r means
        the state holds nothing else. Two choices make it informative where the spec's literal
        ratio is not: (1) one direction per repeated ITEM, not per position (a few hundred
        positions' keys, each shaped by its own conv context, span all of R^K, so the literal
        ||P_R S||^2 / ||S||^2 is 1 for every model); (2) the rank cap r, so the measure cannot
        saturate by growing its own subspace.
    effective rank    exp(H(sigma / ||sigma||_1)) of S_T's singular values, in [1, min(K, V)]
    read-out bias     mean over real t of cos(o_t, mean_{t in R} v_t)
    write share       the repeated events' share of the total write strength beta~ (purified), over
                      their share of the events: 1 = written like any event, < 1 = the memory keeps
                      them out of the state (SinkRec's purified write), > 1 = written more
SinkRec only (memory), "does the differential read remove the right direction?":
    memory-key alignment  mean over real t of ||P_r km_t||^2 / (r / K), P_r as above (km_t has unit
                      norm): 1 = km points nowhere in particular, K / r = into the repeats' subspace,
                      0 = away from it. The differential read subtracts S's response to km.
    read removal      at the last real position (the read-out that scores the target):
                      cos(q_T S_T, v_R) - cos((q_T - lam_T km_T) S_T, v_R), v_R the repeated events'
                      mean value: > 0 = subtracting lam km moves the read-out away from the repeats
Functions take one layer's tensors for a batch and return per-(sequence, head) values.
"""
from __future__ import annotations

import torch

OCCUPANCY_RANK = 4  # r: subspace rank of the excess occupancy (K = 32 in the default configs)


def repeated_mask(items: torch.Tensor, min_repeats: int = 3) -> torch.Tensor:
    """items [B, T] -> bool [B, T]: real positions whose item occurs >= min_repeats times in the row.
    Counts by sorting (row, item) keys, O(BT log BT) time and O(BT) memory: the pairwise [B, T, T]
    comparison it replaces needed 48 GB for 32 SinkBench histories of up to 9,680 events
    (tests/model/test_diagnostics.py holds the two equal)."""
    real = items != 0
    if items.numel() == 0:
        return real
    key = torch.arange(items.shape[0], device=items.device)[:, None] * (int(items.max()) + 1) + items
    _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    return real & (counts[inverse] >= min_repeats)


def repeat_basis(keys: torch.Tensor, items: torch.Tensor, rank: int, rel_tol: float = 1e-4) -> torch.Tensor:
    """keys [n, K] and items [n] of the repeated positions of one (sequence, head) -> orthonormal
    rows [r, K] spanning the top-r subspace of the count-weighted item mean keys (r <= rank)."""
    _, group, counts = torch.unique(items, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), keys.shape[-1], dtype=keys.dtype, device=keys.device)
    sums.index_add_(0, group, keys)  # [n_items, K]
    # rows sqrt(n_i) * mean_i: the second moment sum_i n_i mean_i mean_i^T, what the writes pile up
    rows = sums / counts[:, None].to(keys.dtype).sqrt()
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    keep = min(rank, int((s > rel_tol * s.max().clamp_min(1e-12)).sum()))
    return vh[:keep]


def _repeat_bases(k: torch.Tensor, rep: torch.Tensor, items: torch.Tensor, rank: int):
    """(b, h, basis [r, K]) for every (row, head) of k [B, T, H, K] whose row has a repeated position:
    the repeat_basis of that row's repeated keys."""
    for b in range(k.shape[0]):
        if rep[b].any():
            for h in range(k.shape[2]):
                yield b, h, repeat_basis(k[b, rep[b], h].float(), items[b, rep[b]], rank)


def excess_occupancy(S: torch.Tensor, k: torch.Tensor, rep: torch.Tensor, items: torch.Tensor,
                     rank: int = OCCUPANCY_RANK) -> torch.Tensor:
    """S [B, H, K, V], k [B, T, H, K], rep [B, T] bool, items [B, T] -> X_r [B, H] (module doc;
    NaN where a row has no repeated position)."""
    B, H, K = S.shape[:3]
    if rank >= K:
        raise ValueError(f"excess_occupancy: rank={rank} must be < K={K} (a full-rank subspace holds everything)")
    out = torch.full((B, H), float("nan"), device=S.device)
    for b, h, basis in _repeat_bases(k, rep, items, rank):
        Sbh = S[b, h].float()
        share = (basis @ Sbh).pow(2).sum() / Sbh.pow(2).sum().clamp_min(1e-12)
        out[b, h] = share / (basis.shape[0] / K)
    return out


def memory_key_alignment(km: torch.Tensor, k: torch.Tensor, rep: torch.Tensor, items: torch.Tensor,
                         mask: torch.Tensor, rank: int = OCCUPANCY_RANK) -> torch.Tensor:
    """km, k [B, T, H, K] (unit memory keys, keys), rep, mask [B, T] bool, items [B, T] -> [B, H]: the
    memory keys' mean energy in the repeated items' top-r key subspace over r / K (module doc; NaN
    where a row has no repeated position)."""
    B, _, H, K = k.shape
    out = torch.full((B, H), float("nan"), device=k.device)
    for b, h, basis in _repeat_bases(k, rep, items, rank):
        energy = (km[b, mask[b], h].float() @ basis.T).pow(2).sum(-1)  # [n real]
        out[b, h] = energy.mean() / (basis.shape[0] / K)
    return out


def read_removal(S: torch.Tensor, q: torch.Tensor, q_read: torch.Tensor, v: torch.Tensor, rep: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """S [B, H, K, V] final states, q / q_read [B, T, H, K] (the query before / after the differential
    read's subtraction), v [B, T, H, V], rep, mask [B, T] -> [B, H]: cos(q_T S_T, v_R) minus
    cos(q~_T S_T, v_R) at each row's last real position (module doc; NaN without repeats)."""
    B, T = mask.shape
    last = (mask * torch.arange(1, T + 1, device=mask.device)).argmax(1)  # [B] the last real position
    rows = torch.arange(B, device=mask.device)
    w = rep[..., None, None].float()
    v_rep = (v.float() * w).sum(1) / w.sum(1).clamp_min(1)  # [B, H, V]

    def cos(qq: torch.Tensor) -> torch.Tensor:  # cos(read-out q S [B, H, V], v_R)
        read = torch.einsum("bhk,bhkv->bhv", qq[rows, last].float(), S.float())
        return torch.nn.functional.cosine_similarity(read, v_rep, dim=-1, eps=1e-8)

    out = cos(q) - cos(q_read)
    return torch.where(rep.any(1)[:, None], out, torch.full_like(out, float("nan")))


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


def write_share(beta: torch.Tensor, rep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """beta [B, T, H] (the write strength the state gets), rep, mask [B, T] -> [B, H]: the repeated
    events' share of the summed write strength over their share of the events (NaN without repeats)."""
    w = beta.float() * mask[..., None]
    rep_f = rep[..., None].float()
    frac_write = (w * rep_f).sum(1) / w.sum(1).clamp_min(1e-12)  # [B, H]
    frac_events = (rep.sum(1).float() / mask.sum(1).clamp_min(1).float())[:, None]  # [B, 1]
    out = frac_write / frac_events.clamp_min(1e-12)
    return torch.where(rep.any(1)[:, None], out, torch.full_like(out, float("nan")))


def per_user(states: list[dict], items: torch.Tensor, rep: torch.Tensor,
             rank: int = OCCUPANCY_RANK) -> dict[str, torch.Tensor]:
    """Each measure per sequence [B], averaged over the (loop, block) passes and heads; `rep` [B, T]
    marks the repeated positions. Also the excess occupancy of the other events' items (the control),
    rho (memory coverage) on repeated vs other real events, and, where the pass has a memory, the
    memory-key alignment (with its control over the other events' items) and the read removal."""
    mask = items != 0
    other = mask & ~rep
    per: dict[str, list[torch.Tensor]] = {n: [] for n in
                                          ("excess_occupancy", "excess_occupancy_other", "effective_rank",
                                           "readout_bias", "write_share", "rho_repeated", "rho_other")}
    for rec in states:
        per["excess_occupancy"].append(excess_occupancy(rec["S"], rec["k"], rep, items, rank).mean(1))
        # the control: the same measure with the OTHER events' items as the set. Items the state has
        # just written are over-represented in any low-rank state, repeated or not; the sink is the
        # repeated items' excess beyond this control
        per["excess_occupancy_other"].append(excess_occupancy(rec["S"], rec["k"], other, items, rank).mean(1))
        per["effective_rank"].append(effective_rank(rec["S"]).mean(1))
        per["readout_bias"].append(readout_bias(rec["o"], rec["v"], rep, mask).mean(1))
        per["write_share"].append(write_share(rec["beta"], rep, mask).mean(1))
        rho = rec["rho"].float().mean(-1)  # [B, T], mean over heads
        per["rho_repeated"].append((rho * rep).sum(1) / rep.sum(1).clamp_min(1))
        per["rho_other"].append((rho * other).sum(1) / other.sum(1).clamp_min(1))
        if rec.get("km") is not None:  # SinkRec: what the differential read subtracts
            per.setdefault("km_alignment", []).append(
                memory_key_alignment(rec["km"], rec["k"], rep, items, mask, rank).mean(1))
            per.setdefault("km_alignment_other", []).append(
                memory_key_alignment(rec["km"], rec["k"], other, items, mask, rank).mean(1))
            per.setdefault("read_removal", []).append(
                read_removal(rec["S"], rec["q"], rec["q_read"], rec["v"], rep, mask).mean(1))
    return {n: torch.stack(v).mean(0) for n, v in per.items()}


@torch.no_grad()
def sink_diagnostics(model: torch.nn.Module, items: torch.Tensor, ts: torch.Tensor,
                     min_repeats: int = 3, rep: torch.Tensor | None = None) -> dict[str, float]:
    """Sink measures averaged over the sequences that have repeats. `rep` [B, T] marks repeated
    positions (default: items recurring >= min_repeats times in the row). Models without a recurrent
    state (SASRec) return {}."""
    was_training = model.training
    model.eval()  # no dropout, no codebook EMA updates
    try:
        out = model(items, ts, return_states=True)
    finally:
        model.train(was_training)
    if not out.states:
        return {}
    mask = items != 0
    rep = repeated_mask(items, min_repeats) if rep is None else rep & mask
    has_rep = rep.any(1)
    if not has_rep.any():
        return {}
    share = (rep.sum(1).float() / mask.sum(1).clamp_min(1).float())[has_rep].mean().item()
    values = per_user(out.states, items, rep)
    result = {f"sink/{n}": torch.nanmean(v[has_rep]).item() for n, v in values.items()}
    result["sink/repeated_share"] = share
    return result
