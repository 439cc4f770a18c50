"""One-layer forward+backward: SASRec attention (SDPA) vs TDGD (chunk / recurrent delta rule) vs
ELASTIC (linear dispatcher attention, alone and with the product-key interest memory).

    python -m benchmarks.layer            (make bench-layer)   full run, writes bench_results/layer.json
    python -m benchmarks.layer --quick    T in {200, 1024} only
    python -m benchmarks.layer --seq-lens 200 1024 --kinds sdpa elastic   any subset

Layers (all d_model = 64, 2 heads, the residual update of one sublayer, no FFN):
    sdpa            CausalSelfAttention with is_causal and no mask: SDPA's fused (flash) CPU kernel,
                    the best case for SASRec
    sdpa_masked     the same layer as sinkrec.model.SASRec runs it: a [B, 1, T, T] causal & key-is-real
                    mask built per call, so SDPA takes its O(T^2)-memory math path
    tdgd_chunk      TDGD (SinkRec's layer) as the trainer runs it: every op on its `auto` backend, i.e. on
                    CPU the C++ kernels (chunked delta rule, gates, short conv, gated output norm) where
                    they build; `SINKREC_NO_CPP=1 python -m benchmarks.layer` measures the PyTorch paths
                    (chunk.py etc.). tdgd_recurrent: the per-step delta rule
    tdgd_chunk_conv1d  tdgd_chunk with its short conv on the F.conv1d reference (conv_backend=reference)
                    instead of the [B, T, C] fast path: the gain of sinkrec/ops/short_conv side by side
    elastic_lda     ELASTIC's linear dispatcher attention (32 dispatchers per head), chunked
    elastic         elastic_lda, then the product-key memory (128^2 slots, top 8) on its output
Besides fwd+bwd, every case except tdgd_recurrent also times a no-grad forward (inference).

Every case runs in its own subprocess, so its peak memory is the increase of the process's
peak resident set size (getrusage ru_maxrss) over the baseline taken after imports, weights
and inputs exist and before the first forward. That counts every byte the process touched
(tensors, autograd buffers, kernel workspaces), whatever allocator is in use; it cannot go
below the pages the allocator keeps, so small cases read a few MB high.
Tokens per batch are fixed (B * T = 16384), d_model = 64, 2 heads (K = V = 32).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

D_MODEL, N_HEADS, TOKENS = 64, 2, 16384
SEQ_LENS = (200, 1024, 4096, 16384)  # B = TOKENS // T (81 x 200 = 16,200 tokens at T = 200)
KINDS = ("sdpa", "sdpa_masked", "tdgd_chunk", "tdgd_chunk_conv1d", "tdgd_recurrent", "elastic_lda", "elastic")
RESULTS = Path("bench_results/layer.json")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _timeit(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# ---- cases (each runs inside its own subprocess) ----
def _layer_case(kind: str, T: int, reps: int) -> dict:
    from sinkrec.config import SinkRecConfig
    from sinkrec.layers import TDGD, LinearDispatcherAttention
    from sinkrec.model import CausalSelfAttention
    from sinkrec.modules import ProductKeyMemory

    torch.manual_seed(0)
    B = TOKENS // T
    h = torch.randn(B, T, D_MODEL, requires_grad=True)
    dy = torch.randn(B, T, D_MODEL)
    mask = torch.ones(B, T, dtype=torch.bool)
    if kind == "sdpa":
        layer = CausalSelfAttention(D_MODEL, N_HEADS, dropout=0.0)
        run = lambda: layer(h)
    elif kind == "sdpa_masked":
        layer = CausalSelfAttention(D_MODEL, N_HEADS, dropout=0.0)

        def run():  # the mask of SASRec.forward, built per call as the model does
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            eye = torch.eye(T, dtype=torch.bool)
            return layer(h, ((causal & mask[:, None, :]) | eye)[:, None])
    elif kind.startswith("elastic"):
        lda = LinearDispatcherAttention(SinkRecConfig(num_items=1, arch="elastic", d_model=D_MODEL, n_heads=N_HEADS,
                                                      n_dispatchers=32).validate())
        pkm = ProductKeyMemory(D_MODEL, n_keys=128, topk=8) if kind == "elastic" else None
        layer = torch.nn.ModuleList([lda] + ([pkm] if pkm else []))

        def run():
            y = lda(h, mask)[0]
            return y if pkm is None else y + pkm(h + y)  # the block's second residual sublayer
    else:
        backend = "recurrent" if kind == "tdgd_recurrent" else "auto"  # tdgd_chunk*: the trainer's choice
        conv = "reference" if kind.endswith("_conv1d") else "auto"
        layer = TDGD(SinkRecConfig(num_items=1, d_model=D_MODEL, n_heads=N_HEADS, kernel_backend=backend,
                                   gate_backend="auto", conv_backend=conv).validate())
        m = torch.randn(B, T, D_MODEL)  # retrieved memory value, as the block passes it
        phi = torch.rand(B, T)
        run = lambda: layer(h, m, phi, mask)[0]

    def fwd_bwd():
        h.grad = None
        layer.zero_grad(set_to_none=True)
        run().backward(dy)

    base = _peak_rss_mb()
    times = _timeit(fwd_bwd, reps)
    out = {"median_ms": 1e3 * statistics.median(times), "peak_mb": _peak_rss_mb() - base, "B": B, "reps": reps}
    if kind != "tdgd_recurrent":  # after the peak is read: a forward without autograd needs less
        with torch.no_grad():
            out["infer_ms"] = 1e3 * statistics.median(_timeit(run, reps))
    return out


def _chunk_flops(B: int, T: int, H: int, K: int, V: int, C: int) -> float:
    """Matmul FLOPs of one chunked forward (WY form), counted from the algorithm in
    sinkrec/ops/gated_delta/chunk.py: per chunk and head, K K^T and Q K^T (2 C^2 K each), the
    triangular solve for [beta V | beta K] (C^2 (V + K)), (Q K^T o M) U (2 C^2 V), and the
    three state products Q S0, K S0, K^T U (2 C K V each). The backward is counted as 2x."""
    n_chunks = -(-T // C)
    per_chunk = 4 * C * C * K + C * C * (V + K) + 2 * C * C * V + 6 * C * K * V
    return 3 * B * H * n_chunks * per_chunk


def _op_case(T: int, reps: int) -> dict:
    """The chunk delta-rule op alone, forward + backward, for the GFLOP/s figure."""
    from sinkrec.ops import gated_delta_rule
    from sinkrec.ops.gated_delta.chunk import CHUNK_SIZE

    torch.manual_seed(0)
    B, H, K = TOKENS // T, N_HEADS, D_MODEL // N_HEADS
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1).requires_grad_()
    v = torch.randn(B, T, H, K, requires_grad=True)
    g = (-torch.rand(B, T, H) * 0.1).requires_grad_()
    beta = torch.rand(B, T, H, requires_grad=True)
    do = torch.randn(B, T, H, K)

    def fwd_bwd():
        o, _ = gated_delta_rule(q, k, v, g, beta, backend="auto")  # the C++ kernel where it builds
        o.backward(do)

    times = _timeit(fwd_bwd, reps)
    sec = statistics.median(times)
    flops = _chunk_flops(B, T, H, K, K, CHUNK_SIZE)
    return {"median_ms": 1e3 * sec, "gflops": flops / sec / 1e9}


def _matmul_peak(reps: int) -> dict:
    """torch.matmul throughput at a large square size (the practical peak of this CPU) and at
    the chunk kernel's own shape (a batch of 64 x 64 by 64 x 32 products)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    big = statistics.median(_timeit(lambda: torch.matmul(a, b), reps))
    x, y = torch.randn(512, 64, 64), torch.randn(512, 64, 32)
    small = statistics.median(_timeit(lambda: torch.matmul(x, y), reps))
    return {"square_2048_gflops": 2 * 2048 ** 3 / big / 1e9,
            "batched_64x64x32_gflops": 2 * 512 * 64 * 64 * 32 / small / 1e9}


def _gates_case(backend: str, reps: int) -> dict:
    """Fused gates forward + backward at the benchmark's token count (B * T = 16384)."""
    from sinkrec.ops.fused_gates import fused_gates

    torch.manual_seed(0)
    B, T, H, K = 16, 1024, N_HEADS, D_MODEL // N_HEADS
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s), dim=-1).requires_grad_()
    q, k, km = unit(B, T, H, K), unit(B, T, H, K), unit(B, T, H, K)
    v, vm = torch.randn(B, T, H, K, requires_grad=True), torch.randn(B, T, H, K, requires_grad=True)
    a_x, b_x, l_x = (torch.randn(B, T, H, requires_grad=True) for _ in range(3))
    params = [torch.randn(H, requires_grad=True) for _ in range(6)]
    phi, mask = torch.rand(B, T), torch.ones(B, T, dtype=torch.bool)

    def fwd_bwd():
        out = fused_gates(q, k, v, km, vm, a_x, b_x, l_x, phi, mask, *params, backend=backend)
        sum(o.sum() for o in out).backward()

    t0 = time.perf_counter()
    fwd_bwd()  # the first call compiles for backend="compile"
    first = time.perf_counter() - t0
    times = _timeit(fwd_bwd, reps, warmup=2)
    return {"median_ms": 1e3 * statistics.median(times), "first_call_s": first}


def _run_case(args: list[str], timeout: int = 600) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.layer", "--threads", str(torch.get_num_threads()), "--case", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"rc={res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T in {200, 1024} only")
    ap.add_argument("--seq-lens", type=int, nargs="+", help=f"sequence lengths (default {SEQ_LENS})")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="layers to measure")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--recurrent-max-t", type=int, default=4096,
                    help="run the per-step recurrent backend up to this T; extrapolate linearly beyond")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")),
                    help="torch threads per case (default 1: on a shared machine spin-waiting OpenMP "
                         "threads make multi-threaded timings swing by 10-40x)")
    ap.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:  # child process: one measurement, one JSON line
        name, *rest = args.case
        if name == "layer":
            out = _layer_case(rest[0], int(rest[1]), int(rest[2]))
        elif name == "op":
            out = _op_case(int(rest[0]), int(rest[1]))
        elif name == "matmul":
            out = _matmul_peak(int(rest[0]))
        else:
            out = _gates_case(rest[0], int(rest[0 + 1]))
        print(json.dumps(out))
        return

    seq_lens = args.seq_lens or (SEQ_LENS[:2] if args.quick else SEQ_LENS)
    results = {"config": {"d_model": D_MODEL, "n_heads": N_HEADS, "tokens_per_batch": TOKENS,
                          "reps": args.reps, "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "cpu": platform.processor() or platform.machine(),
                          "memory_method": "ru_maxrss delta per subprocess (see module docstring)"},
               "layer": [], "chunk_op": [], "notes": []}
    tdgd_extras = "tdgd_chunk" in args.kinds  # the chunk op's GFLOP/s and the fused-gates backends
    results["matmul"] = _run_case(["matmul", str(args.reps)]) if tdgd_extras else {}
    for T in seq_lens:
        for kind in args.kinds:
            if kind == "tdgd_recurrent" and T > args.recurrent_max_t:
                prev = next((r for r in results["layer"] if r["kind"] == kind and r["T"] == args.recurrent_max_t
                             and "median_ms" in r), None)
                if prev is None:
                    continue
                # fixed tokens per batch: the per-step loop runs T steps over B = TOKENS / T rows,
                # so time grows ~linearly in T (each step's work shrinks only with B)
                est = prev["median_ms"] * T / args.recurrent_max_t
                results["layer"].append({"kind": kind, "T": T, "median_ms": est, "peak_mb": None,
                                         "extrapolated": True})
                results["notes"].append(f"tdgd_recurrent at T={T} extrapolated linearly from T={args.recurrent_max_t}")
                continue
            reps = 1 if kind == "tdgd_recurrent" else args.reps
            r = _run_case(["layer", kind, str(T), str(reps)])
            results["layer"].append({"kind": kind, "T": T, **r})
            print(f"  {kind:15s} T={T:6d} {r}", flush=True)
        if tdgd_extras:
            results["chunk_op"].append({"T": T, **_run_case(["op", str(T), str(args.reps)])})
    if tdgd_extras:
        results["gates"] = {b: _run_case(["gates", b, str(max(args.reps, 5))]) for b in ("reference", "compile", "cpp")}

    results["goals"] = [{"goal": n, "measured": g, "target": w} for n, g, w in _goals(results)]
    results["vs_sasrec"] = _vs_sasrec(results)
    _report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


def _ratio(by: dict, slow: str, fast: str, T: int) -> float:
    a, b = by.get((slow, T), {}), by.get((fast, T), {})
    return a["median_ms"] / b["median_ms"] if "median_ms" in a and "median_ms" in b else float("nan")


def _goals(res: dict) -> list[tuple[str, float, float]]:
    """(goal, measured, target) for the issue's speed goals."""
    by = {(r["kind"], r["T"]): r for r in res["layer"]}
    return [("chunk vs SDPA at T=4096", _ratio(by, "sdpa", "tdgd_chunk", 4096), 3.0),
            ("chunk vs SDPA at T=16384", _ratio(by, "sdpa", "tdgd_chunk", 16384), 10.0),
            ("chunk vs recurrent at T=4096", _ratio(by, "tdgd_recurrent", "tdgd_chunk", 4096), 20.0)]


LABELS = {"sdpa": "SDPA fused", "sdpa_masked": "SDPA masked", "tdgd_chunk": "TDGD chunk",
          "tdgd_chunk_conv1d": "TDGD chunk, conv1d",
          "tdgd_recurrent": "TDGD recurrent", "elastic_lda": "ELASTIC LDA", "elastic": "ELASTIC LDA+IMR"}


def _vs_sasrec(res: dict) -> list[dict]:
    """Each layer's fwd+bwd time, peak memory and inference time as a multiple of each SASRec form's
    (< 1 = cheaper than SASRec)."""
    by = {(r["kind"], r["T"]): r for r in res["layer"]}
    rows = []
    for (kind, T), r in by.items():
        if kind.startswith("sdpa") or "median_ms" not in r:
            continue
        row = {"kind": kind, "T": T}
        for ref in ("sdpa", "sdpa_masked"):
            s = by.get((ref, T), {})
            for key in ("median_ms", "peak_mb", "infer_ms"):
                ok = r.get(key) is not None and s.get(key) and not r.get("extrapolated")
                row[f"{key}/{ref}"] = r[key] / s[key] if ok else None
        rows.append(row)
    return rows


def _report(res: dict) -> None:
    by = {(r["kind"], r["T"]): r for r in res["layer"]}
    Ts = sorted({r["T"] for r in res["layer"]})
    kinds = [k for k in KINDS if any(r["kind"] == k for r in res["layer"])]
    print(f"\nOne layer fwd+bwd, d={D_MODEL}, H={N_HEADS}, ~{TOKENS} tokens/batch (B = {TOKENS} // T), "
          f"{res['config']['threads']} threads; median ms (peak MB above baseline) / no-grad forward ms")
    print("| T | " + " | ".join(LABELS[k] for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for T in Ts:
        cells = []
        for kind in kinds:
            r = by.get((kind, T), {})
            if "median_ms" not in r:
                cells.append(r.get("error", "-")[:40])
                continue
            mem = "extrap." if r.get("extrapolated") else f"{r['peak_mb']:.0f} MB"
            inf = f" / {r['infer_ms']:.0f}" if r.get("infer_ms") is not None else ""
            cells.append(f"{r['median_ms']:.0f} ({mem}){inf}")
        print(f"| {T} | " + " | ".join(cells) + " |")

    rows = [r for r in res["vs_sasrec"] if r["kind"] != "tdgd_recurrent"]
    if rows:
        print("\nvs SASRec attention (x of SDPA fused / x of SDPA masked; < 1 = cheaper):")
        print("| T | layer | fwd+bwd time | peak memory | inference time |")
        print("|---|---|---|---|---|")
        fmt = lambda x: "-" if x is None else f"{x:.2f}"
        for r in sorted(rows, key=lambda r: (r["T"], KINDS.index(r["kind"]))):
            cells = [f"{fmt(r[f'{key}/sdpa'])} / {fmt(r[f'{key}/sdpa_masked'])}"
                     for key in ("median_ms", "peak_mb", "infer_ms")]
            print(f"| {r['T']} | {LABELS[r['kind']]} | " + " | ".join(cells) + " |")

    mm = res.get("matmul", {})
    if res["chunk_op"]:
        print(f"\nchunk delta-rule op alone (fwd+bwd), achieved vs torch.matmul "
              f"(square 2048: {mm.get('square_2048_gflops', float('nan')):.1f} GFLOP/s, "
              f"batched 64x64x32: {mm.get('batched_64x64x32_gflops', float('nan')):.1f} GFLOP/s)")
    for r in res["chunk_op"]:
        if "gflops" in r:
            print(f"  T={r['T']:6d}  {r['median_ms']:8.1f} ms  {r['gflops']:6.1f} GFLOP/s "
                  f"({100 * r['gflops'] / mm.get('square_2048_gflops', float('nan')):.0f}% of square-matmul peak)")
    g = res.get("gates", {})
    if g and all("median_ms" in x for x in g.values()):
        print(f"\nfused gates fwd+bwd (16 x 1024 tokens): eager {g['reference']['median_ms']:.2f} ms, "
              f"torch.compile {g['compile']['median_ms']:.2f} ms "
              f"({g['reference']['median_ms'] / g['compile']['median_ms']:.2f}x; first call compiles in "
              f"{g['compile']['first_call_s']:.1f} s), C++ {g['cpp']['median_ms']:.2f} ms")
    print("\ngoals (speed-up of TDGD chunk):")
    for name, got, want in _goals(res):
        verdict = "met" if got >= want else ("not measured" if math.isnan(got) else "NOT met")
        print(f"  {name:30s} {got:6.1f}x (goal >= {want:.0f}x): {verdict}")
    for n in res["notes"]:
        print("note:", n)


if __name__ == "__main__":
    main()
