"""One layer, two commits, side by side: is a kernel change faster? (`make bench-layer-ab BASE=<rev>`)

    python -m benchmarks.layer_ab --base HEAD~1                          # TDGD layer and chunk op, T 4096 / 16384
    python -m benchmarks.layer_ab --base 88efdaa --kinds op --seq-lens 200 --rounds 8

BASE is checked out into a temporary git worktree. Each round runs every case once in BASE and once
in this checkout, alternating, each in a fresh one-thread subprocess with that tree first on
PYTHONPATH (the case code is this file's, so both trees run the same harness). A round's case is
the median of --reps timed fwd+bwd calls after two warm-ups. Alternating rounds is what makes the
ratio usable on a shared machine: load from other jobs lands on both sides alike, while a single
before/after pair measured minutes apart can differ by 15% from load alone.

Cases (16,384 tokens per batch, d_model 64, 2 heads, as `benchmarks/layer.py`):
    layer   TDGD as the trainer runs it (every backend `auto`): one sublayer's residual update
    op      the chunked delta rule alone (`gated_delta_rule(..., backend="auto")`: chunk.py, or the C++
            kernel in a checkout that has one)
Printed: per case, the median over rounds of each side, and BASE / this checkout (> 1: faster here)
with the range of the per-round ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENS, D_MODEL, N_HEADS = 16384, 64, 2


def _child(kind: str, T: int, reps: int, tokens: int = TOKENS) -> float:
    """Median ms of one case, in whatever `sinkrec` PYTHONPATH resolves to."""
    import time

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    torch.manual_seed(0)
    B = max(1, tokens // T)
    if kind == "layer":
        from sinkrec.config import SinkRecConfig
        from sinkrec.layers import TDGD

        layer = TDGD(SinkRecConfig(num_items=1, d_model=D_MODEL, n_heads=N_HEADS, kernel_backend="auto",
                                   gate_backend="auto").validate())
        h = torch.randn(B, T, D_MODEL, requires_grad=True)
        dy, m = torch.randn(B, T, D_MODEL), torch.randn(B, T, D_MODEL)
        phi, mask = torch.rand(B, T), torch.ones(B, T, dtype=torch.bool)

        def step():
            h.grad = None
            layer.zero_grad(set_to_none=True)
            layer(h, m, phi, mask)[0].backward(dy)
    elif kind == "op":
        from sinkrec.ops import gated_delta_rule

        H, K = N_HEADS, D_MODEL // N_HEADS
        q = F.normalize(torch.randn(B, T, H, K), dim=-1).requires_grad_()
        k = F.normalize(torch.randn(B, T, H, K), dim=-1).requires_grad_()
        v = torch.randn(B, T, H, K, requires_grad=True)
        g = (-torch.rand(B, T, H) * 0.1).requires_grad_()
        beta = torch.rand(B, T, H, requires_grad=True)
        do = torch.randn(B, T, H, K)

        def step():
            o, _ = gated_delta_rule(q, k, v, g, beta, scale=1.0, backend="auto")
            o.backward(do)
    else:
        raise SystemExit(f"layer_ab: unknown case {kind!r}")
    for _ in range(2):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _run(tree: Path, kind: str, T: int, reps: int, tokens: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(T), str(reps), str(tokens)]
    res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"layer_ab: {kind} T={T} in {tree} failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(f"{_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])):.3f}")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the commit to compare this checkout with")
    ap.add_argument("--kinds", nargs="+", default=["layer", "op"], choices=["layer", "op"])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--rounds", type=int, default=6, help="alternations of BASE and this checkout")
    ap.add_argument("--reps", type=int, default=7, help="timed calls per subprocess (median)")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="B * T per batch")
    args = ap.parse_args(argv)
    rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.strip()
    here = f"{head}{' + uncommitted changes' if dirty else ''}"
    print(f"BASE {rev} vs this checkout ({here}); {args.rounds} alternating rounds, one thread, "
          f"median of {args.reps} fwd+bwd per round, {args.tokens} tokens per batch")
    print("| case | T | BASE ms | this ms | BASE / this (per-round range) |")
    print("|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory(prefix="layer-ab-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for kind in args.kinds:
                for T in args.seq_lens:
                    a, b = [], []
                    for _ in range(args.rounds):
                        a.append(_run(base, kind, T, args.reps, args.tokens))
                        b.append(_run(ROOT, kind, T, args.reps, args.tokens))
                    ratios = [x / y for x, y in zip(a, b)]
                    print(f"| {kind} | {T} | {statistics.median(a):.1f} | {statistics.median(b):.1f} | "
                          f"{statistics.median(a) / statistics.median(b):.2f}x "
                          f"({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
