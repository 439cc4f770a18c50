"""Where an ML-1M training epoch goes: seconds per optimizer step, split into the model body and the
loss head, for each arch x loss, measured side by side in one run (`make bench-epoch`).

    python -m benchmarks.epoch [--steps 6] [--archs sasrec gdn sinkrec] [--threads 2]

Losses compared on the same batches:
    plain     the whole [positions x items] logits at once, F.cross_entropy (the pre-chunking path)
    full      sinkrec.losses.full_softmax_loss: chunks of positions, recompute in backward
    sampled   sinkrec.losses.sampled_softmax_loss with 1,024 batch-shared uniform negatives
With --bf16 each is timed again under CPU bf16 autocast (trainer.precision=bf16-mixed); that pays
off only where the CPU has AMX or AVX512-BF16 (see `lscpu` flags).
Times are medians over `--steps` real training batches (the longest-history buckets first, so the
numbers are an upper bound per step); the epoch estimate multiplies by the batches per epoch.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sinkrec.data import SeqRecDataModule
from sinkrec.losses import full_softmax_loss, sampled_softmax_loss
from sinkrec.model import SinkRecConfig, build_model


def plain_full_ce(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    sel = targets != 0
    logits = (hidden[sel] @ table.t()).float()  # [P, N + 1] at once
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets[sel])


LOSSES = {
    "plain": plain_full_ce,
    "full": full_softmax_loss,
    "sampled": lambda h, t, y: sampled_softmax_loss(h, t, y, 1024),
}


def time_step(model, batch, loss_fn, bf16: bool = False) -> tuple[float, float]:
    """(seconds of the whole step, seconds of the loss head alone, forward + backward)."""
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(batch["items"], batch["ts"])
    hidden = out.hidden.detach().requires_grad_(True)
    t1 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(hidden, model.item_embeddings(), batch["targets"])
    loss.backward()
    t2 = time.perf_counter()
    (out.hidden * hidden.grad).sum().add(out.aux_loss).backward()  # the body's backward
    t3 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return t3 - t0, t2 - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="data/processed/ml-1m")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--archs", nargs="+", default=["sasrec", "gdn", "sinkrec"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument("--bf16", action="store_true", help="also time each loss under bf16 autocast")
    p.add_argument("--conv-backends", nargs="+", default=["auto"], choices=["auto", "reference", "channels_last"],
                   help="the short convs' backend (model.config.conv_backend); several: timed side by side")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dm = SeqRecDataModule(root=args.root, max_len=200, batch_size=128)
    dm.setup()
    loader = dm.loader("train", 0, 1)
    batches = sorted(loader, key=lambda b: -b["items"].shape[1])[: args.steps]
    per_epoch = len(loader)
    print(f"{args.root}: {per_epoch} batches/epoch; timing the {args.steps} longest, {args.threads} thread(s)")
    print("| arch | loss | step s | head s | head share | epoch estimate s | speed-up vs the first row |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for arch in args.archs:
        models = {}
        for conv in args.conv_backends if arch != "sasrec" else ["auto"]:
            torch.manual_seed(0)
            models[conv] = build_model(SinkRecConfig(num_items=dm.num_items, arch=arch, d_model=64, n_heads=2,
                                                     n_blocks=2, n_loops=1, n_codes=128, dropout=0.2,
                                                     conv_backend=conv))
            time_step(models[conv], batches[0], LOSSES["full"])  # warm-up
        base = None
        runs = [(n, False) for n in args.losses] + ([(n, True) for n in args.losses] if args.bf16 else [])
        runs = [(n, bf16, conv) for n, bf16 in runs for conv in models]
        for loss_name, bf16, conv in runs:
            model = models[conv]
            name = loss_name + (" bf16" if bf16 else "") + (f", conv {conv}" if len(models) > 1 else "")
            times = [time_step(model, b, LOSSES[loss_name], bf16) for b in batches]
            step = statistics.median(t for t, _ in times)
            head = statistics.median(h for _, h in times)
            base = base or step
            print(f"| {arch} | {name} | {step:.2f} | {head:.2f} | {head / step:.0%} | {step * per_epoch:.0f} | "
                  f"{base / step:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
