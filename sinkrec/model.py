"""Sequential recommenders: SinkRec (memory-conditioned Gated DeltaNet), GDN, SASRec and ELASTIC.

Reads top to bottom (the config is sinkrec/config.py): shared base (tied item table, time features, loss)
-> SinkRec / GDN (looped TDGD blocks) -> SASRec (causal softmax attention)
-> ELASTIC (dispatcher attention + product-key memory) -> build_model.
Batches are LEFT-padded (item 0 = pad at the front, most recent event at index -1); see
docs/CONTRACTS.md section 2. SinkRec / GDN also take packed batches (B = 1, `cu_seqlens`, fla's
convention; sinkrec/modules/packed.py). No Lightning here: `sinkrec.lit_module` wraps these modules.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sinkrec.config import ARCHS, SinkRecConfig
from sinkrec.layers import ElasticBlock, SinkRecBlock
from sinkrec.layers.tdgd import recurring_items
from sinkrec.losses import full_softmax_loss, sampled_softmax_loss
from sinkrec.modules import RMSNorm, SwiGLU, l2norm
from sinkrec.modules.packed import check_packed, packed_index

__all__ = ["ARCHS", "ModelOutput", "SeqRecModel", "SinkRecConfig", "build_model"]


@dataclass
class ModelOutput:
    hidden: torch.Tensor  # [B, T, D], final-normed; zero at pad positions
    aux_loss: torch.Tensor  # scalar, already weighted (commit_weight * commitment); 0 without memory
    states: list[dict] | None = None  # per (loop, block) pass: {"S", "k", "v", "o", "codes"} if requested
    cache: dict | None = None  # the recurrent state after the last position, when a cache was passed in


def time_features(ts: torch.Tensor, mask: torch.Tensor, time_scale: float,
                  prev: tuple[torch.Tensor, torch.Tensor] | None = None,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """phi_t = log1p(dt_t / time_scale), dt_t = max(ts_t - ts_{t-1}, 0); 0 at the first real event
    and at pads. ts, mask [B, T] -> phi [B, T] float32. `prev` = (ts_prev [B], has_prev [B] bool): the
    last real event before this window (a carried cache), so position 0 gets its gap too.
    `cu_seqlens` [S + 1]: ts is [1, T] packed sequences and phi is 0 at each sequence's first event."""
    if prev is not None and cu_seqlens is not None:
        raise ValueError("time_features: prev (a carried cache) and cu_seqlens are not supported together")
    if prev is not None:
        ts_prev, has_prev = prev
        ts, mask = torch.cat([ts_prev[:, None], ts], 1), torch.cat([has_prev[:, None], mask], 1)
    dt = (ts[:, 1:] - ts[:, :-1]).clamp_min(0).float()  # [B, T - 1]
    prev_real = mask[:, 1:] & mask[:, :-1]  # the previous position must be a real event
    if cu_seqlens is not None:  # ... of the same sequence
        prev_real = prev_real & (packed_index(cu_seqlens, ts.shape[1])[1][1:] > 0)
    dt = dt * prev_real
    if prev is None:
        dt = F.pad(dt, (1, 0))  # [B, T]
    return torch.log1p(dt / time_scale)


def last_real(ts: torch.Tensor, mask: torch.Tensor, ts_prev: torch.Tensor, has_prev: torch.Tensor,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ts_prev, has_prev) after a window: the timestamp of each row's last real event, if any."""
    T = ts.shape[1]
    idx = torch.where(mask, torch.arange(T, device=ts.device), -1).amax(1)  # [B], -1 = none
    seen = idx >= 0
    return torch.where(seen, ts.gather(1, idx.clamp_min(0)[:, None])[:, 0], ts_prev), has_prev | seen


class SeqRecModel(nn.Module):
    """What every arch shares: the tied item table, scores and the loss."""

    def __init__(self, cfg: SinkRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.d_model, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=cfg.init_std)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.input_norm = RMSNorm(cfg.d_model)  # a zero (pad) vector stays zero

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Input embeddings [..., D] -> unit-RMS inputs. The tied table is initialised small
        (init_std) because it is also the output head; without this norm the model's first inputs
        are ~50x smaller than what its layers add to the residual stream, and training starts far
        slower (measured on ML-1M: val NDCG@10 .021 vs .005 after 3 epochs, SASRec)."""
        return self.input_norm(x) if self.cfg.input_norm else x

    def item_embeddings(self) -> torch.Tensor:
        """Tied table [N + 1, D] that queries are scored against (unit rows with `l2_norm`);
        row 0 is padding and never a valid prediction."""
        return self.head_norm(self.item_emb.weight)

    def head_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The scoring space: with `l2_norm`, scores are cosines (both sides unit-norm)."""
        return l2norm(x) if self.cfg.l2_norm else x

    def loss(self, out: ModelOutput, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """targets [B, T] (0 = ignore) -> (CE + aux_loss, {"ce", "aux"})."""
        table, c = self.item_embeddings(), self.cfg
        if c.loss == "full":
            ce = full_softmax_loss(out.hidden, table, targets, c.temperature)
        else:
            ce = sampled_softmax_loss(out.hidden, table, targets, c.num_negatives, c.temperature,
                                      in_batch=c.in_batch_negatives, per_position=c.per_position_negatives)
        return ce + out.aux_loss, {"ce": ce.detach(), "aux": out.aux_loss.detach()}


class SinkRec(SeqRecModel):
    """Tied item embeddings -> n_loops x (n_blocks shared-weight blocks) -> final RMSNorm."""

    def __init__(self, cfg: SinkRecConfig) -> None:
        super().__init__(cfg)
        self.blocks = nn.ModuleList(SinkRecBlock(cfg) for _ in range(cfg.n_blocks))
        # tells the shared blocks which pass they are in
        self.loop_emb = nn.Embedding(cfg.n_loops, cfg.d_model)
        nn.init.normal_(self.loop_emb.weight, std=cfg.init_std)
        self.norm_f = RMSNorm(cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)

    def forward(self, items: torch.Tensor, ts: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                return_states: bool = False, cache: dict | None = None) -> ModelOutput:
        """items, ts [B, T] (left-padded) -> ModelOutput(hidden [B, T, D], aux_loss, states, cache).

        `cu_seqlens` int [S + 1] (fla's convention): items, ts are [1, N] packed sequences instead,
        sequence s at positions cu_seqlens[s]:cu_seqlens[s + 1], no pad items; hidden is [1, N, D] and
        position for position equals running each sequence on its own (tests/model/test_packed.py).
        The losses are then means over all the batch's positions, as for a padded batch.

        `cache` (init_state, or the `cache` of the previous call) continues the same B sequences from
        where the previous window ended, and the output then carries the cache after this window: a
        sequence cut into windows and run window by window gives the hidden states of one pass over
        the whole sequence (tests/model/test_windows.py); T = 1 is the O(1)-per-event streaming step.
        Not together with `cu_seqlens`."""
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("SinkRec.forward: cache= (window-by-window / streaming) and cu_seqlens= "
                                 "(packed sequences) are not supported together; run packed batches in one pass")
            check_packed(items, ts, cu_seqlens, "SinkRec.forward")
        mask = items != 0  # [B, T]
        keep = mask[..., None].to(self.item_emb.weight.dtype)  # [B, T, 1]
        prev = None if cache is None else (cache["ts_prev"], cache["has_prev"])
        phi = time_features(ts, mask, self.cfg.time_scale, prev, cu_seqlens)
        h = self.emb_dropout(self.embed(self.item_emb(items)))
        commit, coverage, states = h.new_zeros(()), h.new_zeros(()), [] if return_states else None
        # the item already occurred earlier in its sequence: rho's repeat term (repeat_gate) and the
        # coverage target "items"
        cfg, item_recurs = self.cfg, None
        if cfg.repeat_gate or (self.training and cfg.coverage_weight > 0 and cfg.coverage_target == "items"):
            if cache is not None and cfg.repeat_gate:
                raise ValueError("SinkRec.forward: repeat_gate=True needs whole sequences (it marks items seen "
                                 "earlier in the sequence); windows and streaming (cache=) are not supported")
            item_recurs = recurring_items(items, mask, cfg.num_items, cu_seqlens)
        passes = [] if cache is not None else None
        i = 0
        for loop in range(self.cfg.n_loops):
            h = h + self.loop_emb.weight[loop]
            for block in self.blocks:
                # zero pads so the convolutions of the first real events see zeros, whatever
                # the amount of left padding
                h, c, cov, record, new = block(h * keep, phi, mask, return_states,
                                               None if cache is None else cache["passes"][i], cu_seqlens,
                                               item_recurs if cfg.coverage_target == "items" else None,
                                               item_recurs if cfg.repeat_gate else None)
                commit, coverage, i = commit + c, coverage + cov, i + 1
                if return_states:
                    states.append(record)
                if cache is not None:
                    passes.append(new)
        hidden = self.head_norm(self.norm_f(h)) * keep
        n_passes = self.cfg.n_loops * self.cfg.n_blocks
        aux = self.cfg.commit_weight * commit / n_passes if self.cfg.memory else commit
        if self.cfg.coverage_weight > 0 and self.cfg.memory:
            aux = aux + self.cfg.coverage_weight * coverage / n_passes
        new_cache = None
        if cache is not None:
            ts_prev, has_prev = last_real(ts, mask, cache["ts_prev"], cache["has_prev"])
            new_cache = {"ts_prev": ts_prev, "has_prev": has_prev, "passes": passes}
        return ModelOutput(hidden, aux, states, new_cache)

    # ---- windows and streaming inference, O(1) per event ----
    def init_state(self, B: int, device=None) -> dict:
        """The cache of B sequences that have not started (what `forward(cache=...)` continues)."""
        device = device or self.item_emb.weight.device
        dtype = self.item_emb.weight.dtype
        return {
            "ts_prev": torch.zeros(B, dtype=torch.long, device=device),
            "has_prev": torch.zeros(B, dtype=torch.bool, device=device),
            # one cache per (loop, block) pass: shared weights, different inputs
            "passes": [blk.init_cache(B, device, dtype) for _ in range(self.cfg.n_loops) for blk in self.blocks],
        }

    @torch.no_grad()
    def step(self, state: dict, item: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """item, ts [B] -> (hidden [B, D], new state); equals forward(items, ts).hidden[:, t].
        A pad item (0) leaves the state unchanged apart from the conv buffers, which take a zero,
        exactly as the full forward sees it. The same code path as `forward`, one event long."""
        out = self(item[:, None], ts[:, None], cache=state)
        return out.hidden[:, 0], out.cache


class CausalSelfAttention(nn.Module):
    """Pre-norm multi-head causal attention through `scaled_dot_product_attention`."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.norm = RMSNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, h: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h [B, T, D]; attn_mask [B, 1, T, T] bool (True = attend), or None for plain causal
        attention without padding (lets SDPA pick its fused causal kernel)."""
        B, T, D = h.shape
        q, k, v = self.qkv(self.norm(h)).split(D, dim=-1)
        # [B, T, D] -> [B, H, T, D / H]
        q, k, v = (x.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for x in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))  # [B, H, T, D / H] -> [B, T, D]


class SASRecBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ffn = SwiGLU(d_model, dropout=dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        h = h + self.dropout(self.attn(h, attn_mask))
        return h + self.ffn(h)


class SASRec(SeqRecModel):
    """SASRec (Kang & McAuley 2018) with this project's embedding, head and loss.

    Learned positions are aligned to the END of the sequence: the most recent event always has
    position max_len - 1, so extra left padding does not move any real event's position.
    """

    def __init__(self, cfg: SinkRecConfig) -> None:
        super().__init__(cfg)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        nn.init.normal_(self.pos_emb.weight, std=cfg.init_std)
        self.blocks = nn.ModuleList(SASRecBlock(cfg.d_model, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_blocks))
        self.norm_f = RMSNorm(cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)

    def forward(self, items: torch.Tensor, ts: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                return_states: bool = False) -> ModelOutput:
        if cu_seqlens is not None:
            raise ValueError("SASRec.forward: packed batches (cu_seqlens) are for the recurrent archs sinkrec "
                             "and gdn only; give SASRec left-padded [B, T] batches")
        T = items.shape[1]
        if T > self.cfg.max_len:
            raise ValueError(f"SASRec: sequence length {T} > SinkRecConfig.max_len={self.cfg.max_len}; "
                             "raise max_len or truncate the batch")
        mask = items != 0
        keep = mask[..., None].to(self.item_emb.weight.dtype)
        pos = torch.arange(self.cfg.max_len - T, self.cfg.max_len, device=items.device)  # [T]
        h = self.emb_dropout(self.embed(self.item_emb(items) + self.pos_emb(pos))) * keep
        # causal AND key is real; the diagonal stays open so pad query rows are never all-masked
        # (an all -inf row is NaN in softmax); real rows never see pad keys
        causal = torch.ones(T, T, dtype=torch.bool, device=items.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=items.device)
        attn_mask = (causal & mask[:, None, :]) | eye  # [B, T(query), T(key)]
        attn_mask = attn_mask[:, None]  # [B, 1, T, T], broadcast over heads
        for block in self.blocks:
            h = block(h, attn_mask) * keep
        return ModelOutput(self.head_norm(self.norm_f(h)) * keep, h.new_zeros(()), None)

    # ---- streaming ----
    # End-aligned positions re-index every past event when a new one arrives, so keys/values
    # cannot be cached; the state is the window of the last max_len events and each step
    # re-encodes it: O(max_len) per event, bounded, and equal to forward on the prefix.
    def init_state(self, B: int, device=None) -> dict:
        device = device or self.item_emb.weight.device
        empty = torch.zeros(B, 0, dtype=torch.long, device=device)
        return {"items": empty, "ts": empty.clone()}

    @torch.no_grad()
    def step(self, state: dict, item: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, dict]:
        items = torch.cat([state["items"], item[:, None]], 1)[:, -self.cfg.max_len:]
        tss = torch.cat([state["ts"], ts[:, None]], 1)[:, -self.cfg.max_len:]
        return self(items, tss).hidden[:, -1], {"items": items, "ts": tss}


class Elastic(SeqRecModel):
    """ELASTIC (Deng et al. 2024, arXiv 2408.09380), causal reading: n_blocks x (linear dispatcher
    attention -> product-key interest memory -> SwiGLU). No positions: the dispatchers' prefix
    summaries need none, so the streaming state is J x (K + 2) per head and block, whatever T."""

    def __init__(self, cfg: SinkRecConfig) -> None:
        super().__init__(cfg)
        self.blocks = nn.ModuleList(ElasticBlock(cfg) for _ in range(cfg.n_blocks))
        self.norm_f = RMSNorm(cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)

    def forward(self, items: torch.Tensor, ts: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                return_states: bool = False, cache: dict | None = None) -> ModelOutput:
        """items, ts [B, T] (left-padded) -> ModelOutput(hidden [B, T, D], 0, None, cache). ts is unused.
        `cache` (init_state or a previous call's) continues the sequences, as in SinkRec.forward."""
        if cu_seqlens is not None:
            raise ValueError("Elastic.forward: packed batches (cu_seqlens) are for the recurrent archs sinkrec "
                             "and gdn only; give ELASTIC left-padded [B, T] batches")
        mask = items != 0  # [B, T]
        keep = mask[..., None].to(self.item_emb.weight.dtype)  # [B, T, 1]
        h = self.emb_dropout(self.embed(self.item_emb(items)))
        new = [] if cache is not None else None
        for i, block in enumerate(self.blocks):
            h, st = block(h, mask, None if cache is None else cache["lda"][i], return_state=cache is not None)
            if cache is not None:
                new.append(st)
        return ModelOutput(self.head_norm(self.norm_f(h)) * keep, h.new_zeros(()), None,
                           None if cache is None else {"lda": new})

    # ---- windows and streaming inference, O(1) per event ----
    def init_state(self, B: int, device=None) -> dict:
        return {"lda": [blk.lda.init_state(B, device or self.item_emb.weight.device) for blk in self.blocks]}

    @torch.no_grad()
    def step(self, state: dict, item: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """item, ts [B] -> (hidden [B, D], new state); equals forward(items, ts).hidden[:, t].
        A pad item (0) leaves the state unchanged. The same code path as `forward`, one event long."""
        out = self(item[:, None], ts[:, None], cache=state)
        return out.hidden[:, 0], out.cache


def build_model(cfg: SinkRecConfig) -> SeqRecModel:
    """cfg.arch -> model. "gdn" is SinkRec with the memory (and so every memory switch) off."""
    cfg.validate()
    if cfg.arch == "sasrec":
        return SASRec(cfg)
    if cfg.arch == "elastic":
        return Elastic(cfg)
    if cfg.arch == "gdn":
        cfg = dataclasses.replace(cfg, memory=False)
    return SinkRec(cfg)
