"""GatherConv2d: the gather's depthwise convolution, whose CPU backward in
bfloat16 or float16 runs in float32."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmge.models.layers import ConvGather
from mmge.models.layers.depthwise_conv import (GatherConv2d,
                                               convolution_backward,
                                               is_plain_conv)


def make_conv(channels=8, **kw):
    torch.manual_seed(0)
    kw = dict(dict(kernel_size=3, stride=2, padding=1, groups=channels,
                   bias=False), **kw)
    conv = GatherConv2d(channels, channels, **kw)
    plain = nn.Conv2d(channels, channels, **kw)
    plain.load_state_dict(conv.state_dict())
    return conv, plain


def float32_backward(grad, x, weight, conv):
    """The gradients in float32 of the convolution the forward ran: the
    low-precision input, grad and weight as they are, widened."""
    return torch.ops.aten.convolution_backward(
        grad.float(), x.float(), weight.to(x.dtype).float(), None,
        conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups,
        [True, True, False])[:2]


def test_the_gather_builds_it_with_nn_conv2d_state():
    gather = ConvGather(8, extent=8)
    convs = [m.conv for m in gather.convs]
    assert all(type(c) is GatherConv2d for c in convs)
    assert all(is_plain_conv(c) for c in convs)
    assert not is_plain_conv(type('Other', (nn.Conv2d, ), {})(1, 1, 1))
    assert list(convs[0].state_dict()) == ['weight']


@pytest.mark.parametrize('channels_last', (False, True))
@pytest.mark.parametrize('size', ((14, 14), (13, 9), (2, 2)))
def test_bf16_autocast_backward_runs_in_float32(size, channels_last):
    """Same forward as nn.Conv2d under CPU autocast; the gradients are the
    float32 backward of what the forward convolved, in the input's and the
    weight's dtypes (a bfloat16 backward gives other values)."""
    conv, plain = make_conv()
    x = torch.randn(3, 8, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_conv = x.clone().requires_grad_()
    x_plain = x.clone().requires_grad_()
    with torch.autocast('cpu', torch.bfloat16):
        out = conv(x_conv)
        ref = plain(x_plain)
    assert out.grad_fn.name() == 'WideBackwardConvBackward'
    assert ref.grad_fn.name() != out.grad_fn.name()
    assert out.dtype is torch.bfloat16
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    want_x, want_w = float32_backward(grad, x.bfloat16(), conv.weight, conv)
    assert x_conv.grad.dtype is torch.float32
    assert conv.weight.grad.dtype is torch.float32
    # autocast's cast of x rounds its gradient to bfloat16 on the way back
    torch.testing.assert_close(x_conv.grad, want_x.bfloat16().float(),
                               rtol=0, atol=0)
    torch.testing.assert_close(conv.weight.grad, want_w, rtol=0, atol=0)
    # and the float32 backward is closer to the float64 truth than ATen's
    # bfloat16 one
    x64 = x.bfloat16().double().requires_grad_()
    w64 = conv.weight.detach().bfloat16().double().requires_grad_()
    F.conv2d(x64, w64, None, 2, 1, 1, 8).backward(grad.double())
    err = (conv.weight.grad.double() - w64.grad).abs().max()
    err_plain = (plain.weight.grad.double() - w64.grad).abs().max()
    assert err < err_plain


def test_bf16_tensors_without_autocast():
    """A bfloat16 module and input: bfloat16 gradients from a float32
    backward."""
    conv, _ = make_conv()
    conv.bfloat16()
    x = torch.randn(2, 8, 10, 10, dtype=torch.bfloat16, requires_grad=True)
    out = conv(x)
    assert out.grad_fn.name() == 'WideBackwardConvBackward'
    grad = torch.randn_like(out)
    out.backward(grad)
    want_x, want_w = float32_backward(grad, x.detach(), conv.weight, conv)
    assert x.grad.dtype is conv.weight.grad.dtype is torch.bfloat16
    torch.testing.assert_close(x.grad, want_x.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(conv.weight.grad, want_w.bfloat16(), rtol=0,
                               atol=0)


def test_mixed_dtypes_without_autocast_fail_as_nn_conv2d():
    conv, plain = make_conv()
    x = torch.randn(2, 8, 6, 6, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(RuntimeError) as want:
        plain(x)
    with pytest.raises(RuntimeError) as got:
        conv(x)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize('dtype', (torch.float32, torch.float64))
def test_other_calls_are_nn_conv2d(dtype):
    """float32 and float64, no grad, a bias: nn.Conv2d's own path."""
    conv, plain = make_conv()
    conv.to(dtype)
    x = torch.randn(2, 8, 6, 6, dtype=dtype, requires_grad=True)
    assert conv(x).grad_fn.name() == 'ConvolutionBackward0'
    conv32, _ = make_conv()
    x32 = torch.randn(2, 8, 6, 6, requires_grad=True)
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        assert conv32(x32).grad_fn is None
    biased, _ = make_conv(bias=True)
    with torch.autocast('cpu', torch.bfloat16):
        out = biased(x32)
    assert out.grad_fn.name() != 'WideBackwardConvBackward'


@pytest.mark.parametrize('dtype', (torch.bfloat16, torch.float64))
@pytest.mark.parametrize('channels_last', (False, True))
def test_convolution_backward_in_parts_of_the_batch(dtype, channels_last):
    """In parts of the batch (the CPU's ``cpu_batch_step``) as in one call:
    the input's gradient in x's dtype and layout, the weight's summed."""
    conv, _ = make_conv()
    x = torch.randn(5, 8, 12, 12).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(5, 8, 6, 6).to(dtype)
    mask = [True, True, False]
    whole = convolution_backward(grad, x, conv.weight, conv, mask)
    parts = convolution_backward(grad, x, conv.weight, conv, mask, step=2)
    assert parts[0].dtype is dtype and parts[1].dtype is torch.float32
    assert parts[0].is_contiguous(memory_format=torch.channels_last) == \
        channels_last
    torch.testing.assert_close(parts[0], whole[0], rtol=0, atol=0)
    torch.testing.assert_close(parts[1], whole[1])
    only_x = convolution_backward(grad, x, conv.weight, conv,
                                  [True, False, False], step=2)
    assert only_x[1] is None
    torch.testing.assert_close(only_x[0], whole[0], rtol=0, atol=0)
