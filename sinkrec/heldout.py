"""Held-out users: score trained SinkBench checkpoints on users that no training ever saw.

The study's test split has one target per user. At 3,000 users and repeat ratio 0.7 that is ~1,130
dynamic targets, which leaves a 95% interval of about +-25% on one seed's SinkRec-vs-GDN gain on
dynamic targets (docs/STUDY.md): too wide to see the +10% the study asks about. A sequential
recommender is inductive over users (it reads a history; it learns no per-user vector), so a trained
checkpoint can also score NEW users drawn from the same generator: `pipeline.synth` with the same
item world (`--items`, `--repeat-ratio`) and another seed. Nothing is trained or selected on them.

- Item ids are mapped through the training data's vocabulary (`items.parquet`: raw id -> item_idx).
  Events of items the training data never saw (the rarest few of the catalogue) are dropped, and so
  is a user left with fewer than 2 events.
- Each held-out user is scored like a test user of the leave-one-out split: the last event is the
  target and the `max_len` events before it are the input (`sinkrec.data.collate.make_example`,
  stage test), with history items kept as candidates (the study's convention).

    python -m sinkrec.heldout --ckpt <best.ckpt> --data data/processed/sinkbench-r0.7 --repeat-ratio 0.7 --users 20000
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HELDOUT_SEED = 1_000  # pipeline.synth seed of the held-out users (the study's training data uses seed 0)


def heldout_log(data_root: Path, users: int, items: int, repeat_ratio: float, seed: int = HELDOUT_SEED) -> Path:
    """The held-out users' raw SinkBench log for the data at `data_root`, generated on first use
    (deterministic) at data/raw/<data_root's name>-heldout<users>-s<seed>/events.parquet."""
    from pipeline.synth import SynthConfig, generate

    if seed == 0:
        raise ValueError("heldout_log: seed 0 is the seed of the study's own data; held-out users need another")
    out = Path("data/raw") / f"{data_root.name}-heldout{users}-s{seed}" / "events.parquet"
    if not out.exists():
        generate(SynthConfig(users=users, items=items, seed=seed, repeat_ratio=repeat_ratio), out,
                 log=lambda message: None)
    return out


def load_sequences(raw: Path, data_root: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The raw log's users, in ascending raw user id, as (items, ts, kind) arrays in time order, items
    mapped through the training vocabulary of `data_root`; out-of-vocabulary events dropped, users
    with < 2 events left dropped."""
    import pyarrow.parquet as pq

    vocab = pq.read_table(data_root / "items.parquet").to_pydict()
    raw_ids = np.array([int(r) for r in vocab["raw_item_id"]], dtype=np.int64)
    lookup = np.zeros(int(raw_ids.max()) + 2, dtype=np.int64)  # raw id -> item_idx, 0 = unknown
    lookup[raw_ids] = np.asarray(vocab["item_idx"], dtype=np.int64)
    t = pq.read_table(raw, columns=["user_id", "item_id", "timestamp", "kind"])
    user, item = t["user_id"].to_numpy(), t["item_id"].to_numpy()
    ts, kind = t["timestamp"].to_numpy(), t["kind"].to_numpy()
    idx = np.where(item < len(lookup), lookup[np.minimum(item, len(lookup) - 1)], 0)
    keep = idx > 0
    user, idx, ts, kind = user[keep], idx[keep], ts[keep], kind[keep]
    order = np.lexsort((ts, user))  # per user, time order (synth writes it so; made sure)
    user, idx, ts, kind = user[order], idx[order], ts[order], kind[order]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    ends = np.r_[starts[1:], len(user)]
    return [(idx[a:b], ts[a:b], kind[a:b]) for a, b in zip(starts, ends) if b - a >= 2]


def score(model, seqs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], max_len: int,
          batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per held-out user (`model`: a checkpoint path or a model in eval mode): the columns of
    sinkrec.study.target_columns (rank of the target among all items, its kind, the habit shares);
    user_idx is the position in `seqs`."""
    import torch

    from sinkrec.data.collate import collate_left_pad, make_example
    from sinkrec.study import load_model, target_columns

    if isinstance(model, (str, Path)):
        model = load_model(str(model))
    cols: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        table = model.item_embeddings()
        for lo in range(0, len(seqs), batch_size):
            examples = [make_example(it, ts, kd, end=len(it), first=len(it) - 1, max_len=max_len,
                                     user_idx=lo + j, real_row=True)
                        for j, (it, ts, kd) in enumerate(seqs[lo:lo + batch_size])]
            batch = collate_left_pad(examples)
            for k, v in target_columns(batch, model(batch["items"], batch["ts"]).hidden, table).items():
                cols.setdefault(k, []).append(v.float().numpy() if v.is_floating_point() else v.numpy())
    return {k: np.concatenate(v) for k, v in cols.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sinkrec.heldout", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a trained checkpoint (e.g. a study run's best)")
    p.add_argument("--data", type=Path, required=True, help="the processed SinkBench data it trained on")
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=2000, help="the item world of the training data (synth --items)")
    p.add_argument("--repeat-ratio", type=float, required=True)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=HELDOUT_SEED)
    args = p.parse_args(argv)
    from sinkrec.study import ndcg10

    raw = heldout_log(args.data, args.users, args.items, args.repeat_ratio, args.seed)
    a = score(args.ckpt, load_sequences(raw, args.data), args.max_len)
    nd = ndcg10(a["rank"])
    for name, m in (("all", np.ones(len(nd), bool)), ("habit", a["kind"] == 1), ("dynamic", a["kind"] == 0)):
        print(f"{name:8s} users {int(m.sum()):6d}  NDCG@10 {nd[m].mean():.4f}  HR@10 {(a['rank'][m] <= 10).mean():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
