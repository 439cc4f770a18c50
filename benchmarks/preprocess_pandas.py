"""The baseline for `benchmarks.preprocess`: the pipeline's steps written plainly in pandas.

Same input, same steps (parse, dedup, k-core, first-appearance vocab, stable time sort, one row
per user, FNV-1a shards), same shard layout; eager and in memory, as one would write it first.
Prints {"events", "users", "items"} as JSON so the benchmark can check both agree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.vocab import fnv1a_64


def read(path: str, fmt: str, user: str, item: str, time: str, features: list[str]) -> pd.DataFrame:
    """Ids as the file gives them (MovieLens and Parquet: integers; csv/tsv: strings), ts as int64."""
    if fmt == "parquet":
        df = pd.read_parquet(path, columns=[user, item, time, *features])
    elif fmt == "movielens":
        df = pd.read_csv(path, sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"])
    else:
        df = pd.read_csv(path, sep="," if fmt == "csv" else "\t", dtype={user: str, item: str})
    df = df[[user, item, time, *features]].rename(columns={user: "user", item: "item", time: "ts"})
    df["ts"] = pd.to_numeric(df["ts"]).astype("int64")
    df["pos"] = np.arange(len(df))
    return df


def kcore(df: pd.DataFrame, min_user: int, min_item: int) -> pd.DataFrame:
    while True:
        users = df["user"].map(df["user"].value_counts()) >= min_user
        items = df["item"].map(df["item"].value_counts()) >= min_item
        keep = users & items
        if keep.all():
            return df
        df = df[keep]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--input", required=True)
    p.add_argument("--format", required=True)
    p.add_argument("--user-col", default="user_id")
    p.add_argument("--item-col", default="item_id")
    p.add_argument("--time-col", default="timestamp")
    p.add_argument("--event-features", nargs="*", default=[])
    p.add_argument("--min-user-interactions", type=int, default=0)
    p.add_argument("--min-item-interactions", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=4)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    df = read(a.input, a.format, a.user_col, a.item_col, a.time_col, a.event_features)
    df = df.drop_duplicates(subset=["user", "item", "ts", *a.event_features], keep="first")
    if a.min_user_interactions > 1 or a.min_item_interactions > 1:
        df = kcore(df, a.min_user_interactions, a.min_item_interactions)
    items = df.drop_duplicates("item")["item"]  # first appearance order (df is in input order)
    users = df.drop_duplicates("user")["user"]
    item_idx = pd.Series(np.arange(1, len(items) + 1, dtype=np.int32), index=items.values)
    user_idx = pd.Series(np.arange(1, len(users) + 1, dtype=np.int64), index=users.values)
    shard_of_user = pd.Series(fnv1a_64(pa.array(users.astype(str).values, pa.string())) % np.uint64(a.num_shards),
                              index=users.values)
    df["item_idx"] = df["item"].map(item_idx)
    df["user_idx"] = df["user"].map(user_idx)
    df["shard"] = df["user"].map(shard_of_user)
    df = df.sort_values(["user_idx", "ts", "pos"], kind="stable")

    out = Path(a.out) / "shards"
    out.mkdir(parents=True, exist_ok=True)
    for shard, part in df.groupby("shard", sort=True):
        seq = part.groupby("user_idx", sort=True).agg({c: list for c in ["item_idx", "ts", *a.event_features]})
        seq["n_events"] = seq["item_idx"].map(len).astype(np.int32)  # the contract's event count
        pq.write_table(pa.Table.from_pandas(seq.reset_index(), preserve_index=False),
                       out / f"part-{int(shard):05d}.parquet", compression="zstd")
    print(json.dumps({"events": len(df), "users": len(users), "items": len(items)}))


if __name__ == "__main__":
    main()
