"""Per-user examples for each stage of the split protocol, and left-padded batches (CONTRACTS §2).

One rule serves every stage. A user's events e_0..e_{n-1} (oldest first) give a sequence
`seq = e[:end]` and target positions `j in [first, end)`: the model reads `seq[:j]` and must rank
`seq[j]`. The window keeps the most recent `max_len` inputs, so inputs = seq[w:end-1],
targets = seq[w+1:end] with w = max(0, end - 1 - max_len) (w = 0 for max_len None: whole histories).

    stage      leave_one_out                 time_cutoff (valid_ts, test_ts)
    train      end = n-2, first = 1          end = #(ts < valid_ts), first = 1
    val        end = n-1, first = n-2        end = #(ts < test_ts),  first = #(ts < valid_ts)
    test       end = n,   first = n-1        end = n,                first = #(ts < test_ts)
    predict    inputs = the last max_len events, no target

So leave-one-out trains on all but the last two events, validates on the second-last and tests on
the last, each with its full prior history (up to `max_len`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.contract import STAGES

Stage = str  # one of pipeline.contract.STAGES
NO_KIND = -1  # target_kind where there is no target or the dataset has no `kind` column


def stage_bounds(
    lengths: np.ndarray, ts_counts: dict[str, np.ndarray] | None, stage: Stage, split: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Per user (end, first) as in the module docstring; `ts_counts` = #(ts < cut-off) per user."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} must be one of {STAGES}")
    n = lengths.astype(np.int64)
    if stage == "predict":
        return n + 1, n + 1  # inputs = the whole history; `first == end` means no target
    if split["protocol"] == "leave_one_out":
        end = {"train": n - 2, "val": n - 1, "test": n}[stage]
        first = np.ones_like(n) if stage == "train" else end - 1
        return end, first
    assert ts_counts is not None
    if stage == "train":
        end = ts_counts["valid_ts"]
        return end, np.ones_like(n)
    if stage == "val":
        return ts_counts["test_ts"], ts_counts["valid_ts"]
    return n, ts_counts["test_ts"]


def eligible(end: np.ndarray, first: np.ndarray, stage: Stage) -> np.ndarray:
    """Users with at least one target that has at least one event of history."""
    if stage == "predict":
        return end > 1  # at least one event to read
    return (first >= 1) & (end > first)


def shuffle_ties(
    items: np.ndarray, ts: np.ndarray, kind: np.ndarray | None, end: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Copies of `items` and `kind` with events [0, end) permuted at random inside each run of equal
    timestamps (`data.shuffle_ties`, training only). Events at `end` and after (the validation and
    test targets) never move, and nothing moves across a timestamp. On ML-1M half the consecutive
    events share a second (a user rating a page of films at once), so their stored order is an
    artefact of how the log was written, not behaviour: training on random orders of each tie
    stops the model from fitting that artefact."""
    items = items.copy()
    kind = None if kind is None else kind.copy()
    same = ts[1:end] == ts[: max(end - 1, 0)]  # event i + 1 shares event i's timestamp
    if not same.any():
        return items, kind
    run_id = np.r_[0, np.cumsum(~same)]  # 0, 0, 1, 2, 2, 2, ...: runs keep their order, members are keyed at random
    perm = np.argsort(run_id + rng.random(end), kind="stable")
    items[:end] = items[:end][perm]
    if kind is not None:
        kind[:end] = kind[:end][perm]
    return items, kind


def make_example(
    items: np.ndarray,
    ts: np.ndarray,
    kind: np.ndarray | None,
    end: int,
    first: int,
    max_len: int | None,
    user_idx: int,
    real_row: bool,
) -> dict[str, Any]:
    if first >= end:  # predict: read the last max_len events, no target
        lo = 0 if max_len is None else max(0, len(items) - max_len)
        x, t = items[lo:], ts[lo:]
        return {"items": x, "ts": t, "targets": np.zeros_like(x), "kind": None,
                "input_kind": None if kind is None else kind[lo:].astype(np.int64), "user_idx": user_idx,
                "real_row": real_row}
    w = 0 if max_len is None else max(0, end - 1 - max_len)
    x, t = items[w : end - 1], ts[w : end - 1]
    y = items[w + 1 : end].copy()
    pos = np.arange(w + 1, end)
    y[pos < first] = 0  # positions before the first target are history only
    k = k_in = None
    if kind is not None:
        k = kind[w + 1 : end].astype(np.int64)
        k[y == 0] = NO_KIND
        k_in = kind[w : end - 1].astype(np.int64)
    return {"items": x, "ts": t, "targets": y, "kind": k, "input_kind": k_in, "user_idx": user_idx,
            "real_row": real_row}


def collate_packed(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples BACK TO BACK with no padding (fla's cu_seqlens convention; docs/CONTRACTS.md §2).

    Returns items/ts/targets/target_kind/input_kind [1, N] (N = the batch's real events), cu_seqlens
    [B + 1] int64 (example b is positions cu_seqlens[b]:cu_seqlens[b + 1]), user_idx [B], real_row [B].
    A row with real_row=False (rank balancing) is one position, item 1, with no target: it costs one
    event of compute and counts nowhere (a packed batch holds no pad item, and never zero events)."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("items", "ts", "targets", "target_kind", "input_kind")}
    lengths = []
    for e in examples:
        x = np.asarray(e["items"], dtype=np.int64)
        if not e["real_row"] or len(x) == 0:
            x, t, y, k, k_in = (np.ones(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64),
                                np.full(1, NO_KIND, np.int64), np.full(1, NO_KIND, np.int64))
        else:
            t, y = np.asarray(e["ts"], dtype=np.int64), np.asarray(e["targets"], dtype=np.int64)
            k = np.full(len(x), NO_KIND, np.int64) if e["kind"] is None else e["kind"]
            k_in = np.full(len(x), NO_KIND, np.int64) if e.get("input_kind") is None else e["input_kind"]
        for name, a in zip(cols, (x, t, y, k, k_in)):
            cols[name].append(a)
        lengths.append(len(x))
    out = {name: torch.from_numpy(np.concatenate(parts))[None] for name, parts in cols.items()}
    out["cu_seqlens"] = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    out["user_idx"] = torch.tensor([e["user_idx"] for e in examples], dtype=torch.long)
    out["real_row"] = torch.tensor([e["real_row"] for e in examples], dtype=torch.bool)
    return out


def collate_left_pad(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples into LEFT-padded tensors: the most recent event sits at index -1.

    Returns items/ts/targets [B, T] int64 (0 = pad / no target), target_kind and input_kind
    [B, T] int64 (the `kind` of each target / input event; -1 = none), user_idx [B] int64, real_row [B] bool. Rows with real_row=False are rank-balancing
    repeats (see datamodule.RankUserSampler): their targets are zeroed so they count nowhere.
    """
    B = len(examples)
    T = max(1, max(len(e["items"]) for e in examples))
    items = torch.zeros(B, T, dtype=torch.long)
    ts = torch.zeros(B, T, dtype=torch.long)
    targets = torch.zeros(B, T, dtype=torch.long)
    kind = torch.full((B, T), NO_KIND, dtype=torch.long)
    input_kind = torch.full((B, T), NO_KIND, dtype=torch.long)
    for b, e in enumerate(examples):
        L = len(e["items"])
        if L == 0:
            continue
        items[b, T - L :] = torch.from_numpy(np.array(e["items"], dtype=np.int64))
        ts[b, T - L :] = torch.from_numpy(np.array(e["ts"], dtype=np.int64))
        if e.get("input_kind") is not None:
            input_kind[b, T - L :] = torch.from_numpy(e["input_kind"])
        if e["real_row"]:
            targets[b, T - L :] = torch.from_numpy(np.array(e["targets"], dtype=np.int64))
            if e["kind"] is not None:
                kind[b, T - L :] = torch.from_numpy(e["kind"])
    return {
        "items": items,
        "ts": ts,
        "targets": targets,
        "target_kind": kind,
        "input_kind": input_kind,
        "user_idx": torch.tensor([e["user_idx"] for e in examples], dtype=torch.long),
        "real_row": torch.tensor([e["real_row"] for e in examples], dtype=torch.bool),
    }
