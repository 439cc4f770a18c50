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
from sinkrec.layers.tdgd import recurring_codes, recurring_items
from sinkrec.lit_module import SeqRecModule


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("root")
    ap.add_argument("--batches", type=int, default=8, help="validation batches of 128 users read")
    args = ap.parse_args(argv)
    module = SeqRecModule.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True)
    model, cfg = module.model.eval(), module.config
    dm = SeqRecDataModule(args.root, max_len=256, eval_batch_size=128)
    sums: dict[str, tuple[float, int]] = {}

    def add(key: str, x: torch.Tensor) -> None:
        s, n = sums.get(key, (0.0, 0))
        sums[key] = (s + float(x.sum()), n + x.numel())

    with torch.no_grad():
        for i, b in enumerate(dm.loader("val", 0, 1)):
            if i == args.batches:
                break
            items, kind = b["items"], b["input_kind"]
            mask = items != 0
            out = model(items, b["ts"], return_states=True)
            item_recurs = recurring_items(items, mask, cfg.num_items)  # what a habit is
            targets = [recurring_codes(rec["codes"], mask, cfg.n_codes) if rec.get("codes") is not None else None
                       for rec in out.states]
            for name, k in (("habit", 1), ("dynamic", 0)):
                sel = mask & (kind == k)
                add(f"item recurs | {name}", item_recurs[sel].float())
                for j, (rec, target) in enumerate(zip(out.states, targets)):
                    if target is not None:
                        add(f"pass {j}: code tuple recurs | {name}", target[sel].float())
                        add(f"pass {j}: rho | {name}", rec["rho"].mean(-1)[sel])
    result = {k: s / max(n, 1) for k, (s, n) in sorted(sums.items())}
    for k, (s, n) in sorted(sums.items()):
        print(f"{k:40s} {s / max(n, 1):.3f}  (n={n})")
    return result


if __name__ == "__main__":
    main()
