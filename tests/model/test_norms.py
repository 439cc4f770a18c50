"""The fast L2 norm (hand-written backward) equals its reference, values and gradients."""
import pytest
import torch

from sinkrec.modules.norms import l2norm, l2norm_reference


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
