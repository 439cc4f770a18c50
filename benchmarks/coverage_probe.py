"""Does SinkRec's coverage target single out habit events, and does the gate rho follow it?

    python -m benchmarks.coverage_probe CKPT data/processed/sinkbench-r0.7 [--batches 8]

On SinkBench validation batches (ground-truth `kind`: 1 habit, 0 dynamic), per input event kind:
the rate at which the item already occurred earlier in the row (what a habit is), the rate of the
coverage target `recurring_codes` (the position's RVQ code tuple occurred earlier: what coverage
supervision trains rho towards) and the mean rho, for every (loop, block) pass of the checkpoint.
If the target does not separate habits from dynamic events, supervising rho with it cannot open
the gate on habits (issue 9).
"""
from __future__ import annotations

import argparse
import torch
from sinkrec.data import SeqRecDataModule
from sinkrec.layers.tdgd import recurring_codes
from sinkrec.lit_module import SeqRecModule

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("ckpt")
ap.add_argument("root")
ap.add_argument("--batches", type=int, default=8, help="validation batches of 128 users read")
args = ap.parse_args()
ckpt, root = args.ckpt, args.root
module = SeqRecModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
model, n_codes = module.model.eval(), module.config.n_codes
dm = SeqRecDataModule(root, max_len=256, eval_batch_size=128)
acc = {}
def add(key, x):
    s, n = acc.get(key, (0.0, 0))
    acc[key] = (s + float(x.sum()), n + x.numel())
with torch.no_grad():
    for i, b in enumerate(dm.loader("val", 0, 1)):
        if i == args.batches:
            break
        items, ts, kind = b["items"], b["ts"], b["input_kind"]
        mask = items != 0
        out = model(items, ts, return_states=True)
        # item recurrence: this item already occurred earlier in the row
        T = items.shape[1]
        same = (items[:, :, None] == items[:, None, :]) & mask[:, :, None]
        earlier = torch.tril(torch.ones(T, T, dtype=torch.bool), -1)
        item_rec = (same & earlier).any(-1) & mask
        for name, k in (("habit", 1), ("dynamic", 0)):
            sel = mask & (kind == k)
            add(f"item recurs | {name}", item_rec[sel].float())
            for j, rec in enumerate(out.states):
                if rec.get("codes") is None:
                    continue
                tgt = recurring_codes(rec["codes"], mask, n_codes)
                add(f"pass {j}: code tuple recurs | {name}", tgt[sel].float())
                add(f"pass {j}: rho | {name}", rec["rho"].mean(-1)[sel])
for k in sorted(acc):
    s, n = acc[k]
    print(f"{k:40s} {s / max(n, 1):.3f}  (n={n})")
