"""The fast L2 norm and RMSNorm (hand-written backwards) equal their references, values and gradients."""
import pytest
import torch

from sinkrec.modules.norms import RMSNorm, l2norm, l2norm_reference, rms_norm, rms_norm_reference


@pytest.mark.parametrize("strided", [False, True])
def test_l2norm_equals_reference(strided):
    torch.manual_seed(0)
    base = torch.randn(3, 50, 4 * 16 + 7, dtype=torch.float64)
    base[0, :5] = 0  # all-zero vectors (pads) must stay zero, with finite gradients
    dy = torch.randn(3, 50, 4, 16, dtype=torch.float64)
    outs = []
    for fn in (l2norm, l2norm_reference):
        leaf = base.clone().requires_grad_()
        # the TDGD layer normalises a strided slice of a projection's output
        x = leaf[..., :64].unflatten(-1, (4, 16)) if strided else leaf[..., :64].reshape(3, 50, 4, 16)
        y = fn(x)
        y.backward(dy)
        outs.append((y.detach(), leaf.grad))
    (y, g), (y_ref, g_ref) = outs
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert y[0, :5].abs().max() == 0 and torch.isfinite(g).all()


def test_l2norm_gradcheck():
    x = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(l2norm, (x,))


def test_l2norm_keeps_the_input_dtype():
    x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    y = l2norm(x)
    y.sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("strided", [False, True])
def test_rms_norm_equals_reference(strided):
    torch.manual_seed(0)
    base = torch.randn(3, 50, 4 * 16 + 7, dtype=torch.float64)
    base[0, :5] = 0  # pad rows: zero stays zero, gradients finite
    dy = torch.randn(3, 50, 4, 16, dtype=torch.float64)
    weight0 = torch.randn(16, dtype=torch.float64)
    outs = []
    for fn in (rms_norm, rms_norm_reference):
        leaf, weight = base.clone().requires_grad_(), weight0.clone().requires_grad_()
        # TDGD's o_norm normalises each head's [V] slice; the block norms a [B, T, D] row
        x = leaf[..., :64].unflatten(-1, (4, 16)) if strided else leaf[..., :64].reshape(3, 50, 4, 16)
        y = fn(x, weight)
        y.backward(dy)
        outs.append((y.detach(), leaf.grad, weight.grad))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert outs[0][0][0, :5].abs().max() == 0 and torch.isfinite(outs[0][1]).all()


def test_rms_norm_gradcheck_and_module():
    x = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rms_norm, (x, w))
    norm = RMSNorm(8)  # computes in float32 and returns the input's dtype
    xb = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    y = norm(xb)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), rms_norm_reference(xb.float(), norm.weight.detach()), atol=1e-2, rtol=1e-2)
