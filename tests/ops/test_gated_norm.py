"""TDGD's gated output norm RMSNorm(x) * SiLU(g): the C++ loop and the PyTorch fast path equal the
definition (values and the gradients of x, g and the weight), and the dispatcher says what is wrong."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sinkrec.ops.gated_norm import (
    cpp_available,
    gated_rms_norm,
    gated_rms_norm_reference,
    resolve_gated_norm_backend,
)

needs_cpp = pytest.mark.skipif(not cpp_available(), reason="the C++ gated norm does not build here (no compiler)")


def _by_definition(x, g, w, eps):
    """Row by row in float64: x / sqrt(mean(x^2) + eps) * w * g * sigmoid(g)."""
    x, g, w = x.double(), g.double(), w.double()
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w * g / (1 + (-g).exp())


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("shape", [(3, 7, 2, 32), (5, 64), (1, 0, 2, 8), (4, 3, 1, 5)])
def test_backend_equals_reference_values_and_grads(backend, shape):
    torch.manual_seed(sum(shape))
    x = torch.randn(*shape)
    if x.numel():
        x[0, 0] = 0  # an all-zero row (a pad position): stays zero, finite gradients
    base = torch.randn(*shape[:-1], 2 * shape[-1] + 1)
    x.requires_grad_(True)
    base.requires_grad_(True)
    g = base[..., 1 : shape[-1] + 1]  # strided, as TDGD's gate is a slice of a projection
    w = (1 + 0.5 * torch.randn(shape[-1])).requires_grad_(True)
    want = gated_rms_norm_reference(x, g, w, 1e-6)
    got = gated_rms_norm(x, g, w, 1e-6, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want.double(), _by_definition(x.detach(), g.detach(), w.detach(), 1e-6),
                               rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (x, base, w), dy), torch.autograd.grad(want, (x, base, w), dy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_cpp
def test_cpp_weight_grad_alone_and_no_grad_forward():
    """Only the weight wants a gradient (a frozen input), and a no-grad forward: the same numbers."""
    torch.manual_seed(0)
    x, g = torch.randn(6, 16), torch.randn(6, 16)
    w = torch.randn(16, requires_grad=True)
    (dw,) = torch.autograd.grad(gated_rms_norm(x, g, w, backend="cpp").sum(), w)
    (want,) = torch.autograd.grad(gated_rms_norm_reference(x, g, w).sum(), w)
    torch.testing.assert_close(dw, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(gated_rms_norm(x, g, w, backend="cpp"), gated_rms_norm_reference(x, g, w))


def test_dispatch_picks_and_refuses():
    x, g, w = torch.randn(2, 4), torch.randn(2, 4), torch.ones(4)
    assert resolve_gated_norm_backend("auto", x, g) == ("cpp" if cpp_available() else "torch")
    assert resolve_gated_norm_backend("auto", x.double(), g.double()) == "torch"
    with pytest.raises(ValueError, match="backend='cpp' runs float32 CPU tensors"):
        resolve_gated_norm_backend("cpp", x.bfloat16(), g.bfloat16())
    with pytest.raises(ValueError, match="not one of"):
        gated_rms_norm(x, g, w, backend="fast")
    with pytest.raises(ValueError, match=r"x \(2, 4\), g \(2, 3\)"):
        gated_rms_norm(x, g[:, :3], w)
    # bf16 (autocast) takes the PyTorch path and matches it
    torch.testing.assert_close(gated_rms_norm(x.bfloat16(), g.bfloat16(), w),
                               F.rms_norm(x, (4,), w, 1e-6).bfloat16() * F.silu(g.bfloat16()))


@needs_cpp
def test_cpp_on_two_threads_equals_reference():
    """Enough rows for at::parallel_for to split them: the per-thread weight-gradient partials add up."""
    torch.manual_seed(0)
    x, g = torch.randn(5000, 32, requires_grad=True), torch.randn(5000, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = gated_rms_norm(x, g, w, backend="cpp")
        got_grads = torch.autograd.grad(got, (x, g, w), torch.ones_like(got))
    finally:
        torch.set_num_threads(threads)
    want = gated_rms_norm_reference(x, g, w)
    for a, b in zip((got, *got_grads), (want, *torch.autograd.grad(want, (x, g, w), torch.ones_like(want)))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
