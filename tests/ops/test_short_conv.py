"""The short causal depthwise conv: the [B, T, C] fast path equals the conv1d reference (values and
every gradient), and the module's three ways in (zero start, carried buffer, packed sequences)
equal the reference's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sinkrec.modules import ShortConv
from sinkrec.ops import short_conv
from sinkrec.ops.short_conv import channels_last, cpp_available, resolve_conv_backend, short_conv_reference

needs_cpp = pytest.mark.skipif(not cpp_available(), reason="the C++ short conv does not build here (no compiler)")


def _by_definition(x, weight, activation):
    """y[t] = act(sum_j w[j] x[t - (W - 1) + j]) written as a loop, the outside oracle."""
    T, W = x.shape[1], weight.shape[-1]
    y = torch.zeros_like(x)
    for t in range(T):
        for j in range(W):
            if t - (W - 1) + j >= 0:
                y[:, t] += weight[:, 0, j] * x[:, t - (W - 1) + j]
    return F.silu(y) if activation == "silu" else y


# BLOCK_ELEMENTS: the production size (at these shapes, all rows in one block); 10 elements (one
# batch row's window of max(W, 2) positions per block); 40 (several rows per block for T <= 7, windows for
# T = 33)
@pytest.mark.parametrize("block_elements", [None, 10, 40])
@pytest.mark.parametrize("T", [0, 1, 2, 3, 4, 7, 33])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_channels_last_equals_reference_values_and_grads(T, activation, block_elements, monkeypatch):
    if block_elements is not None:
        monkeypatch.setattr(channels_last, "BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(T)
    B, C, W = 3, 5, 4
    base = torch.randn(B, T, C + 3, dtype=torch.float64, requires_grad=True)
    x = base[..., 1 : C + 1]  # strided, as TDGD passes a slice of its input projection
    weight = torch.randn(C, 1, W, dtype=torch.float64, requires_grad=True)
    want = short_conv_reference(x, weight, activation)
    got = short_conv(x, weight, activation, backend="channels_last")
    torch.testing.assert_close(got, want)
    if T:
        torch.testing.assert_close(want, _by_definition(x.detach(), weight.detach(), activation))
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (base, weight), g), torch.autograd.grad(want, (base, weight), g)):
        torch.testing.assert_close(a, b)


def test_channels_last_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: short_conv(x, w, "silu", backend="channels_last"), (x, w))


@pytest.mark.parametrize("backend", ["channels_last", pytest.param("cpp", marks=needs_cpp)])
def test_weight_grad_only_for_a_detached_input(backend):
    torch.manual_seed(0)
    x, w = torch.randn(2, 9, 4), torch.randn(4, 1, 3, requires_grad=True)
    got = torch.autograd.grad(short_conv(x, w, backend=backend).square().sum(), w)[0]
    want = torch.autograd.grad(short_conv_reference(x, w).square().sum(), w)[0]
    torch.testing.assert_close(got, want)


def test_channels_last_bf16_close_to_float32():
    torch.manual_seed(0)
    x, w = torch.randn(2, 50, 16), torch.randn(16, 1, 4)
    got = short_conv(x.bfloat16(), w, "silu", backend="channels_last")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), short_conv_reference(x, w, "silu"), atol=3e-2, rtol=3e-2)


@needs_cpp
@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("T", [0, 1, 3, 4, 7, 33, 130])  # 130: three of the backward's 64-row time blocks
@pytest.mark.parametrize("activation", [None, "silu"])
def test_cpp_equals_reference_values_and_grads(T, activation, W):
    torch.manual_seed(T)
    B, C = 3, 21  # C not a multiple of any vector width
    base = (2 * torch.randn(B, T, C + 3)).requires_grad_()
    x = base[..., 1 : C + 1]  # strided
    weight = torch.randn(C, 1, W, requires_grad=True)
    want = short_conv_reference(x.double(), weight.double(), activation)
    got = short_conv(x, weight, activation, backend="cpp")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (base, weight), g),
                    torch.autograd.grad(want, (base, weight), g.double())):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-5)


@needs_cpp
def test_auto_picks_cpp_for_float32_cpu_only():
    x, w = torch.randn(2, 9, 4), torch.randn(4, 1, 3)
    assert resolve_conv_backend("auto", x) == "cpp"
    assert resolve_conv_backend("auto", x.double()) == "channels_last"  # float32 only
    with pytest.raises(ValueError, match="conv_backend='cpp' runs float32 CPU tensors"):
        short_conv(x.double(), w.double(), backend="cpp")


@pytest.mark.parametrize("backend", ["reference", "channels_last", pytest.param("cpp", marks=needs_cpp)])
def test_module_buffer_and_packed_equal_one_reference_pass(backend):
    torch.manual_seed(0)
    conv = ShortConv(6, kernel_size=4, activation="silu", backend=backend)
    ref = ShortConv(6, kernel_size=4, activation="silu", backend="reference")
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 11, 6)
    want = ref(x)[0]
    # window by window, carrying the buffer (the 1-event streaming step included)
    buf, parts = conv.init_buffer(2), []
    for a, b in ((0, 5), (5, 6), (6, 11)):
        y, buf = conv(x[:, a:b], buf)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, 1), want)
    torch.testing.assert_close(buf, x[:, -3:])
    # packed: the two rows one after the other restart at the boundary
    cu = torch.tensor([0, 11, 22])
    got, _ = conv(torch.cat([x[0], x[1]])[None], cu_seqlens=cu)
    torch.testing.assert_close(got[0], torch.cat([want[0], want[1]]))


def test_refusals():
    with pytest.raises(ValueError, match="conv_backend='cuda'"):
        short_conv(torch.randn(1, 2, 3), torch.randn(3, 1, 4), backend="cuda")
    with pytest.raises(ValueError, match="activation='relu'"):
        short_conv(torch.randn(1, 2, 3), torch.randn(3, 1, 4), "relu")
    with pytest.raises(ValueError, match=r"x must be \[B, T, C\]"):
        short_conv(torch.randn(1, 2, 3), torch.randn(4, 1, 4))
    with pytest.raises(ValueError, match="backend='fast'"):
        ShortConv(3, backend="fast")
