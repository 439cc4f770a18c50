"""Next-item losses over the tied item table.

full     softmax cross-entropy over all N items at every non-pad target (item 0 never predicted),
         computed `chunk` positions at a time so the [positions x items] logits never exist whole.
sampled  sampled softmax: each target competes with `num_negatives` uniform draws from 1..N that
         the whole batch shares (one [P, U] matmul instead of [P, N]; HSTU and SASRec+ train
         ML-1M this way). A draw that equals the row's own target is masked (an accidental hit).
         Uniform draws need no logQ correction: log Q is the same constant for every candidate.
         With `in_batch=True` the candidates are instead the batch's unique targets plus the
         uniform draws, each corrected by -log(expected number of draws) (logQ, Yi et al. 2019;
         mixed negative sampling, Yang et al. 2020), for catalogues whose popular items must be
         seen as negatives more often than uniform sampling shows them.
         With `per_position=True` every target draws its own `num_negatives` (HSTU's sampler): the
         batch sees P x U negatives instead of U, at the same FLOPs; computed `chunk` positions at a
         time and recomputed in backward, so the [P, U, D] gathered rows never exist whole.

Every logit is divided by `temperature` (HSTU's recipe: L2-normalised vectors and 0.05).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

SAMPLED_CHUNK = 2048  # positions per chunk of the per-position sampled softmax
FULL_CHUNK = 1024  # positions per chunk of the full softmax: peak memory ~ FULL_CHUNK x N floats
# (1024 also measured faster than one unchunked [P, N] pass on ML-1M: the chunk stays in cache)


def _chunk_logits(hc: torch.Tensor, table: torch.Tensor, tau: float, dtype: torch.dtype) -> torch.Tensor:
    """[c, D] x [N + 1, D] -> [c, N + 1] logits / tau in `dtype`; the pad item is never a valid prediction."""
    logits = (hc @ table.t()).to(dtype)
    if tau != 1.0:
        logits.div_(tau)
    logits[:, 0] = float("-inf")
    return logits


def _wants_grads(h: torch.Tensor, table: torch.Tensor) -> bool:
    """Whether a fused loss should compute its gradients in the forward pass (none under no_grad)."""
    return torch.is_grad_enabled() and (h.requires_grad or table.requires_grad)


class _GradsInForward(torch.autograd.Function):
    """A loss (h, table, *rest) -> scalar whose forward computed d/dh and d/dtable itself and
    stored them with `_keep`; backward only scales them by the incoming gradient."""

    @staticmethod
    def _keep(ctx, gh: torch.Tensor | None, gt: torch.Tensor | None, table: torch.Tensor) -> None:
        ctx.save_for_backward(gh, gt)
        ctx.table_dtype = table.dtype

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        gh, gt = ctx.saved_tensors
        if gh is not None:
            gh = gh * grad_out.to(gh.dtype)
        if gt is not None:
            gt = (gt * grad_out).to(ctx.table_dtype)
        return gh, gt, None, None, None, None


class _ChunkedFullCE(_GradsInForward):
    """Sum over rows of CE(h_i @ table^T / tau, y_i), one chunk of rows at a time, with the
    gradients computed in the same pass (`grads`): each chunk's logits are made once and serve the
    loss, d/dh and d/dtable (softmax - one-hot, in place), so nothing is recomputed and backward only
    scales the stored gradients by the incoming one. Memory: O(chunk x N) for the chunk, plus the
    gradients themselves ([P, D] and [N + 1, D]), whatever the number of positions. Measured on an
    ML-1M batch (128 x 200 targets, 3,707 items, fwd + bwd, one thread, the versions interleaved in
    one process): 3.4 s with a backward that recomputed the logits, 1.7 s fused."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, table: torch.Tensor, y: torch.Tensor, tau: float, chunk: int, grads: bool):
        acc = torch.promote_types(h.dtype, torch.float32)  # logits in float32 at least
        total = torch.zeros((), dtype=acc, device=h.device)
        gh = torch.empty_like(h) if grads and ctx.needs_input_grad[0] else None
        gt = torch.zeros(table.shape, dtype=acc, device=table.device) if grads and ctx.needs_input_grad[1] else None
        rows = torch.arange(min(chunk, h.shape[0]), device=h.device)
        for lo in range(0, h.shape[0], chunk):
            hc, yc = h[lo:lo + chunk], y[lo:lo + chunk]
            logits = _chunk_logits(hc, table, tau, acc)  # [c, N + 1]
            lse = torch.logsumexp(logits, -1)
            total += (lse - logits.gather(1, yc[:, None])[:, 0]).sum()
            if gh is None and gt is None:
                continue
            # d CE / d logits = softmax - one-hot, in place: each pass over the chunk is memory-bound
            p = logits.sub_(lse[:, None]).exp_()
            p[rows[: p.shape[0]], yc] -= 1.0
            if tau != 1.0:
                p.mul_(1.0 / tau)
            p = p.to(h.dtype)
            if gh is not None:
                gh[lo:lo + chunk] = p @ table
            if gt is not None:
                gt += (p.t() @ hc).to(gt.dtype)
        _GradsInForward._keep(ctx, gh, gt, table)
        return total



class _SharedNegativesCE(_GradsInForward):
    """Sum over rows of CE([h_i . t_{y_i}, h_i . t_u for u in negatives] / tau, 0), an accidental hit
    (u = y_i) masked, with the gradients computed in the forward pass like _ChunkedFullCE: the
    [P, U] negative logits become their softmax in place, one matmul each gives d/dh and
    d/dtable[negatives], and nothing is concatenated. Measured on an ML-1M batch (128 x 200
    targets, 1,024 negatives, fwd + bwd, one thread, interleaved in one process): 1.4 s through
    autograd (cat + cross_entropy), 0.67 s fused."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, table: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, tau: float,
                grads: bool):
        acc = torch.promote_types(h.dtype, torch.float32)  # logits in float32 at least
        t_pos, t_neg = table[pos], table[neg]  # [P, D], [U, D]
        pos_logit = (h * t_pos).sum(-1).to(acc)  # [P]
        logits = (h @ t_neg.t()).to(acc)  # [P, U]
        logits.masked_fill_(neg[None, :] == pos[:, None], float("-inf"))  # accidental hits
        if tau != 1.0:
            logits.div_(tau)
            pos_logit = pos_logit / tau
        lse = torch.logaddexp(pos_logit, torch.logsumexp(logits, -1))  # [P]
        total = (lse - pos_logit).sum()
        if not (grads and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])):
            _GradsInForward._keep(ctx, None, None, table)
            return total
        # d/d logits: softmax over [target | negatives], minus one at the target; masked hits get 0
        p = logits.sub_(lse[:, None]).exp_().mul_(1.0 / tau).to(h.dtype)  # [P, U]
        d_pos = ((pos_logit - lse).exp() - 1.0).mul_(1.0 / tau).to(h.dtype)  # [P]
        gh = torch.addmm(t_pos * d_pos[:, None], p, t_neg) if ctx.needs_input_grad[0] else None
        gt = None
        if ctx.needs_input_grad[1]:
            gt = torch.zeros(table.shape, dtype=acc, device=table.device)
            gt.index_add_(0, neg, (p.t() @ h).to(acc))
            gt.index_add_(0, pos, (h * d_pos[:, None]).to(acc))
        _GradsInForward._keep(ctx, gh, gt, table)
        return total



def _own_negatives_ce(h: torch.Tensor, table: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                      temperature: float, acc: torch.dtype) -> torch.Tensor:
    """Summed CE of c targets against their own negatives: h [c, D], pos [c], neg [c, U]."""
    pos_logit = (h * table[pos]).sum(-1, keepdim=True).to(acc)  # [c, 1]
    neg_logits = torch.einsum("cd,cud->cu", h, table[neg]).to(acc)  # [c, U]
    neg_logits = neg_logits.masked_fill(neg == pos[:, None], float("-inf"))  # accidental hits
    logits = torch.cat([pos_logit, neg_logits], 1) / temperature
    return F.cross_entropy(logits, torch.zeros_like(pos), reduction="sum")


def full_softmax_loss(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 1.0, chunk: int = FULL_CHUNK) -> torch.Tensor:
    """hidden [B, T, D], table [N + 1, D] (row 0 = pad), targets [B, T] (0 = ignore) -> mean CE."""
    sel = targets != 0
    h = hidden[sel]  # [P, D]: only positions with a target are scored
    if h.shape[0] == 0:
        return hidden.sum() * 0.0
    return _ChunkedFullCE.apply(h, table, targets[sel], float(temperature), int(chunk),
                                _wants_grads(h, table)) / h.shape[0]


def sampled_softmax_loss(
    hidden: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    num_negatives: int,
    temperature: float = 1.0,
    in_batch: bool = False,
    generator: torch.Generator | None = None,
    per_position: bool = False,
) -> torch.Tensor:
    """Sampled softmax over the target and shared negatives (see the module docstring).

    hidden [B, T, D], table [N + 1, D], targets [B, T] (0 = ignore) -> mean CE over targets.
    """
    sel = targets != 0
    h, pos = hidden[sel], targets[sel]  # [P, D], [P]
    if h.shape[0] == 0:
        return hidden.sum() * 0.0
    N, acc = table.shape[0] - 1, torch.promote_types(h.dtype, torch.float32)  # logits in float32 at least
    if per_position:
        neg = torch.randint(1, N + 1, (h.shape[0], num_negatives), device=pos.device, generator=generator)
        total = h.new_zeros((), dtype=acc)
        for lo in range(0, h.shape[0], SAMPLED_CHUNK):
            sl = slice(lo, lo + SAMPLED_CHUNK)
            total = total + checkpoint(_own_negatives_ce, h[sl], table, pos[sl], neg[sl], temperature, acc,
                                       use_reentrant=False)
        return total / h.shape[0]
    uniform = torch.randint(1, N + 1, (num_negatives,), device=pos.device, generator=generator)  # [U]
    if in_batch:
        # candidates = unique(targets ∪ draws), so every target is a candidate and no hit masking
        # is needed. An item with c in-batch occurrences is expected c + U/N times among the draws.
        cand, inverse = torch.unique(torch.cat([pos, uniform]), return_inverse=True)  # cand: [C]
        in_batch_count = torch.bincount(inverse[: pos.shape[0]], minlength=cand.shape[0]).float()  # [C]
        logits = (h @ table[cand].t()).to(acc) / temperature - (in_batch_count + num_negatives / N).log()
        return F.cross_entropy(logits, inverse[: pos.shape[0]])
    return _SharedNegativesCE.apply(h, table, pos, uniform, float(temperature),
                                    _wants_grads(h, table)) / h.shape[0]
