"""The whole run: scan -> parse -> dedup -> rating -> k-core -> vocab -> shards + manifest.

Each step is a `LazyFrame -> LazyFrame` function from its own module; this file only wires them.
The parse step streams the raw input once into staging Arrow IPC files, one folder per shard (the
user's stable hash; pipeline/shard.py), so every per-user step (dedup, time ordering, one row per user) then runs one
shard at a time: peak memory is about events / num_shards, and inputs larger than memory work.
Global steps (counts, k-core, vocab) are streaming aggregations whose results are small tables.
After every step the events/users/items counts are logged and kept for the manifest.

The output is built in a hidden sibling directory and renamed into place at the end: an interrupted
run leaves no partial output, and an existing output is replaced only as a whole. A run holds an
exclusive lock on `.<out>.lock` beside the output from start to end; a second run on the same output
refuses at once, or with `wait=True` (`pipeline.prepare`, run by every training process) waits for
the first and then finds the output up to date (the lock is the kernel's: a killed run leaves the
file, never the lock).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import polars as pl

from pipeline import manifest
from pipeline.clean import drop_duplicates, filter_rating, kcore_keep, restrict
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.manifest import sha256_of
from pipeline.parse import check_bad_rows, drop_bad_rows, parse, resolve_time_format
from pipeline.scan import resolve_inputs, scan
from pipeline.schema import ITEM, SHARD, USER
from pipeline.sequences import to_sequences
from pipeline.shard import Partitioned, empty_shard, partition, shard_path, stage_per_shard, write_shard
from pipeline.vocab import apply_vocab, item_vocab, items_table, shard_of, user_vocab, users_table

Log = Callable[[str], None]
Step = Callable[[pl.LazyFrame], pl.LazyFrame]


def log_stdout(message: str) -> None:
    print(message, flush=True)


def run(cfg: PipelineConfig, log: Log = log_stdout, wait: bool = False,
        before: Callable[[], None] | None = None) -> Path:
    """Build cfg.out unless it is already up to date; returns the output directory.

    wait: if another run holds the output's lock, wait for it instead of refusing.
    before: called once the lock is held, before anything is read (pipeline.prepare fetches the raw data).
    """
    out = Path(cfg.out)
    with _exclusive(out, wait):
        if before is not None:
            before()
        return _run(cfg, out, log)


@contextmanager
def _exclusive(out: Path, wait: bool = False) -> Iterator[None]:
    """Hold `.<out>.lock` (flock) for the whole run, removed at the end; if another run has it,
    PipelineError, or (wait) block until it is released."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    while True:
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "?"
                raise PipelineError(f"output {out} is being written by another pipeline run (pid {holder}, "
                                    f"lock {lock}); wait for it to finish, or choose another --out") from None
            # the holder removes the file before releasing it: a lock taken on a removed file is no lock
            if not lock.exists() or os.stat(lock).st_ino != os.fstat(f.fileno()).st_ino:
                if wait:
                    continue  # the run we waited for is done: take the lock of a fresh file
                raise PipelineError(f"output {out} is being written by another pipeline run (lock {lock}); "
                                    "wait for it to finish, or choose another --out")
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield
            finally:
                lock.unlink(missing_ok=True)
            return


def _run(cfg: PipelineConfig, out: Path, log: Log) -> Path:
    files = resolve_inputs(cfg.input)
    sources = manifest.describe_sources(files)
    if out.exists():
        old = manifest.read(out)
        diffs = manifest.differences(old, cfg, sources) if old else ["it has no readable manifest.json"]
        intact = not diffs and manifest.files_intact(old, out)
        if intact and old.get("code_sha256") == manifest.code_fingerprint():
            log(f"[pipeline] {out} is up to date (same inputs, config and pipeline code); nothing to do")
            return out
        if intact:
            log(f"[pipeline] {out}: same inputs and config but the pipeline code changed; rebuilding")
        elif not cfg.overwrite:
            why = "; ".join(diffs) if diffs else "its files do not match its manifest"
            raise PipelineError(f"output {out} already exists and differs from this run ({why}); "
                                "pass --overwrite to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        _build(cfg, files, sources, tmp, log)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[pipeline] wrote {out}")
    return out


class _Steps:
    """Counts and timing of every step, printed as it goes and kept for the manifest."""

    def __init__(self, log: Log) -> None:
        self.rows: list[dict] = []
        self.log = log
        self.t0 = time.perf_counter()

    def record(self, step: str, events: int, users: int, items: int) -> None:
        seconds = time.perf_counter() - self.t0
        self.rows.append({"step": step, "events": events, "users": users, "items": items,
                          "seconds": round(seconds, 3)})
        self.log(f"[pipeline] {step:<10} {events:>13,} events {users:>11,} users {items:>11,} items "
                 f"{seconds:8.2f} s")
        if events == 0:
            raise PipelineError(f"nothing left after step {step!r}; loosen min_rating / "
                                "min_user_interactions / min_item_interactions or check the input")
        self.t0 = time.perf_counter()

    def count(self, step: str, lf: pl.LazyFrame) -> None:
        n, u, i = lf.select(pl.len(), pl.col(USER).n_unique(), pl.col(ITEM).n_unique()) \
                    .collect(engine="streaming").row(0)
        self.record(step, n, u, i)

    def table(self) -> str:
        lines = [f"{'step':<10} {'events':>13} {'users':>11} {'items':>11} {'seconds':>8}"]
        lines += [f"{r['step']:<10} {r['events']:>13,} {r['users']:>11,} {r['items']:>11,} {r['seconds']:>8.2f}"
                  for r in self.rows]
        return "\n".join(lines)


def _build(cfg: PipelineConfig, files: list[Path], sources: list[dict], tmp: Path, log: Log) -> None:
    staging = tmp / "_staging"
    steps = _Steps(log)
    log(f"[pipeline] {cfg.name}: {len(files)} input file(s), {sum(s['bytes'] for s in sources):,} bytes "
        f"-> {cfg.out}")

    # parse: the only pass over the raw input; events are partitioned by their user's shard
    raw = scan(cfg, files)
    time_format = resolve_time_format(raw, cfg)
    parsed = parse(raw, cfg, time_format).with_columns(shard_of(pl.col(USER), cfg.num_shards).alias(SHARD))
    try:
        parts = partition(parsed, staging / "parse", cfg.num_shards)
    except pl.exceptions.PolarsError as e:
        raise PipelineError(f"reading {', '.join(map(str, files))} as {cfg.format}: "
                            f"{str(e).splitlines()[0]}") from e
    bad_rows = check_bad_rows(parts.scan_all(), cfg, files)
    if bad_rows:
        log(f"[pipeline] skipping {bad_rows:,} bad row(s) (on_bad_rows: skip)")
    steps.count("parse", drop_bad_rows(parts.scan_all()))

    # dedup, one shard at a time (duplicates share their user, hence their shard)
    parts = stage_per_shard(parts, lambda lf: drop_duplicates(drop_bad_rows(lf)), staging / "dedup")
    steps.count("dedup", parts.scan_all())

    # optional rating threshold and k-core: filters kept lazy, applied to each shard when it is written
    filters: list[Step] = []
    if cfg.min_rating is not None:
        filters.append(partial(filter_rating, min_rating=cfg.min_rating))
        steps.count("min_rating", _apply(filters, parts.scan_all()))
    if cfg.min_user_interactions > 1 or cfg.min_item_interactions > 1:
        before = steps.rows[-1]["events"]
        keep, kept_events = kcore_keep(_apply(filters, parts.scan_all()),
                                       cfg.min_user_interactions, cfg.min_item_interactions)
        steps.record("kcore", kept_events, keep[0].height, keep[1].height)
        if kept_events < before:  # else the k-core is everything: no joins needed
            filters.append(partial(restrict, keep=keep))

    # vocab: contiguous ids by first appearance, raw ids kept
    events = _apply(filters, parts.scan_all())
    items, users = pl.collect_all([item_vocab(events, cfg.item_features), user_vocab(events)], engine="streaming")
    items_table(items).write_parquet(tmp / "items.parquet", compression="zstd")
    users_table(users, cfg.num_shards).write_parquet(tmp / "users.parquet", compression="zstd")

    # one row per user, one shard at a time
    shards = _write_shards(parts, filters, users, items, cfg, tmp, log)
    steps.record("sequences", sum(s["events"] for s in shards), sum(s["rows"] for s in shards), items.height)
    shutil.rmtree(staging)

    tables = [{"path": name, "rows": rows, "sha256": sha256_of(tmp / name)}
              for name, rows in (("items.parquet", items.height), ("users.parquet", users.height))]
    extra = {"time_format": time_format, "bad_rows_skipped": bad_rows, "tables": tables}
    manifest.write(manifest.build(cfg, sources, steps.rows, shards, items.height, extra), tmp)
    log(steps.table())


def _write_shards(parts: Partitioned, filters: list[Step], users: pl.DataFrame, items: pl.DataFrame,
                  cfg: PipelineConfig, tmp: Path, log: Log) -> list[dict]:
    """shards/part-NNNNN.parquet for every shard index (empty ones too); [{path, rows, events, sha256}]."""
    (tmp / "shards").mkdir()
    empty = empty_shard(apply_vocab(parts.scan_all(), users, items).collect_schema(), cfg.event_features)
    shards = []
    for i in range(cfg.num_shards):
        t0 = time.perf_counter()
        lf = parts.scan(i)
        if lf is None:
            seqs = empty
        else:
            events = apply_vocab(_apply(filters, lf), users, items)
            seqs = to_sequences(events, cfg.event_features).collect()  # one shard: in memory by design
        path = shard_path(i)
        shards.append({"path": path, **write_shard(seqs, tmp / path, cfg.row_group_users),
                       "sha256": sha256_of(tmp / path)})
        log(f"  shard {i + 1}/{cfg.num_shards}: {shards[-1]['rows']:,} users, {shards[-1]['events']:,} events "
            f"({time.perf_counter() - t0:.2f} s)")
    return shards


def _apply(filters: list[Step], lf: pl.LazyFrame) -> pl.LazyFrame:
    for step in filters:
        lf = step(lf)
    return lf


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished build into place; an old output is swapped out, then removed."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    tmp.rename(out)
    if old.is_symlink():  # `out` was a link to a directory elsewhere: drop the link, never its target
        old.unlink()
    else:
        shutil.rmtree(old)


def _remove_stale_builds(out: Path) -> None:
    """Remove hidden build directories left by runs that were killed (their process is gone)."""
    for path in out.parent.glob(f".{out.name}.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
