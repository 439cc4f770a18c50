"""Fused TDGD gates: torch.compile and Triton (interpreted on CPU) equal the PyTorch reference,
forward and backward, for every switch combination (Triton) / the two main ones (compile)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sinkrec.ops.fused_gates import cpp_available, fused_gates, gates_reference, resolve_gate_backend

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_gates_parity.py")
sys.path.insert(0, str(SCRIPT.parent))
from _gates_parity import make_inputs, supported_capabilities


def _parity(*args: str, capability: str | None = None) -> dict[str, float]:
    # a subprocess: TRITON_INTERPRET must be set before triton is first imported
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if capability is not None:  # read by ATen's dispatch and by inductor's choice of vector ISA
        env["ATEN_CPU_CAPABILITY"] = capability
    res = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_matches_reference_forward_backward():
    errs = _parity("triton", "--all-flags")
    assert len(errs) == 10  # 8 memory-on combinations + 2 memory-off
    bad = {k: v for k, v in errs.items() if v > 1e-5}
    assert not bad, bad


def test_compile_matches_reference_forward_backward():
    errs = _parity("compile")
    assert len(errs) == 2
    bad = {k: v for k, v in errs.items() if v > 1e-5}
    assert not bad, bad


def _cross_isa_parity(writer: str, reader: str) -> dict[str, float]:
    """Compile under `writer`'s ISA (filling the inductor cache), then under `reader`'s: the
    reader must not reuse C++ generated for the writer's vector width (see ops/fused_gates/compile.py)."""
    _parity("compile", "--sinkrec-only", capability=writer)
    return _parity("compile", "--sinkrec-only", capability=reader)


def test_compile_ignores_cache_entries_of_another_isa():
    # the widest ISA writes, the unvectorised build reads: before the ISA was part of the cache key
    # the reader compiled AVX2/AVX-512 code without the vector headers and failed. (A CPU without
    # AVX2 has only "default": inductor never vectorises there, so no entry can mismatch.)
    errs = _cross_isa_parity(supported_capabilities()[-1], "default")
    assert len(errs) == 1 and max(errs.values()) <= 1e-5, errs


CROSS_ISA = [(w, r) for w in supported_capabilities()[1:] for r in supported_capabilities() if r != w]


@pytest.mark.slow
@pytest.mark.parametrize("writer, reader", CROSS_ISA or [("default", "default")], ids=lambda c: c)
def test_compile_ignores_cache_entries_of_another_isa_every_pair(writer, reader):
    # avx512 -> avx2 gave errors up to 5e32, avx2 -> avx512 corrupted the heap (torch 2.13)
    errs = _cross_isa_parity(writer, reader)
    assert len(errs) == 1 and max(errs.values()) <= 1e-5, errs


def test_reference_pads_freeze_the_state_and_switches_act():
    tensors, params, phi, mask = make_inputs()
    out = gates_reference(**tensors, phi=phi, mask=mask, **params)
    assert (out.g[~mask] == 0).all() and (out.beta[~mask] == 0).all()
    assert (out.g[mask] < 0).all() and (out.beta[mask] > 0).all()
    off = gates_reference(**tensors, phi=phi, mask=mask, **params, purify_write=False, diff_read=False)
    assert torch.equal(off.q, tensors["q"]) and torch.equal(off.v, tensors["v"])
    assert (off.beta[mask] > out.beta[mask]).all()  # purification only ever weakens the write
    no_time = gates_reference(**tensors, phi=phi, mask=mask, **params, temporal=False)
    assert not torch.allclose(no_time.g, out.g)
    gdn = gates_reference(**tensors, phi=phi, mask=mask, **params, memory=False)
    assert gdn.r is None and torch.equal(gdn.q, tensors["q"])


def test_dispatcher_rejects_unknown_backend():
    tensors, params, phi, mask = make_inputs()
    with pytest.raises(ValueError, match="gate_backend"):
        fused_gates(*tensors.values(), phi, mask, *params.values(), backend="cuda-magic")


def test_rho_bias_shifts_rho_per_position_and_only_where_it_can():
    tensors, params, phi, mask = make_inputs()
    B, T, H = tensors["a_x"].shape
    base = gates_reference(**tensors, phi=phi, mask=mask, **params)
    # a bias constant over positions is a shift of b_rho
    shift = torch.linspace(-1, 1, H)
    shifted = gates_reference(**tensors, phi=phi, mask=mask, **{**params, "b_rho": params["b_rho"] + shift})
    got = fused_gates(*tensors.values(), phi, mask, *params.values(), backend="reference",
                      rho_bias=shift.expand(B, T, H))
    for a, b in zip(got, shifted):
        torch.testing.assert_close(a, b)
    # a bias at one position changes that position only
    bias = torch.zeros(B, T, H)
    bias[0, -1] = 3.0
    one = fused_gates(*tensors.values(), phi, mask, *params.values(), backend="reference", rho_bias=bias)
    changed = (one.beta != base.beta).any(-1)
    assert changed[0, -1] and changed.sum() == 1
    with pytest.raises(ValueError, match="rho_bias must have shape"):
        fused_gates(*tensors.values(), phi, mask, *params.values(), backend="reference", rho_bias=bias[:, :1])
    with pytest.raises(ValueError, match="not implemented in the triton gate kernel"):
        fused_gates(*tensors.values(), phi, mask, *params.values(), backend="triton", rho_bias=bias)


def test_compile_takes_rho_bias_like_the_reference():
    tensors, params, phi, mask = make_inputs()
    bias = torch.randn(tensors["a_x"].shape)
    want = fused_gates(*tensors.values(), phi, mask, *params.values(), backend="reference", rho_bias=bias)
    got = fused_gates(*tensors.values(), phi, mask, *params.values(), backend="compile", rho_bias=bias)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


needs_cpp = pytest.mark.skipif(not cpp_available(), reason="the C++ gates do not build here (no compiler)")


@needs_cpp
def test_cpp_matches_reference_forward_backward_every_switch():
    from _gates_parity import main

    errs = main(["cpp"], torch.float32, all_flags=True)
    assert len(errs) == 10
    bad = {k: v for k, v in errs.items() if v > 1e-5}
    assert not bad, bad


@needs_cpp
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpp_takes_strided_views_and_rho_bias_like_the_reference(with_bias):
    """TDGD passes q, k as halves of one l2-normed tensor, a_x, b_x as slices of a projection and vm as a
    slice of another: strided views. Values and every gradient equal the reference's."""
    torch.manual_seed(0)
    B, T, H, K = 3, 9, 2, 8
    qk = torch.nn.functional.normalize(torch.randn(B, T, 2 * H, K), dim=-1).requires_grad_(True)
    ab = torch.randn(B, T, 2 * H, requires_grad=True)
    mkv = torch.randn(B, T, 2 * H * K, requires_grad=True)
    v, l_x = torch.randn(B, T, H, K, requires_grad=True), torch.randn(B, T, H, requires_grad=True)
    params = [torch.randn(H, requires_grad=True) for _ in range(6)]
    phi, mask = torch.rand(B, T), torch.ones(B, T, dtype=torch.bool)
    mask[0, :4] = False
    bias = torch.randn(B, T, H, requires_grad=True) if with_bias else None

    def run(backend):
        q, k = qk.split(H, dim=-2)
        a_x, b_x = ab.split(H, dim=-1)
        km, vm = mkv.split(H * K, dim=-1)
        km = torch.nn.functional.normalize(km.unflatten(-1, (H, K)), dim=-1)
        out = fused_gates(q, k, v, km, vm.unflatten(-1, (H, K)), a_x, b_x, l_x, phi, mask, *params,
                          backend=backend, rho_bias=bias)
        leaves = [qk, ab, mkv, v, l_x, *params] + ([bias] if with_bias else [])
        gen = torch.Generator().manual_seed(1)
        grads = torch.autograd.grad(out, leaves, [torch.randn(o.shape, generator=gen) for o in out])
        return [o.detach() for o in out], grads

    for a, b in zip(run("cpp"), run("reference")):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_dispatcher_picks_cpp_on_float32_cpu_and_refuses_what_it_cannot_run():
    q = make_inputs()[0]["q"].float()
    assert resolve_gate_backend("auto", q) == ("cpp" if cpp_available() else "reference")
    assert resolve_gate_backend("auto", q.double()) == "reference"
    assert resolve_gate_backend("auto", q, rho_bias=True) == ("cpp" if cpp_available() else "reference")
    with pytest.raises(ValueError, match="gate_backend='cpp' runs float32 CPU tensors"):
        resolve_gate_backend("cpp", q.bfloat16())


@needs_cpp
def test_cpp_on_two_threads_equals_reference():
    """Several blocks of positions split over two threads: the [H] parameters' per-thread partial
    gradients add up to the reference's."""
    tensors, params, phi, mask = make_inputs(B=3, T=300, H=2, K=16, V=16)
    leaves = {n: t.float().requires_grad_(True) for n, t in {**tensors, **params}.items()}
    threads = torch.get_num_threads()

    def run(backend):
        out = fused_gates(*list(leaves.values())[:8], phi, mask, *list(leaves.values())[8:], backend=backend)
        gen = torch.Generator().manual_seed(1)
        return [*out, *torch.autograd.grad(out, list(leaves.values()),
                                           [torch.randn(o.shape, generator=gen) for o in out])]

    torch.set_num_threads(2)
    try:
        got = run("cpp")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(got, run("reference")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
