"""Conditional memory: residual vector quantisation of local behaviour patterns.

Per position t (SINKREC.md section 1):
    z_t  = RMSNorm(causal_depthwise_conv_4(h)_t)           local n-gram pattern
    c^l  = argmin_k ||r^{l-1} - B^l_k||,  r^0 = z,  r^l = r^{l-1} - B^l[c^l]
    m_t  = sum_l M^l[c^l_t]                                  learned memory value
    h_t <- h_t + g_t * W_r m_t,  g_t = sigmoid(<RMSNorm(h_t), RMSNorm(W_g m_t)> / sqrt(d))

Codebooks `B` are buffers updated by EMA (k-means in expectation) only in training
mode; the task loss trains the memory tables `M` through the rows the codes pick. The
pattern conv learns to stay near its codes through the commitment loss ||z - sg(B[c])||^2
(mean over D and over real positions); that loss does not reach the hidden state h.
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sinkrec.modules.conv import ShortConv
from sinkrec.modules.norms import RMSNorm

_RECOMPUTE = threading.local()


@contextlib.contextmanager
def recomputing():
    """Marks activation-checkpoint recomputation (torch.utils.checkpoint's context_fn): a forward
    that runs a second time must not collect its patterns a second time."""
    _RECOMPUTE.depth = getattr(_RECOMPUTE, "depth", 0) + 1
    try:
        yield
    finally:
        _RECOMPUTE.depth -= 1


def _recomputing() -> bool:
    return getattr(_RECOMPUTE, "depth", 0) > 0


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def nearest_code(r: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """r [N, D], book [C, D] -> [N] index of the nearest code. ||r - b||^2 = ||r||^2 - 2 r.b + ||b||^2,
    with ||r||^2 dropped (constant per row): one addmm, so the [N, C] scores take one pass."""
    return torch.addmm(book.pow(2).sum(-1)[None], r, book.t(), alpha=-2).argmin(-1)


def rvq_encode(z: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Greedy residual quantisation (no grad).

    z: [N, D], codebooks: [L, C, D] -> codes [N, L], quantised sum [N, D], and the
    residual each level quantised (r^0 .. r^{L-1}, each [N, D]) for the EMA update.
    """
    r = z.float()
    codes, residuals = [], []
    quant = torch.zeros_like(r)
    for book in codebooks.float():  # book: [C, D]
        c = nearest_code(r, book)
        residuals.append(r)
        codes.append(c)
        quant = quant + book[c]
        r = r - book[c]
    return torch.stack(codes, -1), quant, residuals


class RVQMemory(nn.Module):
    """Local-pattern RVQ + learnable memory tables + gated reinjection.

    forward(h [B, T, D], mask [B, T] bool) -> (h' [B, T, D], m [B, T, D], commit scalar, codes [B, T, L])
    """

    def __init__(
        self,
        d_model: int,
        n_levels: int = 2,
        n_codes: int = 256,
        window: int = 4,
        ema_decay: float = 0.99,
        restart_threshold: float = 0.03,
        conv_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model, self.n_levels, self.n_codes = d_model, n_levels, n_codes
        self.ema_decay = ema_decay
        # a code is dead when its EMA usage falls below this fraction of the mean usage;
        # relative, so it works for any batch size and any number of codes
        self.restart_threshold = restart_threshold
        self.pattern_conv = ShortConv(d_model, window, backend=conv_backend)
        # fixed-scale norm (no learnable gain): z lives on the sphere of radius sqrt(D), so
        # the commitment loss cannot shrink z toward the origin to cheat the codebook
        self.pattern_eps = 1e-6
        # codebooks and their EMA statistics are buffers: never seen by the optimizer
        self.register_buffer("codebooks", torch.randn(n_levels, n_codes, d_model))
        self.register_buffer("ema_count", torch.ones(n_levels, n_codes))
        self.register_buffer("ema_sum", self.codebooks.clone())
        self.register_buffer("initted", torch.zeros((), dtype=torch.bool))
        # learned memory values, trained by the task loss through the selected rows
        self.tables = nn.Parameter(torch.randn(n_levels, n_codes, d_model) * d_model ** -0.5)
        self.w_r = nn.Linear(d_model, d_model, bias=False)
        self.w_g = nn.Linear(d_model, d_model, bias=False)
        self.norm_h = RMSNorm(d_model)
        self.norm_m = RMSNorm(d_model)
        self._deferred: list[torch.Tensor] | None = None  # patterns awaiting the codebook update

    # ---- pattern, quantisation, memory value ----
    def pattern(self, conv_out: torch.Tensor) -> torch.Tensor:
        x = conv_out.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.pattern_eps)).to(conv_out.dtype)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., L] -> m [..., D] = sum_l M^l[c^l]; gradients reach `tables`."""
        L = self.n_levels
        flat = codes + torch.arange(L, device=codes.device) * self.n_codes  # index into [L * C, D]
        return F.embedding(flat, self.tables.reshape(L * self.n_codes, self.d_model)).sum(-2)

    def reinject(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid((self.norm_h(h) * self.norm_m(self.w_g(m))).sum(-1, keepdim=True) / math.sqrt(self.d_model))
        return h + gate * self.w_r(m)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, buf: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """h [B, T, D], mask [B, T], buf = the pattern conv's buffer from a previous window (or None)
        -> (h', m, commit, codes, the buffer after this window | None). `cu_seqlens` [S + 1]: h is
        [1, T, D] packed sequences and each pattern window stops at its sequence's start."""
        B, T = h.shape[:2]
        # h is detached: the commitment loss trains the pattern conv only. With its gradient
        # reaching h it pulled the whole backbone onto a few codes (level-0 utilisation fell to
        # 25% within 40 steps on habit+drift data, and the CE was worse); see docs/MODEL.md.
        conv, buf = self.pattern_conv(h.detach(), buf, cu_seqlens)
        z = self.pattern(conv)  # [B, T, D]
        z_valid = z[mask]  # [N, D], pads excluded from codes statistics and the loss
        encoded = None  # (codes, quant) of z_valid under the current codebooks
        if self.training:
            if self._deferred is None:
                encoded = self._ema_update(z_valid.detach())  # encodes under the updated books on the way
            elif not _recomputing():
                self._deferred.append(z_valid.detach())
        if encoded is None:
            with torch.no_grad():
                encoded = rvq_encode(z_valid.detach(), self.codebooks)[:2]
        codes_valid, quant = encoded
        commit = F.mse_loss(z_valid.float(), quant) if z_valid.shape[0] else z.sum() * 0.0
        codes = torch.zeros(B, T, self.n_levels, dtype=torch.long, device=h.device)
        codes[mask] = codes_valid
        m = self.lookup(codes) * mask[..., None].to(h.dtype)  # [B, T, D], zero at pads
        return self.reinject(h, m), m, commit, codes, buf

    # ---- deferred codebook updates (window-by-window training) ----
    # Training a batch window by window recomputes each window's forward in the backward pass
    # (activation checkpointing). The codebooks must then stay fixed between a window's forward and its
    # recompute, so in that mode every memory collects the step's patterns and updates its codebooks
    # once, after the backward (`flush_codebook_updates`): one EMA step per block and optimizer step,
    # from all of the step's patterns, on every rank alike (the all-reduce count does not depend on
    # how many windows a rank's batch had).
    def defer_updates(self) -> None:
        self._deferred = []

    def flush_updates(self) -> None:
        if self._deferred is None:
            return
        z = torch.cat(self._deferred) if self._deferred else self.codebooks.new_zeros(0, self.d_model)
        self._deferred = []
        self._ema_update(z)

    # ---- streaming ----
    def init_buffer(self, B: int, device=None, dtype=None) -> torch.Tensor:
        return self.pattern_conv.init_buffer(B, device, dtype)

    # ---- codebook learning (EMA k-means + dead-code restart), DDP-safe ----
    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z: [N, D] valid patterns of this rank. All ranks end with identical codebooks:
        the EMA statistics are all-reduced, and every random choice is made on rank 0
        and broadcast. Returns z's codes [N, L] and quantised sum [N, D] under the updated
        codebooks, exactly what rvq_encode(z, self.codebooks) gives afterwards: the residual walk
        below computes them anyway (level l's book is final once level l is updated)."""
        if not bool(self.initted):
            self._data_init(z)
        r = z.float()
        codes, quant = [], torch.zeros_like(r)
        decay = self.ema_decay
        for level in range(self.n_levels):
            book = self.codebooks[level]  # [C, D]
            c = nearest_code(r, book)  # [N]
            count = torch.bincount(c, minlength=self.n_codes).float()  # [C]
            total = torch.zeros_like(book).index_add_(0, c, r)  # [C, D]
            if _dist_ready():
                dist.all_reduce(count)
                dist.all_reduce(total)
            self.ema_count[level].mul_(decay).add_(count, alpha=1 - decay)
            self.ema_sum[level].mul_(decay).add_(total, alpha=1 - decay)
            # Laplace smoothing keeps never-used codes from dividing by zero
            n = self.ema_count[level].sum()
            eps = 1e-5
            smoothed = (self.ema_count[level] + eps) / (n + self.n_codes * eps) * n
            self.codebooks[level].copy_(self.ema_sum[level] / smoothed[:, None])
            self._restart_dead(level, r)
            book = self.codebooks[level]
            codes.append(nearest_code(r, book))
            quant = quant + book[codes[-1]]
            r = r - book[codes[-1]]
        return torch.stack(codes, -1), quant

    def _restart_dead(self, level: int, r: torch.Tensor) -> None:
        count = self.ema_count[level]
        dead = count < self.restart_threshold * count.mean()  # identical on all ranks (all-reduced)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        # restart dead codes at random current residuals: they then sit where data is.
        # A rank with no valid positions still joins the broadcast (rank 0 decides).
        if r.shape[0]:
            idx = torch.randint(0, r.shape[0], (n_dead,), device=r.device)
            new = r[idx] + 1e-3 * torch.randn_like(r[idx])
        else:
            new = torch.zeros(n_dead, r.shape[1], device=r.device)
        if _dist_ready():
            dist.broadcast(new, src=0)
        self.codebooks[level][dead] = new
        self.ema_count[level][dead] = count.mean()
        self.ema_sum[level][dead] = new * count.mean()

    def _data_init(self, z: torch.Tensor) -> None:
        """First training batch: seed every level's codebook with random residuals."""
        if z.shape[0] == 0:
            return
        r = z.float()
        for level in range(self.n_levels):
            idx = torch.randint(0, r.shape[0], (self.n_codes,), device=r.device)
            book = r[idx] + 1e-3 * torch.randn_like(r[idx])
            if _dist_ready():
                dist.broadcast(book, src=0)
            self.codebooks[level].copy_(book)
            self.ema_sum[level].copy_(book)
            self.ema_count[level].fill_(1.0)
            r = r - book[nearest_code(r, book)]
        self.initted.fill_(True)
