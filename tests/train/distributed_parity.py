"""DeepSpeed-on-CPU parity (used by tests/train/test_distributed.py): the project's real model, data
loader and conf/deepspeed config go through `deepspeed.initialize` (ZeRO-2, gloo) and through torch
DDP from the same initial weights on the same batches; the per-step losses must match.

    PYTHONPATH=. torchrun --nproc_per_node=2 -m tests.train.distributed_parity --data data/processed/ml-100k \
        --deepspeed-config conf/deepspeed/zero2.json --steps 4 --out /tmp/parity.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sinkrec.distributed import destroy_process_group


def _batches(data: str, batch_size: int, max_len: int, steps: int, rank: int, world: int) -> list[dict]:
    from sinkrec.data import SeqRecDataModule

    dm = SeqRecDataModule(data, max_len=max_len, batch_size=batch_size)
    out = []
    for batch in dm.loader("train", rank, world):
        out.append(batch)
        if len(out) == steps:
            return out
    raise ValueError(f"{data}: only {len(out)} training batches per rank, --steps asks for {steps}")


def _model_config(num_items: int, arch: str, max_len: int):
    from sinkrec.model import SinkRecConfig

    # small but complete: memory, purified write, differential read, looping; no dropout so both
    # runs see exactly the same function
    return SinkRecConfig(num_items=num_items, arch=arch, d_model=32, n_heads=2, n_blocks=1, n_loops=2,
                         n_codes=32, dropout=0.0, max_len=max_len)


def _train(engine_kind: str, batches: list[dict], cfg, clip: float, ds_config: dict | None, seed: int) -> list[float]:
    from sinkrec.lit_module import OptimConfig, build_optimizer, warmup_cosine
    from sinkrec.model import build_model

    torch.manual_seed(seed)  # same initial weights (and RVQ init draws) for both engines
    model = build_model(dataclasses.replace(cfg))
    optim = OptimConfig(lr=3e-3, warmup_steps=2)
    opt = build_optimizer(model, optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, optim.warmup_steps, 100, 0.1))
    losses = []
    if engine_kind == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        for b in batches:
            loss, _ = model.loss(ddp(b["items"], b["ts"]), b["targets"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
        return losses
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    for b in batches:
        loss, _ = engine.module.loss(engine(b["items"], b["ts"]), b["targets"])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert engine.zero_optimization_stage() == ds_config["zero_optimization"]["stage"]
    engine.destroy()
    return losses


def parity(args: argparse.Namespace) -> dict[str, Any]:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from sinkrec.data.shards import load_manifest

    num_items = int(load_manifest(args.data)["num_items"])
    batches = _batches(args.data, args.batch_size, args.max_len, args.steps, rank, world)
    cfg = _model_config(num_items, args.arch, args.max_len)
    ds_config = json.loads(Path(args.deepspeed_config).read_text())
    stage = ds_config.get("zero_optimization", {}).get("stage")
    # what Lightning's DeepSpeedStrategy fills in from the Trainer, filled here from the same values
    ds_config.update(train_micro_batch_size_per_gpu=args.batch_size, gradient_accumulation_steps=1,
                     gradient_clipping=args.clip)
    ddp = _train("ddp", batches, cfg, args.clip, None, args.seed)
    ds = _train("deepspeed", batches, cfg, args.clip, ds_config, args.seed)
    result = {"rank": rank, "world": world, "zero_stage": stage, "ddp": ddp, "deepspeed": ds,
              "users": [b["user_idx"][b["real_row"]].tolist() for b in batches]}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0 and args.out:
        Path(args.out).write_text(json.dumps(gathered, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    from sinkrec.model import ARCHS

    q = argparse.ArgumentParser(prog="python -m tests.train.distributed_parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--data", required=True, help="processed dataset directory (holds manifest.json)")
    q.add_argument("--deepspeed-config", default="conf/deepspeed/zero2.json")
    q.add_argument("--arch", default="sinkrec", choices=ARCHS)
    q.add_argument("--steps", type=int, default=4)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--max-len", type=int, default=50)
    q.add_argument("--clip", type=float, default=1.0)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default=None, help="JSON file for the per-rank losses (written by rank 0)")
    args = q.parse_args(argv)
    try:
        r = parity(args)
        diff = max(abs(a - b) / max(abs(a), 1e-8) for a, b in zip(r["ddp"], r["deepspeed"]))
        print(f"rank {r['rank']}: ddp {r['ddp']}\nrank {r['rank']}: deepspeed {r['deepspeed']} "
              f"(max rel diff {diff:.2e})", flush=True)
    finally:
        destroy_process_group()
    return 0


if __name__ == "__main__":
    rc = main()
    # One CI run aborted here, after both ranks had printed matching losses and destroyed the group:
    # "terminate called without an active exception" (SIGABRT) during interpreter finalization, where
    # gloo's worker threads can still be torn down (see pytorch/pytorch#179291); 9 local reruns did not
    # reproduce it. Everything this process owes is written and flushed by now, so it leaves without
    # running finalizers: the test judges the losses, not the C++ teardown order.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
