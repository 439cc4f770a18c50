"""Forward+backward timing of the delta-rule backends against causal softmax attention (SDPA).

A fixed number of tokens per batch (B * T = --tokens), model width d = H * K split over H heads,
like a SinkRec / GDN / SASRec layer would see it. Reports the best of --reps runs (a shared
machine only ever adds time). Usage:

    python -m benchmarks.ops --lengths 1024 4096 16384 --tokens 16384 --heads 2 --head-dim 32
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sinkrec.ops import gated_delta_rule


def best_ms(fn: Callable[[], None], reps: int) -> float:
    fn()  # warm-up: allocator, thread pool, lazy inits
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def bench_length(T: int, tokens: int, H: int, K: int, reps: int, recurrent_max_T: int) -> dict[str, float]:
    B = max(1, tokens // T)
    q = F.normalize(torch.randn(B, T, H, K), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(B, T, H, K), dim=-1).requires_grad_()
    v = torch.randn(B, T, H, K, requires_grad=True)
    g = F.logsigmoid(torch.randn(B, T, H) + 2).requires_grad_()
    beta = torch.rand(B, T, H, requires_grad=True)
    do = torch.randn(B, T, H, K)

    def delta(backend: str) -> Callable[[], None]:
        def run() -> None:
            o, _ = gated_delta_rule(q, k, v, g, beta, backend=backend)
            o.backward(do)

        return run

    qa, ka, va = (torch.randn(B, H, T, K, requires_grad=True) for _ in range(3))  # [B, H, T, K]
    do_a = torch.randn(B, H, T, K)

    def sdpa() -> None:
        F.scaled_dot_product_attention(qa, ka, va, is_causal=True).backward(do_a)

    out = {"B": B, "chunk": best_ms(delta("chunk"), reps), "sdpa": best_ms(sdpa, max(1, reps // 2))}
    if T <= recurrent_max_T:
        out["recurrent"] = best_ms(delta("recurrent"), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--tokens", type=int, default=16384, help="B * T, fixed across lengths")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32, help="K = V")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--recurrent-max-T", type=int, default=4096, help="skip the slow reference above this T")
    args = p.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, H={args.heads} K=V={args.head_dim}, "
        f"B*T={args.tokens}; fwd+bwd ms, best of {args.reps}"
    )
    for T in args.lengths:
        r = bench_length(T, args.tokens, args.heads, args.head_dim, args.reps, args.recurrent_max_T)
        line = f"T={T:6d} B={r['B']:3d}  chunk {r['chunk']:8.1f}  sdpa {r['sdpa']:8.1f} (x{r['sdpa'] / r['chunk']:.1f})"
        if "recurrent" in r:
            line += f"  recurrent {r['recurrent']:9.1f} (x{r['recurrent'] / r['chunk']:.1f})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
