"""Strategy choice and process-group teardown.

Strategy ("auto"): DeepSpeed ZeRO-2 (conf/deepspeed/zero2.json) when CUDA is present; DDP over
gloo on CPU when the world has more than one process; a single process otherwise.

Lightning's DeepSpeedStrategy refuses CPUs, so the DeepSpeed path is proven on CPU by a parity test
(tests/train/distributed_parity.py, run by tests/train/test_distributed.py).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def destroy_process_group(barrier: bool = True) -> None:
    """Leave the process group cleanly: gloo aborts at interpreter exit ("terminate called without an
    active exception") about one run in three when the group is still alive. After an error, no
    barrier: a peer that died or hangs would turn it into a second error hiding the first."""
    if dist.is_available() and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def env_world_size(devices: Any = None, num_nodes: int = 1) -> int:
    """World size before the trainer exists: torchrun's WORLD_SIZE, else devices x num_nodes."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    n = devices if isinstance(devices, int) else (len(devices) if isinstance(devices, list) else 1)
    return max(1, n) * max(1, num_nodes)


DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


def choose_strategy(requested: Any, deepspeed_config: str, world_size: int,
                    timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> tuple[Any, str]:
    """(strategy for the Trainer, one line describing it). Only "auto" (and plain "ddp") is decided here.

    `timeout` bounds every collective (gloo/NCCL): a rank that died or hangs ends the job after it,
    instead of torch's default (30 min gloo, 10 min NCCL)."""
    if requested == "ddp" and world_size > 1:
        from lightning.pytorch.strategies import DDPStrategy

        line = f"strategy: ddp (trainer.strategy, world size {world_size}, timeout {timeout.total_seconds():g} s)"
        return DDPStrategy(timeout=timeout), line
    if requested != "auto":
        if isinstance(requested, str) and requested.startswith("deepspeed") and not torch.cuda.is_available():
            raise ValueError(
                f"trainer.strategy={requested!r} needs CUDA: Lightning's DeepSpeedStrategy refuses CPUs. "
                "Use trainer.strategy=auto or ddp on CPU (the DeepSpeed path is proven on CPU by "
                "tests/train/distributed_parity.py)."
            )
        return requested, f"strategy: {requested} (trainer.strategy, world size {world_size})"
    if torch.cuda.is_available():
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if not Path(deepspeed_config).is_file():
            raise FileNotFoundError(f"deepspeed_config={deepspeed_config!r}: no such file (see conf/deepspeed/)")
        line = (f"strategy: deepspeed ZeRO stage {_zero_stage(deepspeed_config)} ({deepspeed_config}), "
                f"CUDA, world size {world_size}")
        return DeepSpeedStrategy(config=deepspeed_config, timeout=timeout), line
    if world_size > 1:
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="gloo", timeout=timeout), \
            f"strategy: ddp (gloo, CPU), world size {world_size}, collective timeout {timeout.total_seconds():g} s"
    return "auto", "strategy: single process on CPU (ddp/gloo is chosen when the world size is > 1)"


def _zero_stage(path: str) -> int:
    return int(json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0))
