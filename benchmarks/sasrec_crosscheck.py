"""Bug cross-check: our SASRec vs RecBole 1.2.1's SASRec, trained side by side on the same batches.

    python -m benchmarks.sasrec_crosscheck --epochs 8            (make bench-crosscheck)
    python -m benchmarks.sasrec_crosscheck --epochs 2 --root data/processed/ml-100k --out /tmp/x

What it checks. Our SASRec (`sinkrec.model.SASRec`: pre-norm RMSNorm blocks, SwiGLU FFN, SDPA
attention, END-aligned learned positions, left-padded batches) and an independent public
implementation (RecBole's SASRec: post-norm BERT-style blocks, GELU FFN, hand-written attention,
positions counted from the first event, right-padded sequences) are trained with identical
settings on identical data, and scored with the same metric code. If our model (or our data,
loss or metric path) had a bug, the two would not land within noise of each other.

Identical for both models:
* data: `SeqRecDataModule(root, max_len=200, batch_size=128)`; each epoch's training batches
  (`loader("train", 0, 1)`, `set_epoch(e)`) are built ONCE and fed to both models in the same
  order; validation / test batches likewise.
* loss: full softmax cross-entropy over all items 1..N at every position with a target (pad item
  0 masked out). Ours through `model.loss` (chunked, loss="full"); RecBole's as one plain
  `F.cross_entropy` over `seq_output @ item_embedding.weight.T` (column 0 = -inf), i.e. not
  through our loss code. Every position trains (RecBole's own trainer instead makes one example
  per prefix and scores only its last position: the same targets, weighted differently).
* optimiser: AdamW(lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0), constant lr, no
  gradient clipping, float32, same seed. (RecBole trains with Adam, which equals AdamW at 0 decay.)
* size: d=64, 2 blocks, 1 head, dropout 0.2, 200 positions. RecBole's other SASRec settings are
  its defaults, read at run time from the wheel's `properties/model/SASRec.yaml` and written to
  the JSON (1.2.1: inner_size 256, hidden_act gelu, layer_norm_eps 1e-12, initializer_range
  0.02); we override n_layers=2, n_heads=1, hidden_size=64, hidden_dropout_prob=
  attn_dropout_prob=0.2, loss_type=CE, MAX_ITEM_LIST_LENGTH=200.
* metric: `sinkrec.metrics.target_ranks(hidden_rows, item_table, target_ids)` (all items are
  candidates, ties count against the target, history not excluded), then
  NDCG@10 = mean([r <= 10] / log2(r + 1)), HR@10 = mean(r <= 10). Ours: hidden = model output,
  table = `model.item_embeddings()`. RecBole: hidden = its seq_output at the position that
  predicts the target, table = `item_embedding.weight`. Validation after every epoch, test once
  at the end (nothing is selected on test). A popularity ranker (train-target counts) is scored
  with the same code as the floor.
* RNG: each model keeps its own torch RNG state across the alternating epochs, so each one's
  trajectory is what it would be if it trained alone with `--seed`.

Noise. Each epoch's row carries the paired difference of per-user val NDCG@10 (ours - RecBole)
with its 95% interval (1.96 standard errors over users): the evaluation-set noise of comparing
two fixed models on the same users. Seed-to-seed training noise comes on top; run `--seed` more
than once to see it.

How the independent code is obtained (never copied into this repository): the wheel
`recbole==1.2.1` is fetched at run time with `pip download recbole==1.2.1 --no-deps` into the
git-ignored `.cache/crosscheck/` (override with `--cache`), its sha256 is checked against the
pinned value below, and it is unzipped there. Only four of its files are imported, straight from
that directory: `recbole/model/sequential_recommender/sasrec.py` (the SASRec class, used
unmodified: its `__init__`, `_init_weights`, `get_attention_mask` and `forward` all run),
`recbole/model/abstract_recommender.py` (its base classes), `recbole/model/layers.py`
(`TransformerEncoder`) and `recbole/model/loss.py`, plus `recbole/utils/enum_type.py`.
Stubbed, inside this script only, so that nothing else of RecBole (and none of the heavy
dependencies it would pull in: colorlog, colorama, texttable, tensorboard, ...) is imported:
* the packages `recbole`, `recbole.model`, `recbole.model.sequential_recommender` are registered
  as bare packages pointing at the unzipped directories, so their `__init__` files (the last
  one imports ~40 other models) do not run;
* `recbole.utils` is a bare package exposing the real `enum_type` names plus `set_color` as
  identity (RecBole only uses it to colour `__str__` output).
RecBole's SASRec wants a Config and a Dataset: a dict with the keys it reads and an object whose
`num("item_id")` returns N + 1 (RecBole counts its [PAD] token 0 among the items) stand in.

What the adapter converts. Our batches are LEFT-padded (most recent event at index -1); RecBole
expects RIGHT-padded `item_seq` plus `item_seq_len` and gathers its output at item_seq_len - 1.
The adapter (1) shifts every row left by its pad count (items[b, j] -> seq[b, j - pad_b]),
(2) calls RecBole's own `forward(seq, lengths)` with the instance's `gather_indexes` replaced by
the identity, so RecBole returns its seq_output at EVERY position ([B, T, D]) instead of only
the last, and (3) shifts the output back into our left-padded layout, where position i predicts
targets[b, i] exactly as for our model. No transformer code is re-implemented here.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import types
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sinkrec.data import SeqRecDataModule
from sinkrec.metrics import target_ranks
from sinkrec.model import SinkRecConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
RECBOLE_VERSION = "1.2.1"
RECBOLE_WHEEL = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
# sha256 of the wheel as PyPI serves it (pip checks the index's hash while downloading)
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
DEFAULT_CACHE = ROOT / ".cache" / "crosscheck"
DEFAULT_OUT = ROOT / "bench_results" / "sasrec_crosscheck"
K = 10


# ---- fetching and importing RecBole ------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_recbole(cache: Path = DEFAULT_CACHE) -> Path:
    """Download (once) and unzip the pinned RecBole wheel into `cache`; returns the unzipped root.
    Raises RuntimeError when the wheel cannot be obtained or its hash does not match."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel, src = cache / RECBOLE_WHEEL, cache / f"recbole-{RECBOLE_VERSION}"
    if not wheel.exists():
        cmd = [sys.executable, "-m", "pip", "download", f"recbole=={RECBOLE_VERSION}", "--no-deps",
               "--only-binary", ":all:", "--disable-pip-version-check", "-d", str(cache)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0 or not wheel.exists():
            raise RuntimeError(f"could not download recbole=={RECBOLE_VERSION} ({' '.join(cmd)}):\n"
                               f"{(res.stdout + res.stderr)[-2000:]}")
    digest = _sha256(wheel)
    if digest != RECBOLE_WHEEL_SHA256:
        raise RuntimeError(f"{wheel}: sha256 {digest} != pinned {RECBOLE_WHEEL_SHA256}; delete it to refetch")
    marker = src / "recbole" / "model" / "sequential_recommender" / "sasrec.py"
    if not marker.exists():
        with zipfile.ZipFile(wheel) as z:
            z.extractall(src)
    return src


def _bare_package(name: str, path: Path) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]  # submodules are found here; the package's __init__ never runs
    mod.__package__ = name
    sys.modules[name] = mod
    return mod


def load_recbole_sasrec(src: Path) -> type:
    """RecBole's SASRec class, imported from the unzipped wheel `src` with the stubs of the
    module docstring (only sasrec.py, abstract_recommender.py, layers.py, loss.py, enum_type.py run)."""
    if "recbole" in sys.modules:
        have = getattr(sys.modules["recbole"], "__path__", [""])[0]
        if Path(have).resolve() != (src / "recbole").resolve():
            raise RuntimeError(f"another recbole is already imported from {have}")
        return importlib.import_module("recbole.model.sequential_recommender.sasrec").SASRec
    pkg = src / "recbole"
    _bare_package("recbole", pkg).__version__ = RECBOLE_VERSION
    _bare_package("recbole.model", pkg / "model")
    _bare_package("recbole.model.sequential_recommender", pkg / "model" / "sequential_recommender")
    utils = _bare_package("recbole.utils", pkg / "utils")
    enum_type = importlib.import_module("recbole.utils.enum_type")  # the real file (stdlib enum only)
    for name in dir(enum_type):
        if not name.startswith("_"):
            setattr(utils, name, getattr(enum_type, name))
    utils.set_color = lambda log, color, highlight=True: log  # stub: only colours __str__ output
    module = importlib.import_module("recbole.model.sequential_recommender.sasrec")
    for name in ("recbole.model.sequential_recommender.sasrec", "recbole.model.layers",
                 "recbole.model.abstract_recommender"):
        f = Path(sys.modules[name].__file__).resolve()
        assert f.is_relative_to(pkg.resolve()), f"{name} came from {f}, not from {pkg}"
    return module.SASRec


def recbole_defaults(src: Path) -> dict[str, Any]:
    """RecBole's SASRec.yaml. RecBole's own Config loader reads exponent floats such as 1e-12;
    plain yaml.safe_load (YAML 1.1) leaves them strings, so those are converted here."""
    import yaml

    def value(v: Any) -> Any:
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return v
        return v

    raw = yaml.safe_load((src / "recbole" / "properties" / "model" / "SASRec.yaml").read_text())
    return {k: value(v) for k, v in raw.items()}


# ---- the adapter -----------------------------------------------------------------------------
def shift_rows(x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """out[b, j] = x[b, j + offset[b]] where 0 <= j + offset[b] < T, else 0. x [B, T, ...]."""
    B, T = x.shape[:2]
    idx = torch.arange(T, device=x.device)[None, :] + offset[:, None]  # [B, T]
    inside = (idx >= 0) & (idx < T)
    idx = idx.clamp(0, T - 1).view(B, T, *([1] * (x.dim() - 2))).expand_as(x)
    keep = inside.view(B, T, *([1] * (x.dim() - 2)))
    return torch.where(keep, x.gather(1, idx), torch.zeros((), dtype=x.dtype, device=x.device))


class _ItemCount:
    """Stands in for RecBole's Dataset: SequentialRecommender reads only `dataset.num(ITEM_ID)`."""

    def __init__(self, n: int) -> None:
        self.n = n

    def num(self, field: str) -> int:
        return self.n


class RecBoleSASRecAdapter(nn.Module):
    """RecBole's SASRec (unmodified) on our left-padded batches; see the module docstring."""

    def __init__(self, recbole_cls: type, num_items: int, max_len: int, settings: dict[str, Any]) -> None:
        super().__init__()
        config = {"USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
                  "ITEM_LIST_LENGTH_FIELD": "item_length", "NEG_PREFIX": "neg_",
                  "MAX_ITEM_LIST_LENGTH": max_len, "device": torch.device("cpu"), **settings}
        self.rb = recbole_cls(config, _ItemCount(num_items + 1))  # RecBole counts its [PAD] item 0
        # RecBole's forward ends with gather_indexes(output, item_seq_len - 1); the identity keeps
        # its seq_output at every position
        self.rb.gather_indexes = lambda output, gather_index: output

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items [B, T] left-padded -> hidden [B, T, D] in the same left-padded layout."""
        T = items.shape[1]
        lengths = (items != 0).sum(1)
        pad = T - lengths
        seq = shift_rows(items, pad)  # right-padded: seq[b, j] = items[b, j + pad_b]
        out = self.rb(seq, lengths)  # RecBole's own forward, [B, T, D] (gather disabled)
        return shift_rows(out, -pad)  # back: hidden[b, i] = out[b, i - pad_b]; 0 at pads

    def item_table(self) -> torch.Tensor:
        return self.rb.item_embedding.weight


def plain_full_ce(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of softmax(hidden @ table.T) over items 1..N at positions with a target."""
    sel = targets != 0
    logits = hidden[sel] @ table.t()  # [P, N + 1]
    pad_col = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    pad_col[0] = True
    return F.cross_entropy(logits.masked_fill(pad_col, float("-inf")), targets[sel])


# ---- training and evaluation -----------------------------------------------------------------
@dataclasses.dataclass
class Contender:
    name: str
    module: nn.Module
    hidden: Callable[[dict], torch.Tensor]  # batch -> [B, T, D], left-padded layout
    table: Callable[[], torch.Tensor]  # -> [N + 1, D]
    loss: Callable[[dict], torch.Tensor]  # batch -> scalar mean CE
    opt: torch.optim.Optimizer
    rng: torch.Tensor  # this contender's torch RNG state between its epochs

    def n_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    def train_epoch(self, batches: list[dict]) -> tuple[float, float]:
        """-> (target-weighted mean train CE, seconds)."""
        t0, total, count = time.perf_counter(), 0.0, 0
        torch.set_rng_state(self.rng)
        self.module.train()
        for b in batches:
            loss = self.loss(b)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            n = int((b["targets"] != 0).sum())
            total, count = total + float(loss.detach()) * n, count + n
        self.rng = torch.get_rng_state()
        return total / max(1, count), time.perf_counter() - t0

    @torch.no_grad()
    def ranks(self, batches: list[dict]) -> np.ndarray:
        self.module.eval()
        table = self.table().detach()
        out = []
        for b in batches:
            rows, pos = (b["targets"] > 0).nonzero(as_tuple=True)
            h = self.hidden(b)
            out.append(target_ranks(h[rows, pos], table, b["targets"][rows, pos]))
        return torch.cat(out).numpy()


def ndcg_hr(ranks: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Per-target NDCG@k and HR@k."""
    hit = ranks <= k
    return hit / np.log2(ranks + 1.0), hit.astype(np.float64)


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean of a - b over the same targets and its standard error."""
    d = a - b
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"diff": float(d.mean()), "se": se, "ci95": [float(d.mean() - 1.96 * se), float(d.mean() + 1.96 * se)]}


def summary(ranks: np.ndarray) -> dict[str, float]:
    nd, hr = ndcg_hr(ranks)
    return {"ndcg_10": float(nd.mean()), "hr_10": float(hr.mean()), "mrr": float((1.0 / ranks).mean()),
            "count": len(ranks)}


def popularity_ranks(train: list[dict], evals: list[dict], num_items: int) -> np.ndarray:
    """Ranks of a most-popular ranker (counts of the training targets), through target_ranks."""
    counts = torch.zeros(num_items + 1, dtype=torch.float64)
    for b in train:
        t = b["targets"][b["targets"] > 0]
        counts += torch.bincount(t, minlength=num_items + 1).double()
    out = []
    for b in evals:
        rows, pos = (b["targets"] > 0).nonzero(as_tuple=True)
        tgt = b["targets"][rows, pos]
        out.append(target_ranks(torch.ones(len(tgt), 1, dtype=torch.float64), counts[:, None], tgt))
    return torch.cat(out).numpy()


def materialise(loader) -> list[dict]:
    return list(loader)


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.rstrip("\n")
        except OSError:
            return ""
    dirty = git("status", "--porcelain", "--", "sinkrec", "benchmarks/sasrec_crosscheck.py")
    return {"head": git("rev-parse", "HEAD"), "dirty": dirty.splitlines()}


def build_contenders(num_items: int, args, recbole_cls: type,
                     rb_settings: dict[str, Any]) -> tuple[list[Contender], SinkRecConfig]:
    def adamw(params):
        return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)

    torch.manual_seed(args.seed)
    cfg = SinkRecConfig(num_items=num_items, arch="sasrec", d_model=args.d_model, n_heads=args.n_heads,
                        n_blocks=args.n_blocks, dropout=args.dropout, loss="full", max_len=args.max_len)
    ours = build_model(cfg)
    ours_c = Contender("ours", ours, hidden=lambda b: ours(b["items"], b["ts"]).hidden,
                       table=ours.item_embeddings, loss=lambda b: ours.loss(ours(b["items"], b["ts"]), b["targets"])[0],
                       opt=adamw(ours.parameters()), rng=torch.get_rng_state())
    torch.manual_seed(args.seed)
    rb = RecBoleSASRecAdapter(recbole_cls, num_items, args.max_len, rb_settings)
    rb_c = Contender("recbole", rb, hidden=lambda b: rb(b["items"]), table=rb.item_table,
                     loss=lambda b: plain_full_ce(rb(b["items"]), rb.item_table(), b["targets"]),
                     opt=adamw(rb.parameters()), rng=torch.get_rng_state())
    return [ours_c, rb_c], cfg


def self_check(rb: RecBoleSASRecAdapter, batch: dict) -> float:
    """Max abs difference between the adapter's most recent position and RecBole's untouched
    forward (its own gather_indexes at item_seq_len - 1) on the right-padded rows: what RecBole
    itself would predict from. Eval mode, so no RNG is consumed."""
    rb.eval()
    items = batch["items"][:16]
    lengths = (items != 0).sum(1)
    seq = shift_rows(items, items.shape[1] - lengths)
    with torch.no_grad():
        adapted = rb(items)[:, -1]  # left layout: the most recent event sits at index -1
        del rb.rb.gather_indexes  # RecBole's own method again
        try:
            gathered = rb.rb(seq, lengths)  # [B, D]
        finally:
            rb.rb.gather_indexes = lambda output, gather_index: output
    return float((adapted - gathered).abs().max())


def fmt_row(r: dict) -> str:
    d = r["val_diff"]
    return (f"| {r['epoch']:>5} | {r['ours']['val']['ndcg_10']:.4f} | {r['recbole']['val']['ndcg_10']:.4f} | "
            f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] | {r['ours']['train_loss']:.4f} | "
            f"{r['recbole']['train_loss']:.4f} | {r['ours']['seconds']:.0f} | {r['recbole']['seconds']:.0f} |")


HEADER = ("| epoch | ours val NDCG@10 | RecBole val NDCG@10 | diff (ours - RecBole) [95% CI] | "
          "ours train loss | RecBole train loss | ours s | RecBole s |\n"
          "|---:|---:|---:|---|---:|---:|---:|---:|")


def verdict(diff: dict[str, float], ours: float, rb: float) -> str:
    lo, hi = diff["ci95"]
    rel = diff["diff"] / rb if rb else float("nan")
    if lo <= 0.0 <= hi:
        return (f"within evaluation noise: test NDCG@10 ours {ours:.4f} vs RecBole {rb:.4f}, "
                f"diff {diff['diff']:+.4f} ({rel:+.1%}), 95% CI [{lo:+.4f}, {hi:+.4f}] contains 0")
    better = "ours" if diff["diff"] > 0 else "RecBole"
    return (f"NOT within evaluation noise: {better} is better on test NDCG@10 (ours {ours:.4f} vs RecBole "
            f"{rb:.4f}, diff {diff['diff']:+.4f} = {rel:+.1%}, 95% CI [{lo:+.4f}, {hi:+.4f}])")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no further epoch once the next would end past this wall time")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--root", default="data/processed/ml-1m")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="writes OUT.json and OUT.md")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the RecBole wheel is fetched to")
    ap.add_argument("--seed", type=int, default=1234, help="torch seed of both models' init and dropout")
    ap.add_argument("--data-seed", type=int, default=1234, help="seed of the epochs' batch order")
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-blocks", type=int, default=2)
    ap.add_argument("--n-heads", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.2)
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    src = fetch_recbole(Path(args.cache))
    recbole_cls = load_recbole_sasrec(src)
    defaults = recbole_defaults(src)
    overrides = {"n_layers": args.n_blocks, "n_heads": args.n_heads, "hidden_size": args.d_model,
                 "hidden_dropout_prob": args.dropout, "attn_dropout_prob": args.dropout, "loss_type": "CE"}
    rb_settings = {**defaults, **overrides}

    dm = SeqRecDataModule(root=args.root, max_len=args.max_len, batch_size=args.batch_size, seed=args.data_seed)
    dm.setup()
    train_loader = dm.loader("train", 0, 1)
    val, test = materialise(dm.loader("val", 0, 1)), materialise(dm.loader("test", 0, 1))
    contenders, cfg = build_contenders(dm.num_items, args, recbole_cls, rb_settings)
    ours_c, rb_c = contenders
    gather_err = self_check(rb_c.module, val[0])
    assert gather_err < 1e-5, f"adapter != RecBole's gathered forward (max abs diff {gather_err})"

    train_loader.sampler.set_epoch(0)
    pop = summary(popularity_ranks(materialise(train_loader), val, dm.num_items))
    print(f"data {dm.name}: {dm.num_items} items, {len(val)} val batches; popularity val NDCG@10 "
          f"{pop['ndcg_10']:.4f}; params ours {ours_c.n_params():,} RecBole {rb_c.n_params():,}; "
          f"adapter vs RecBole gather: max abs diff {gather_err:.1e}")
    print(HEADER, flush=True)

    rows = []
    for epoch in range(args.epochs):
        t_epoch = time.perf_counter()
        train_loader.sampler.set_epoch(epoch)
        batches = materialise(train_loader)
        row: dict[str, Any] = {"epoch": epoch + 1, "batches": len(batches),
                               "targets": int(sum(int((b["targets"] != 0).sum()) for b in batches))}
        val_ranks = {}
        for c in contenders:
            loss, secs = c.train_epoch(batches)
            t0 = time.perf_counter()
            val_ranks[c.name] = c.ranks(val)
            row[c.name] = {"train_loss": loss, "train_seconds": secs, "val": summary(val_ranks[c.name]),
                           "seconds": secs + time.perf_counter() - t0}
        row["val_diff"] = paired(ndcg_hr(val_ranks["ours"])[0], ndcg_hr(val_ranks["recbole"])[0])
        rows.append(row)
        print(fmt_row(row), flush=True)
        elapsed, last = time.perf_counter() - t_start, time.perf_counter() - t_epoch
        if args.max_minutes is not None and epoch + 1 < args.epochs and elapsed + 1.1 * last > 60 * args.max_minutes:
            print(f"stopping after epoch {epoch + 1}: the next epoch would pass --max-minutes {args.max_minutes}")
            break

    test_ranks = {c.name: c.ranks(test) for c in contenders}
    tst = {name: summary(r) for name, r in test_ranks.items()}
    tst["popularity"] = summary(popularity_ranks(batches, test, dm.num_items))
    diff_nd = paired(ndcg_hr(test_ranks["ours"])[0], ndcg_hr(test_ranks["recbole"])[0])
    diff_hr = paired(ndcg_hr(test_ranks["ours"])[1], ndcg_hr(test_ranks["recbole"])[1])
    v = verdict(diff_nd, tst["ours"]["ndcg_10"], tst["recbole"]["ndcg_10"])
    test_lines = [f"| {name} | {m['ndcg_10']:.4f} | {m['hr_10']:.4f} | {m['mrr']:.4f} |"
                  for name, m in (("ours", tst["ours"]), ("RecBole", tst["recbole"]), ("popularity", tst["popularity"]))]
    print(f"\ntest after {len(rows)} epochs ({tst['ours']['count']} targets)\n| model | NDCG@10 | HR@10 | MRR |\n"
          "|---|---:|---:|---:|\n" + "\n".join(test_lines))
    print(f"test diff (ours - RecBole): NDCG@10 {diff_nd['diff']:+.4f} [{diff_nd['ci95'][0]:+.4f}, "
          f"{diff_nd['ci95'][1]:+.4f}], HR@10 {diff_hr['diff']:+.4f} [{diff_hr['ci95'][0]:+.4f}, {diff_hr['ci95'][1]:+.4f}]")
    print("verdict:", v)

    result = {
        "dataset": dm.name, "root": args.root, "num_items": dm.num_items, "epochs_run": len(rows),
        "args": vars(args), "wall_seconds": time.perf_counter() - t_start,
        "settings": {"optimizer": "AdamW(betas=(0.9, 0.98), eps=1e-8, weight_decay=0), constant lr",
                     "loss": "full softmax CE over items 1..N at every non-pad target",
                     "metric": "sinkrec.metrics.target_ranks, NDCG@10 / HR@10 / MRR, history not excluded"},
        "ours": {"config": dataclasses.asdict(cfg), "params": ours_c.n_params()},
        "recbole": {"version": RECBOLE_VERSION, "wheel_sha256": RECBOLE_WHEEL_SHA256, "source": str(src),
                    "sasrec_yaml_defaults": defaults, "overrides": overrides, "settings_used": rb_settings,
                    "params": rb_c.n_params(), "adapter_vs_gather_max_abs_diff": gather_err},
        "popularity_val": pop, "per_epoch": rows, "test": tst,
        "test_diff": {"ndcg_10": diff_nd, "hr_10": diff_hr}, "verdict": v,
        "env": {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
                "machine": platform.machine(), "git": git_info()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = [f"# SASRec cross-check: ours vs RecBole {RECBOLE_VERSION} on {dm.name}", "",
          (f"Same batches, loss, optimiser and metric; d={args.d_model}, {args.n_blocks} blocks, "
           f"{args.n_heads} head(s), dropout {args.dropout}, lr {args.lr}, batch {args.batch_size}, max_len "
           f"{args.max_len}, seed {args.seed}, {args.threads} thread(s). Params: ours {ours_c.n_params():,}, "
           f"RecBole {rb_c.n_params():,}. Popularity val NDCG@10 {pop['ndcg_10']:.4f}."), "", HEADER, *map(fmt_row, rows), "",
          f"Test after {len(rows)} epochs ({tst['ours']['count']} targets):", "",
          "| model | NDCG@10 | HR@10 | MRR |", "|---|---:|---:|---:|", *test_lines, "",
          f"Verdict: {v}.", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
