"""SinkBench: a synthetic raw event log with known habit loops and drifting interests.

    python -m pipeline.synth --users 3000 --items 2000 --seed 0 --out data/raw/sinkbench/events.parquet

Every user mixes two kinds of behaviour, recorded per event in the ground-truth column `kind`:
  * habit (kind = 1): a few short item patterns (2-5 items) re-consumed periodically, one pattern
    per cycle, in rotation. This is the repetition that floods a linear-attention state (the
    "semantic state sink") and that SinkRec's memory should absorb.
  * dynamic (kind = 0): interests drifting over item clusters by a Markov chain: after each event
    the user stays in the current cluster with probability `stay`, else steps to a nearby cluster
    on a ring (a random walk, so interests wander away from where they started). Items within a
    cluster are skewed towards popular ones.
Sequence lengths are log-normal (heavy-tailed): with the defaults, a few thousand users already include sequences of 10k+ events.

Output columns: user_id (int64), item_id (int64), timestamp (int64 seconds), kind (int8).
Rows are grouped by user; each batch of users (about `batch_events` events) is one row group, so
100M events never sit in memory at once. The same seed and arguments give the same file.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HABIT, DYNAMIC = 1, 0
T0 = 1_600_000_000  # 2020-09-13: start of the synthetic calendar


@dataclass(frozen=True)
class SynthConfig:
    users: int
    items: int
    seed: int = 0
    repeat_ratio: float = 0.3  # share of habit slots in a user's sequence (0 = no habits)
    mean_len: float = 300.0  # mean events per user before clipping
    len_sigma: float = 1.5  # log-normal sigma of the lengths: the tail heaviness
    min_len: int = 8
    max_len: int = 20_000
    clusters: int = 0  # item clusters for the dynamic interests; 0 = items // 64 (at least 2)
    stay: float = 0.9  # probability a dynamic event stays in the current cluster
    max_habits: int = 3  # patterns per user: uniform in 1..max_habits
    habit_skip: float = 0.1  # probability a habit slot is skipped (loops are not clockwork)
    batch_events: int = 2_000_000  # events per written row group (memory bound of the generator)

    @property
    def n_clusters(self) -> int:
        return self.clusters or max(2, self.items // 64)


def sequence_lengths(cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    mu = math.log(cfg.mean_len) - cfg.len_sigma ** 2 / 2  # so that the unclipped mean is mean_len
    lengths = rng.lognormal(mu, cfg.len_sigma, size=cfg.users)
    return np.clip(np.round(lengths), cfg.min_len, cfg.max_len).astype(np.int64)


def user_batches(lengths: np.ndarray, batch_events: int) -> list[tuple[int, int]]:
    """[(first user, end user)] with about batch_events events each (at least one user)."""
    bounds, start, total = [], 0, 0
    for u, n in enumerate(lengths):
        total += int(n)
        if total >= batch_events:
            bounds.append((start, u + 1))
            start, total = u + 1, 0
    if start < len(lengths):
        bounds.append((start, len(lengths)))
    return bounds


def generate_batch(cfg: SynthConfig, first_user: int, lengths: np.ndarray, rng: np.random.Generator) -> pa.Table:
    """Events of users first_user .. first_user + len(lengths) - 1, grouped by user, time-ordered."""
    U, E = len(lengths), int(lengths.sum())
    C = cfg.n_clusters
    cluster_size = cfg.items // C
    starts = np.cumsum(lengths) - lengths  # [U] first event of each user
    user = np.repeat(np.arange(U), lengths)  # [E] user of each event
    pos = np.arange(E) - starts[user]  # [E] index within the user's sequence

    # --- dynamic interests: a random walk over the cluster ring, item skewed within the cluster
    home = rng.integers(0, C, size=U)
    move = np.where(rng.random(E) < cfg.stay, 0, rng.choice(np.array([-2, -1, 1, 2]), size=E))
    move[starts] = 0
    walk = np.cumsum(move)
    cluster = (home[user] + walk - walk[starts][user]) % C  # segmented cumsum: restart per user
    rank = np.floor(cluster_size * rng.random(E) ** 2).astype(np.int64)  # u^2: popular ranks first
    item = cluster * cluster_size + rank

    # --- habit loops: pattern `cycle % n_habits` is replayed at the start of every period
    kind = np.full(E, DYNAMIC, dtype=np.int8)
    if cfg.repeat_ratio > 0:
        pattern_len = rng.integers(2, 6, size=U)  # [U] 2..5 items per pattern
        period = np.maximum(pattern_len + 1, np.round(pattern_len / cfg.repeat_ratio)).astype(np.int64)
        phase = rng.integers(0, period)
        n_habits = rng.integers(1, cfg.max_habits + 1, size=U)
        # [U, max_habits, 5] habit items drawn near the user's home cluster
        near = (home[:, None, None] + rng.integers(-1, 2, size=(U, cfg.max_habits, 5))) % C
        habit_items = near * cluster_size + rng.integers(0, cluster_size, size=near.shape)
        t = pos + phase[user]
        offset, cycle = t % period[user], t // period[user]
        habit = (offset < pattern_len[user]) & (rng.random(E) >= cfg.habit_skip)
        h_idx = cycle % n_habits[user]
        item = np.where(habit, habit_items[user, h_idx, np.minimum(offset, 4)], item)
        kind[habit] = HABIT

    # --- time: sessions of quick events separated by day-scale gaps
    gap = np.where(rng.random(E) < 0.15, rng.exponential(86_400.0, E), rng.exponential(120.0, E))
    gap = np.ceil(gap).astype(np.int64)
    gap[starts] = 0
    clock = np.cumsum(gap)
    start_time = T0 + rng.integers(0, 180 * 86_400, size=U)
    ts = start_time[user] + clock - clock[starts][user]

    return pa.table({
        "user_id": pa.array(first_user + user + 1, pa.int64()),
        "item_id": pa.array(item + 1, pa.int64()),  # raw ids 1..items
        "timestamp": pa.array(ts, pa.int64()),
        "kind": pa.array(kind, pa.int8()),
    })


def generate(cfg: SynthConfig, out: Path, log=print) -> dict[str, int]:
    """Write the event log to `out` (atomically: a .partial file renamed at the end; the partial name
    carries the pid, so two processes generating the same log, e.g. two `study --part`s, do not collide)."""
    if cfg.users < 1 or cfg.items < 2 * cfg.n_clusters or not 0 <= cfg.repeat_ratio < 1:
        raise ValueError("need users >= 1, items >= 2 * clusters and 0 <= repeat_ratio < 1")
    lengths = sequence_lengths(cfg, np.random.default_rng([cfg.seed, 0]))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
    events = habits = 0
    t0 = time.perf_counter()
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64()),
                        ("kind", pa.int8())])
    with pq.ParquetWriter(partial, schema, compression="zstd") as writer:
        for b, (lo, hi) in enumerate(user_batches(lengths, cfg.batch_events)):
            table = generate_batch(cfg, lo, lengths[lo:hi], np.random.default_rng([cfg.seed, 1, b]))
            writer.write_table(table, row_group_size=table.num_rows)
            events += table.num_rows
            habits += int(np.count_nonzero(table["kind"].to_numpy()))
            log(f"[synth] users {hi:,}/{cfg.users:,}: {events:,} events ({time.perf_counter() - t0:.1f} s)")
    partial.replace(out)
    stats = {"users": cfg.users, "events": events, "habit_events": habits,
             "max_len": int(lengths.max()), "mean_len": int(lengths.mean())}
    log(f"[synth] wrote {out}: {stats}")
    return stats


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.synth --users N --items M [--<field> VALUE ...] --out PATH` (pipeline/cli.py)."""
    from pipeline.cli import parse
    from pipeline.errors import PipelineError

    try:
        cfg, _, extra = parse(SynthConfig, sys.argv[1:] if argv is None else argv, "python -m pipeline.synth",
                              __doc__.split("\n\n")[0], extra={"out": str})
        generate(cfg, Path(extra["out"]))
    except (ValueError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
