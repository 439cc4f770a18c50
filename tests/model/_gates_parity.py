"""Fused-gate parity, run as a subprocess so TRITON_INTERPRET=1 is set before triton is imported
(triton reads it when a kernel is decorated). Prints one JSON line: max error per check."""
from __future__ import annotations

import itertools
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from sinkrec.ops.fused_gates import fused_gates


def supported_capabilities() -> list[str]:
    """The ATEN_CPU_CAPABILITY values this CPU can run, as torch itself detects them (x86-64)."""
    caps = ["default"]
    if torch.cpu._is_avx2_supported():
        caps.append("avx2")
    if torch.cpu._is_avx512_supported():
        caps.append("avx512")
    return caps


def make_inputs(B=2, T=7, H=2, K=8, V=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    tensors = {"q": unit(r(B, T, H, K)), "k": unit(r(B, T, H, K)), "v": r(B, T, H, V), "km": unit(r(B, T, H, K)),
               "vm": r(B, T, H, V), "a_x": r(B, T, H), "b_x": r(B, T, H), "l_x": r(B, T, H)}
    params = {"A_log": r(H).abs(), "dt_bias": r(H), "c_a": r(H), "c_b": r(H), "s_rho": r(H) * 3, "b_rho": r(H)}
    phi = torch.log1p(r(B, T).abs() * 5)
    return tensors, params, phi, mask


def run(backend, tensors, params, phi, mask, flags, grads):
    leaves = {n: t.clone().requires_grad_(True) for n, t in {**tensors, **params}.items()}
    out = fused_gates(leaves["q"], leaves["k"], leaves["v"], leaves["km"], leaves["vm"], leaves["a_x"],
                      leaves["b_x"], leaves["l_x"], phi, mask, leaves["A_log"], leaves["dt_bias"], leaves["c_a"],
                      leaves["c_b"], leaves["s_rho"], leaves["b_rho"], backend=backend, **flags)
    outs = [o for o in out if o is not None]
    torch.autograd.backward(outs, grads[: len(outs)])
    return outs, {n: (x.grad if x.grad is not None else torch.zeros_like(x)) for n, x in leaves.items()}


def main(backends: list[str], dtype: torch.dtype, all_flags: bool, sinkrec_only: bool = False) -> dict[str, float]:
    errs = {}
    combos = list(itertools.product([True, False], repeat=4))
    if not all_flags:  # the SinkRec default and plain GDN (compiling every combination takes minutes)
        combos = [(True, True, True, True), (False, True, True, True)]
    if sinkrec_only:
        combos = [(True, True, True, True)]
    for memory, purify_write, diff_read, temporal in combos:
        if not memory and (not purify_write or not diff_read):
            continue  # purify / diff are meaningless without memory
        flags = {"memory": memory, "purify_write": purify_write, "diff_read": diff_read, "temporal": temporal}
        tensors, params, phi, mask = make_inputs()
        tensors = {n: t.to(dtype) for n, t in tensors.items()}
        params = {n: t.to(dtype) for n, t in params.items()}
        gen = torch.Generator().manual_seed(1)
        shapes = [tensors["q"].shape, tensors["v"].shape, tensors["a_x"].shape, tensors["a_x"].shape,
                  tensors["a_x"].shape]
        if not memory:
            shapes = [tensors["q"].shape, tensors["v"].shape, *shapes[2:4]]
        grads = [torch.randn(*s, generator=gen, dtype=dtype) for s in shapes]
        ref_out, ref_grad = run("reference", tensors, params, phi, mask, flags, grads)
        for backend in backends:
            out, grad = run(backend, tensors, params, phi, mask, flags, grads)
            key = f"{backend}:" + ",".join(f"{k}={int(v)}" for k, v in flags.items())
            e = max((a - b).abs().max().item() for a, b in zip(out, ref_out))
            e_grad = max((grad[n] - ref_grad[n]).abs().max().item() for n in ref_grad)
            errs[key] = max(e, e_grad)
    return errs


if __name__ == "__main__":
    dtype = torch.float64 if "--float64" in sys.argv else torch.float32
    backends = [a for a in sys.argv[1:] if not a.startswith("--")]
    print(json.dumps(main(backends, dtype, all_flags="--all-flags" in sys.argv,
                          sinkrec_only="--sinkrec-only" in sys.argv)))
