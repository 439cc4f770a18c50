"""Tiny configs and synthetic batches for the model tests (fast on 2 CPU cores).

A uniquely named module (not conftest.py): several test folders have a conftest.py, and
`from conftest import ...` would pick whichever was imported last."""
from __future__ import annotations

import torch

from sinkrec.model import SinkRecConfig, build_model


def tiny_config(arch: str = "sinkrec", **overrides) -> SinkRecConfig:
    base = {"num_items": 40, "arch": arch, "d_model": 32, "n_heads": 2, "n_blocks": 2, "n_loops": 2,
            "max_len": 64, "dropout": 0.0, "n_codes": 16, "kernel_backend": "chunk", "gate_backend": "reference"}
    return SinkRecConfig(**{**base, **overrides})


def random_batch(B: int = 3, T: int = 20, N: int = 40, pads: tuple[int, ...] = (5, 0, 2), seed: int = 0):
    """Left-padded items [B, T] and non-decreasing timestamps [B, T] (0 at pads)."""
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N + 1, (B, T), generator=gen)
    gaps = torch.randint(0, 3 * 3600, (B, T), generator=gen)
    ts = 1_700_000_000 + torch.cumsum(gaps, 1)
    for b, p in enumerate(pads[:B]):
        items[b, :p] = 0
    ts = ts * (items != 0)
    return items, ts


def left_pad(items: torch.Tensor, ts: torch.Tensor, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.zeros(items.shape[0], extra, dtype=items.dtype)
    return torch.cat([z, items], 1), torch.cat([z, ts], 1)


def habit_drift_batch(B: int, T: int, N: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """SinkBench-like sequences: each user has 3 habit items revisited about every 6th event
    (e.g. a daily show) and dynamic items drawn from a catalogue window that drifts over time."""
    gen = torch.Generator().manual_seed(seed)
    items = torch.empty(B, T, dtype=torch.long)
    for b in range(B):
        habits = torch.randint(1, N + 1, (3,), generator=gen)
        start = int(torch.randint(1, N // 2, (1,), generator=gen))
        for t in range(T):
            if torch.rand((), generator=gen) < 0.35:
                items[b, t] = habits[t % 3]
            else:
                lo = (start + t // 4) % (N - 10) + 1  # drifting window of 10 items
                items[b, t] = lo + int(torch.randint(0, 10, (1,), generator=gen))
    gaps = torch.randint(60, 6 * 3600, (B, T), generator=gen)
    return items, 1_700_000_000 + torch.cumsum(gaps, 1)


def make(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_config(arch, **overrides))


def train_next_item(model, items: torch.Tensor, ts: torch.Tensor, steps: int, lr: float) -> None:
    """`steps` Adam steps of next-item prediction on one batch (inputs items[:, :-1], targets items[:, 1:])."""
    inputs, targets = items[:, :-1], items[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss, _ = model.loss(model(inputs, ts[:, :-1]), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()


def memorise(model, items: torch.Tensor, ts: torch.Tensor, max_steps: int, lr: float = 1e-2,
             ce_target: float = 0.05) -> float:
    """Adam on one left-padded batch (targets items[:, 1:], none after a pad input) until the CE is
    below `ce_target` or `max_steps` steps ran; returns the last CE."""
    inputs, targets = items[:, :-1], items[:, 1:] * (items[:, :-1] != 0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(max_steps):
        loss, parts = model.loss(model(inputs, ts[:, :-1]), targets)
        if parts["ce"] < ce_target:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(parts["ce"])
