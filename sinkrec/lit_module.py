"""A thin LightningModule over the plain model (`sinkrec.model`, which never imports Lightning).

train/val/test share `_shared_step`; ranking metrics come from `sinkrec.metrics` (exact, summed
across ranks); the optimizer is AdamW with linear warm-up and cosine decay (per optimizer step).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from sinkrec.metrics import RankingAccumulator, target_ranks, top_k
from sinkrec.model import SinkRecConfig, build_model
from sinkrec.modules.packed import packed_index, unpack_left
from sinkrec.windows import defer_codebook_updates, flush_codebook_updates, windowed_forward, windowed_loss


def ranking_names(stage: str) -> tuple[str, str]:
    """The two ranking conventions logged for an evaluation stage: history items kept as candidates,
    and removed. The published ML-1M anchors all remove them: SASRec+ and eSASRec by their papers,
    HSTU in code (generative-recommenders' train.py calls eval_metrics_v2_from_tensors with its
    default filter_invalid_ids=True, which masks past_ids out of the top-k)."""
    return stage, f"{stage}_seen_excluded"


SCORED_STAGES = (*ranking_names("val"), *ranking_names("test"))


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (after warm-up)
    weight_decay: float = 0.01  # AdamW decay on matrices; biases, norms and 1-D params get none
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 100  # linear warm-up from 0 to lr, in optimizer steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10, 50, 200])  # cut-offs of HR@k and NDCG@k
    exclude_history: bool = False  # predict: drop the user's history from the top-k (val/test log both ways)
    chunk_size: int = 8192  # items scored per matmul in full ranking
    diagnostics: bool = True  # sink diagnostics on the first validation batch (rank 0)
    diag_min_repeats: int = 3  # an item is "repeated" when it occurs >= this often (SINKREC.md §7)
    diag_users: int = 64  # users of that batch the diagnostics read (they run an SVD per user and head)
    predict_k: int = 100  # items written per user by `predict`


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases / norm gains / other 1-D params do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=o.lr, betas=tuple(o.betas), eps=o.eps)


class SeqRecModule(pl.LightningModule):
    """Trains and evaluates one `sinkrec.model` (SinkRec | GDN | SASRec, per `config.arch`).

    Args:
        config: the model config; `num_items` and `max_len` are linked from the data module.
        optim: AdamW + warm-up/cosine schedule.
        evaluation: full-ranking metric settings.
        window: recurrent archs only: batches longer than this many events run window by window with
            the state carried (sinkrec/windows.py): memory bounded by batch x window, exact forward,
            gradients truncated at window borders. None = one pass (the memory grows with the batch's
            longest history). Pair it with `data.max_len: null` to train on whole histories.
    """

    def __init__(self, config: SinkRecConfig, optim: OptimConfig | None = None,
                 evaluation: EvalConfig | None = None, window: int | None = None) -> None:
        super().__init__()
        # checkpoints store plain dicts (they must load with torch.load(weights_only=True));
        # load_from_checkpoint hands those dicts back here
        config = SinkRecConfig(**config) if isinstance(config, dict) else config
        optim = OptimConfig(**optim) if isinstance(optim, dict) else optim
        evaluation = EvalConfig(**evaluation) if isinstance(evaluation, dict) else evaluation
        self.config, self.optim = config, optim or OptimConfig()
        self.evaluation = evaluation or EvalConfig()
        if window is not None and (window < 1 or config.arch == "sasrec"):
            raise ValueError(f"model.window={window}: must be >= 1, and only the recurrent archs (sinkrec, "
                             f"gdn, elastic) carry a state between windows; arch={config.arch!r} attends "
                             "over data.max_len events (use model.window: null)")
        self.window = window
        self.save_hyperparameters({"config": dataclasses.asdict(config), "optim": dataclasses.asdict(self.optim),
                                   "evaluation": dataclasses.asdict(self.evaluation), "window": window},
                                  logger=False)
        self.model = build_model(config)
        if window is not None:  # codebooks fixed between a window's forward and its recompute
            defer_codebook_updates(self.model)
        # "{stage}" keeps history items as candidates; "{stage}_seen_excluded" removes them (HSTU, SASRec+,
        # eSASRec: ranking_names). Both come from the same forward pass, so they compare like for like.
        # torchmetrics states, moved with the module and summed across ranks in compute()
        self.acc = nn.ModuleDict({s: RankingAccumulator(self.evaluation.ks) for s in SCORED_STAGES})
        self.final_metrics: dict[str, dict[str, float]] = {}  # exact float64 values of the last epoch

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if getattr(dm, "pack", False) and (self.config.arch not in ("sinkrec", "gdn") or self.window is not None):
            raise ValueError(f"data.pack: true packs sequences with cu_seqlens, which arch sinkrec and gdn read "
                             f"in one pass; got model.config.arch={self.config.arch!r}, model.window="
                             f"{self.window} (use data.pack: false, or arch sinkrec/gdn with model.window: null)")

    def forward(self, items: torch.Tensor, ts: torch.Tensor):
        return self._encode(items, ts)

    def _encode(self, items: torch.Tensor, ts: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
        """One pass (packed with `cu_seqlens` when the batch is, data.pack), or window by window."""
        if self.window is None:
            return self.model(items, ts, cu_seqlens=cu_seqlens)
        return windowed_forward(self.model, items, ts, self.window)

    # ---- steps ----
    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        if stage == "train" and self.window is not None:
            loss, parts = windowed_loss(self.model, batch["items"], batch["ts"], batch["targets"], self.window)
            out = None
        else:
            out = self._encode(batch["items"], batch["ts"], batch.get("cu_seqlens"))
            loss, parts = self.model.loss(out, batch["targets"])
        B = batch["user_idx"].shape[0]  # users (a packed batch is one row of B sequences)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=B,
                 sync_dist=not on_step)
        for name, value in parts.items():
            self.log(f"{stage}/{name}", value, on_step=on_step, on_epoch=True, batch_size=B,
                     sync_dist=not on_step)
        if stage != "train":
            self._rank(out.hidden, batch, stage)
        return loss

    def _rank(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor], stage: str) -> None:
        targets = batch["targets"]
        rows, pos = (targets > 0).nonzero(as_tuple=True)  # one entry per target
        T = targets.shape[1]
        seen = torch.arange(T, device=targets.device)[None, :] <= pos[:, None]  # history up to the query
        if "cu_seqlens" in batch:  # packed (one row): the history is the query's own sequence only
            seq, _ = packed_index(batch["cu_seqlens"], T)
            seen &= seq[None, :] == seq[pos][:, None]
        kinds = batch["target_kind"][rows, pos]
        kinds = kinds if (kinds >= 0).any() else None
        table = self.model.item_embeddings().detach()
        queries, ids = hidden[rows, pos], targets[rows, pos]
        kept, removed = ranking_names(stage)
        for name, exclude in ((kept, None), (removed, batch["items"][rows] * seen)):
            ranks = target_ranks(queries, table, ids, exclude, self.evaluation.chunk_size)
            self.acc[name].update(ranks, kinds)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")
        if batch_idx == 0 and self.evaluation.diagnostics and self.trainer.is_global_zero:
            self._log_diagnostics(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        hidden = self._encode(batch["items"], batch["ts"]).hidden[:, -1]  # [B, D], most recent event
        exclude = batch["items"] if self.evaluation.exclude_history else None
        scores, items = top_k(hidden, self.model.item_embeddings(), self.evaluation.predict_k, exclude,
                              self.evaluation.chunk_size)
        return {"user_idx": batch["user_idx"], "real_row": batch["real_row"], "items": items, "scores": scores}

    # ---- epoch ends: exact metrics from summed counts ----
    def _log_ranking(self, stage: str) -> None:
        for name in ranking_names(stage):
            metrics = self.acc[name].compute()
            self.acc[name].reset()
            self.final_metrics[name] = {f"{name}/{k}": v for k, v in metrics.items()}
            # already global: identical on every rank, so no further sync (EarlyStopping reads it everywhere)
            for k, v in metrics.items():
                self.log(f"{name}/{k}", v, prog_bar=name == stage and k in ("ndcg_10", "hr_10"), sync_dist=False)

    def _reset(self, stage: str) -> None:
        for name in ranking_names(stage):
            self.acc[name].reset()

    def on_validation_epoch_start(self) -> None:
        self._reset("val")

    def on_test_epoch_start(self) -> None:
        self._reset("test")

    def on_validation_epoch_end(self) -> None:
        self._log_ranking("val")

    def on_test_epoch_end(self) -> None:
        self._log_ranking("test")

    @torch.no_grad()
    def _log_diagnostics(self, batch: dict[str, torch.Tensor]) -> None:
        from sinkrec.diagnostics import sink_diagnostics  # lazy: only this epoch hook needs it

        keep = batch["real_row"].nonzero(as_tuple=True)[0][: self.evaluation.diag_users]
        if len(keep) == 0:  # a rank-balancing empty batch
            return
        if "cu_seqlens" in batch:  # the diagnostics read [B, T] rows
            batch = {k: unpack_left(batch[k], batch["cu_seqlens"], keep) for k in ("items", "ts")}
            keep = torch.arange(len(keep))
        # returns {} for models without a recurrent state (SASRec); keys look like "sink/excess_occupancy"
        diag = sink_diagnostics(self.model, batch["items"][keep], batch["ts"][keep],
                                min_repeats=self.evaluation.diag_min_repeats)
        self.log_dict({f"val/{k}": float(v) for k, v in diag.items()}, rank_zero_only=True,
                      on_step=False, on_epoch=True, batch_size=len(keep))

    def on_after_backward(self) -> None:
        if self.window is not None:
            flush_codebook_updates(self.model)

    # ---- optimisation ----
    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        opt = build_optimizer(self.model, o)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup, ratio = o.warmup_steps, o.min_lr_ratio

        def schedule(step: int) -> float:  # a plain function: LambdaLR does not pickle it into checkpoints
            return warmup_cosine(step, warmup, total, ratio)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
