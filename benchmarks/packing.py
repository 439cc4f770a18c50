"""Packing vs padding (`data.pack`): the same training batches, left-padded and packed, side by side.

    python -m benchmarks.packing                        # SinkBench (heavy-tailed lengths), SinkRec
    python -m benchmarks.packing --root data/processed/ml-1m --max-len 200 --batch-size 128

Builds epoch 0's training batches four ways: left-padded without length bucketing
(bucket_batches 1), left-padded with it (the default, 32), packed with cu_seqlens
(collate_packed), and packed under a token budget (`data.max_tokens`, default batch_size x max_len:
the most a padded batch can cost, so a step never costs more, and short users share a step).
Reports steps per epoch and the spread of real events per step, and the fraction of compute spent on padding over the whole epoch (pad
positions / positions computed), and real events per second of one SinkRec training step (forward
+ backward of the loss, no optimizer) over each layout's first --batches batches, the layouts
alternating batch by batch so that machine load hits all alike; each batch is timed --repeats
times per layout and the fastest counts.
Timing ratios, not absolute seconds, are the result on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sinkrec.data import SeqRecDataModule
from sinkrec.model import SinkRecConfig, build_model


def step(model, batch) -> float:
    """Seconds of forward + backward of the training loss on one batch."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = model(batch["items"], batch["ts"], cu_seqlens=batch.get("cu_seqlens"))
    loss, _ = model.loss(out, batch["targets"])
    loss.backward()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/processed/sinkbench")
    ap.add_argument("--arch", default="sinkrec", choices=["sinkrec", "gdn"])
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=12, help="training batches measured per layout")
    ap.add_argument("--repeats", type=int, default=3, help="timings per batch and layout; the fastest counts")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--max-tokens", type=int, default=None, help="token budget of the last layout "
                    "(default batch_size x max_len)")
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline.prepare import prepare

    prepare(args.root)
    budget = args.max_tokens or args.batch_size * args.max_len
    layouts = {"padded, no bucketing": (False, 1, None), "padded, bucketed (default)": (False, 32, None),
               "packed": (True, 32, None), f"packed, max_tokens {budget}": (True, 32, budget)}
    # a token budget takes up to batch_size users per batch: lift that cap so the budget decides
    epochs = {name: list(SeqRecDataModule(args.root, max_len=args.max_len, pack=pack, bucket_batches=bucket,
                                          batch_size=args.batch_size if tokens is None else 1 << 16,
                                          max_tokens=tokens).loader("train", 0, 1))
              for name, (pack, bucket, tokens) in layouts.items()}
    # compute on padding over the whole epoch (building batches is cheap; no model runs here)
    real = sum(int((b["items"] > 0).sum()) for b in epochs["packed"])
    positions = {name: sum(b["items"].numel() for b in bs) for name, bs in epochs.items()}
    assert positions["packed"] == real, "a packed batch holds pads"
    dm = SeqRecDataModule(args.root)
    cfg = SinkRecConfig(arch=args.arch, num_items=dm.num_items, d_model=64, n_heads=2, n_blocks=2, n_loops=2,
                        dropout=0.0, kernel_backend="chunk", gate_backend="reference")
    torch.manual_seed(0)
    model = build_model(cfg)
    # timing: the same users in each layout would need the same batches; bucketing changes which users
    # share a batch, so each layout is timed on its own first --batches batches (alternating layouts)
    # and reported per real event
    sample = {name: bs[: args.batches] for name, bs in epochs.items()}
    for bs in sample.values():
        step(model, bs[0])  # warm-up
    best = {name: [float("inf")] * len(bs) for name, bs in sample.items()}
    events = {name: sum(int((b["items"] > 0).sum()) for b in bs) for name, bs in sample.items()}
    for i in range(args.batches):
        for _ in range(args.repeats):  # the fastest of a few: a shared machine's load only adds time
            for name, bs in sample.items():
                if i < len(bs):
                    best[name][i] = min(best[name][i], step(model, bs[i]))
    secs = {name: sum(b) for name, b in best.items()}
    res = {"root": args.root, "arch": args.arch, "max_len": args.max_len, "batch_size": args.batch_size,
           "epoch_batches": len(epochs["packed"]), "epoch_real_events": real, "timed_batches": args.batches, "repeats": args.repeats,
           "threads": torch.get_num_threads(), "layouts": {}}
    print(f"{args.root}, {args.arch}, batch {args.batch_size} x max_len {args.max_len}: one epoch = "
          f"{res['epoch_batches']} batches, {real:,} real events; {torch.get_num_threads()} threads, "
          f"{args.batches} batches timed per layout")
    print("| layout | steps per epoch | real events per step: mean / max (max / mean) | positions computed "
          "per epoch | compute on padding | real events/s (timed batches) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in layouts:
        per_step = [int((b["items"] > 0).sum()) for b in epochs[name]]
        r = {"steps": len(per_step), "events_per_step_mean": sum(per_step) / len(per_step),
             "events_per_step_max": max(per_step), "positions": positions[name],
             "pad_fraction": 1 - real / positions[name],
             "timed_events": events[name], "seconds": secs[name], "events_per_s": events[name] / secs[name]}
        res["layouts"][name] = r
        spread = r["events_per_step_max"] / r["events_per_step_mean"]
        print(f"| {name} | {r['steps']} | {r['events_per_step_mean']:,.0f} / {r['events_per_step_max']:,} "
              f"({spread:.2f}) | {r['positions']:,} | {r['pad_fraction']:.1%} | {r['events_per_s']:,.0f} |")
    for name in list(layouts)[:2]:
        ratio = res["layouts"]["packed"]["events_per_s"] / res["layouts"][name]["events_per_s"]
        print(f"packed / {name}: {ratio:.2f}x real events/s")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
