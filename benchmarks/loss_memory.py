"""Peak memory of the full-softmax loss on a large catalogue: plain vs chunked (`make bench-loss`).

    python -m benchmarks.loss_memory [--items 50000] [--batch 32] [--len 512]

Each variant runs in its own process (peak RSS is per process): two forward+backward steps of the
SinkBench model (d 64, 2 blocks x 2 loops) on random items, loss `full`, with the chunked loss of
sinkrec.losses or the plain `F.cross_entropy(h @ table.T)` that materialises [positions x items]
logits (and their gradient). Reports peak RSS and seconds per step side by side.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(variant: str, items: int, batch: int, length: int) -> None:
    import torch

    from benchmarks.epoch import plain_full_ce
    from sinkrec.losses import full_softmax_loss
    from sinkrec.model import SinkRecConfig, build_model

    torch.manual_seed(0)
    model = build_model(SinkRecConfig(num_items=items, d_model=64, n_heads=2, n_blocks=2, n_loops=2))
    x = torch.randint(1, items + 1, (batch, length + 1))
    ts = torch.arange(length + 1).expand(batch, -1) * 60
    loss_fn = full_softmax_loss if variant == "chunked" else plain_full_ce
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = model(x[:, :-1], ts[:, :-1])
        loss = loss_fn(out.hidden, model.item_embeddings(), x[:, 1:]) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": variant, "peak_rss_gib": peak / 2**20, "before_steps_gib": base / 2**20,
                      "s_per_step": min(times), "loss": float(loss)}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--len", type=int, default=512)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child, a.items, a.batch, a.len)
        return 0
    rows = []
    for variant in ("plain", "chunked"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.loss_memory", "--child", variant, "--items",
                              str(a.items), "--batch", str(a.batch), "--len", str(a.len)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"full softmax, {a.items:,} items, batch {a.batch} x {a.len} (2 steps, SinkBench model)")
    print("| loss | peak RSS GiB | RSS before the steps GiB | s / step |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['peak_rss_gib']:.2f} | {r['before_steps_gib']:.2f} | {r['s_per_step']:.2f} |")
    print(f"chunked / plain peak: {rows[1]['peak_rss_gib'] / rows[0]['peak_rss_gib']:.2f}; "
          f"losses equal: {abs(rows[0]['loss'] - rows[1]['loss']) < 1e-3 * abs(rows[0]['loss'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
