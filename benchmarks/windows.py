"""Peak memory and time of one training step on long histories: one pass vs window by window with
the state carried (sinkrec/windows.py), side by side in one run (`make bench-windows`).

    python -m benchmarks.windows [--lengths 1024 4096 16384] [--window 256] [--batch 4] [--arch sinkrec]

Each (T, mode) runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own: the model and
one forward + backward + AdamW step of a [batch, T] batch of random items (ML-1M's 3,706-item
catalogue, full softmax), minus the RSS after building the model. The two losses differ a little
(dropout draws and codebook-update timing differ); tests/model/test_windows.py holds the exact
equalities. Expected:
the one-pass peak grows linearly with T; the windowed peak stays near the T = window cost.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _child(arch: str, T: int, window: int | None, batch: int, threads: int) -> dict:
    import torch

    from sinkrec.model import SinkRecConfig, build_model
    from sinkrec.windows import defer_codebook_updates, flush_codebook_updates, windowed_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(SinkRecConfig(arch=arch, num_items=3706, d_model=64, n_heads=2, n_blocks=2, n_loops=2,
                                      dropout=0.1, kernel_backend="chunk")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if window is not None:
        defer_codebook_updates(model)
    items = torch.randint(1, 3707, (batch, T))
    ts = torch.cumsum(torch.randint(0, 3600, (batch, T)), 1) + 1_000_000_000
    targets = torch.roll(items, -1, 1)
    targets[:, -1] = 0
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if window is None:
        loss, _ = model.loss(model(items, ts), targets)
    else:
        loss, _ = windowed_loss(model, items, ts, targets, window)
    loss.backward()
    if window is not None:
        flush_codebook_updates(model)
    opt.step()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"loss": float(loss), "seconds": seconds, "base_mib": base / 1024, "peak_mib": peak / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--arch", default="sinkrec", choices=["sinkrec", "gdn", "elastic"])
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        T, window = json.loads(a.child)
        print(json.dumps(_child(a.arch, T, window, a.batch, a.threads)))
        return
    print(f"{a.arch}, batch {a.batch}, {a.threads} thread(s); peak = max RSS of the step minus RSS after set-up")
    print(f"| T | one pass: peak MiB | s | windowed (W={a.window}): peak MiB | s | memory ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for T in a.lengths:
        row = {}
        for mode in (None, a.window):
            out = subprocess.run([sys.executable, "-m", "benchmarks.windows", "--arch", a.arch, "--batch", str(a.batch),
                                  "--threads", str(a.threads), "--child", json.dumps([T, mode])],
                                 capture_output=True, text=True, check=True)
            row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        one, win = row[None], row[a.window]
        d1, d2 = one["peak_mib"] - one["base_mib"], win["peak_mib"] - win["base_mib"]
        print(f"| {T:,} | {d1:,.0f} | {one['seconds']:.2f} | {d2:,.0f} | {win['seconds']:.2f} | "
              f"{d1 / max(d2, 1):.1f}x |")


if __name__ == "__main__":
    main()
