"""The ``mmge::`` ops on the CPU against their definitions: values and
gradients (float64 references), layouts, dtypes, ``opcheck``, and what
autograd, ``torch.compile`` and tracing make of them."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from helpers.spy import record_calls
from mmge import ops
from mmge.ops import cpu_kernels, ge_ops

SIZES = ((1, 1), (7, 13), (16, 16), (37, 50))
EXTENTS = (2, 4, 8)


def _layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last) \
        if channels_last else t


def formula_excite(x, gate, identity=None, relu=False):
    """The definition, in float64: nearest resize, multiply, add, ReLU."""
    out = x.double() * F.interpolate(gate.double(), size=x.shape[-2:],
                                     mode='nearest')
    if identity is not None:
        out = out + identity.double()
    return out.relu() if relu else out


def formula_pool(x, extent):
    return F.avg_pool2d(x.double(), 2 * extent - 1, extent, extent - 1,
                        count_include_pad=False)


def tol(dtype):
    """Tolerances of a result of ``dtype`` against the float64 formula."""
    return dict(rtol=1e-5, atol=1e-5) if dtype is torch.float32 else {}


def _gate_size(size, extent):
    if extent == 'global':
        return 1, 1
    return tuple(-(-s // extent) for s in size)


@pytest.mark.parametrize('channels_last', (False, True))
@pytest.mark.parametrize('dtype', (torch.float32, torch.float64))
@pytest.mark.parametrize('size', SIZES)
def test_excite_values_and_gradients(size, dtype, channels_last):
    for extent, identity, relu in itertools.product(
            EXTENTS + ('global', ), (False, True), (False, True)):
        x = _layout(torch.randn(2, 5, *size, dtype=dtype), channels_last)
        gate = torch.rand(2, 5, *_gate_size(size, extent), dtype=dtype)
        idn = _layout(torch.randn_like(x), channels_last) if identity \
            else None
        leaves = [t.clone().requires_grad_() for t in (x, gate)]
        if identity:
            leaves.append(idn.clone().requires_grad_())
        out = ops.excite(*leaves[:2], leaves[2] if identity else None, relu)
        want = formula_excite(x, gate, idn, relu)
        assert out.dtype == dtype and out.shape == x.shape
        assert out.is_contiguous(memory_format=ge_ops.memory_format(x))
        torch.testing.assert_close(out.double(), want, **tol(dtype))
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, grad)
        ref = [t.double().requires_grad_() for t in leaves]
        exp = torch.autograd.grad(
            formula_excite(ref[0], ref[1], ref[2] if identity else None,
                           relu), ref, grad.double())
        for a, b in zip(got, exp):
            torch.testing.assert_close(a.double(), b, **tol(dtype))


@pytest.mark.parametrize('channels_last', (False, True))
@pytest.mark.parametrize('dtype', (torch.float32, torch.float64))
@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('extent', EXTENTS)
def test_pool_gather_values_and_gradients(extent, size, dtype,
                                          channels_last):
    x = _layout(torch.randn(2, 5, *size, dtype=dtype), channels_last)
    leaf = x.clone().requires_grad_()
    out = ops.pool_gather(leaf, extent)
    want = formula_pool(x, extent)
    assert out.shape == want.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=ge_ops.memory_format(x))
    torch.testing.assert_close(out.double(), want, **tol(dtype))
    grad = torch.randn_like(out)
    got, = torch.autograd.grad(out, leaf, grad)
    ref = x.double().requires_grad_()
    exp, = torch.autograd.grad(formula_pool(ref, extent), ref, grad.double())
    torch.testing.assert_close(got.double(), exp, **tol(dtype))


@pytest.mark.parametrize('channels_last', (False, True))
def test_bf16_under_autocast(channels_last):
    """Under autocast a convolution's bfloat16 output meets a float32
    gate: the ops promote as ``x * gate`` would, within bfloat16's
    rounding of the float64 definition."""
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = _layout(torch.randn(2, 4, 13, 10), channels_last)
    gate = torch.rand(2, 4, 4, 3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = conv(x)
        assert y.dtype is torch.bfloat16
        out = ops.excite(y, gate, y, relu=True)
        pooled = ops.pool_gather(y, 4)
    assert out.dtype is torch.float32 and pooled.dtype is torch.bfloat16
    torch.testing.assert_close(out.double(), formula_excite(y, gate, y, True),
                               atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(pooled.double(), formula_pool(y, 4),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize('channels_last', (False, True))
def test_opcheck(channels_last):
    """PyTorch's own checks of each op: schema, fake kernel (shapes and
    strides), autograd registration, and the same results in
    ``torch.compile`` and AOT autograd."""
    x = _layout(torch.randn(2, 3, 9, 11), channels_last).requires_grad_()
    idn = _layout(torch.randn(2, 3, 9, 11), channels_last).requires_grad_()
    gate = torch.rand(2, 3, 3, 3, requires_grad=True)
    for args in ((x, gate, idn, True), (x, gate, None, False),
                 (x, gate[:, :, :1, :1], idn, False),
                 (x.double(), gate.double(), None, True)):
        opcheck(ge_ops.excite, args)
    for extent in (2, 4):
        opcheck(ge_ops.pool_gather, (x, extent))
    grad = _layout(torch.randn(2, 3, 9, 11), channels_last)
    opcheck(ge_ops.excite_gate_grad, (grad, x.detach(), gate.detach()))
    opcheck(ge_ops.pool_gather_backward,
            (torch.randn(2, 3, 3, 3), x.detach(), 4))
    out = ge_ops.excite(x.detach(), gate.detach(), None, True)
    for args in ((grad, x.detach(), gate.detach(), out, True),
                 (grad, x.detach(), gate.detach(), out, False),
                 (grad, x.detach(), gate.detach(), None, True)):
        opcheck(ge_ops.excite_backward, args)


def _levels(levels, channels=3, dtype=torch.float32, requires_grad=False):
    """A gather's levels' weights, norm weights and biases, running means
    and variances."""
    def vec(lo, hi):
        return [(torch.rand(channels, dtype=dtype) * (hi - lo) + lo)
                for _ in range(levels)]
    weights = [torch.randn(channels, 1, 3, 3, dtype=dtype) / 3
               for _ in range(levels)]
    params = weights, vec(0.5, 1.5), vec(-0.5, 0.5)
    if requires_grad:
        for t in sum(params, []):
            t.requires_grad_()
    return params + (vec(-0.3, 0.3), vec(0.5, 2.0))


@pytest.mark.parametrize('channels_last', (False, True))
@pytest.mark.parametrize('training', (False, True))
def test_opcheck_conv_gather(channels_last, training):
    """PyTorch's checks of ``mmge::conv_gather`` and its backward op,
    one level and three, with a last ReLU and without."""
    torch.manual_seed(0)
    x = _layout(torch.randn(2, 3, 13, 10), channels_last).requires_grad_()
    for levels, last_relu in ((1, True), (3, False)):
        params = _levels(levels, requires_grad=True)
        opcheck(ge_ops.conv_gather,
                (x, *params, training, 1e-5, last_relu))
        out = ge_ops.conv_gather(x.detach(),
                                 *[[t.detach() for t in ts] for ts in params],
                                 training, 1e-5, last_relu)
        grad = _layout(torch.randn_like(out[0]), channels_last)
        for input_grad in (True, False):
            opcheck(ge_ops.conv_gather_backward,
                    (grad, x.detach(),
                     *[[t.detach() for t in ts] for ts in params[:3]],
                     out[1], out[2], out[3:], training, 1e-5, last_relu,
                     input_grad))


@pytest.mark.skipif(not cpu_kernels.available(),
                    reason='the native CPU kernels are not built')
@pytest.mark.parametrize('channels_last', (False, True))
@pytest.mark.parametrize('size', SIZES)
def test_excite_backward_cpu_kernel(monkeypatch, size, channels_last):
    """``mmge::excite_backward`` on the CPU in float32 runs the C kernel:
    x's and the gate's gradients and the masked gradient of the float64
    definition, every extent and the global one, through the ReLU's mask
    and without it, in x's layout (a gate in the other layout too)."""
    calls = record_calls(monkeypatch, cpu_kernels, 'excite_backward')
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cases = list(itertools.product(EXTENTS + ('global', ), (False, True)))
    for extent, relu in cases:
        x = _layout(torch.randn(2, 11, *size), channels_last)
        gate = _layout(torch.rand(2, 11, *_gate_size(size, extent)),
                       not channels_last)
        out = ge_ops.excite(x, gate, None, True) if relu else None
        grad = _layout(torch.randn_like(x), channels_last)
        got = ge_ops.excite_backward(grad, x, gate, out, relu)
        want = ge_ops.reference_excite_backward(
            grad.double(), x.double(), gate.double(),
            None if out is None else out.double(), relu)
        assert got[0].is_contiguous(memory_format=fmt)
        assert got[1].shape == gate.shape
        assert got[2].numel() == (x.numel() if relu else 0)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    assert len(calls) == len(cases)


@pytest.mark.skipif(not cpu_kernels.available(),
                    reason='the native CPU kernels are not built')
@pytest.mark.parametrize('channels_last', (False, True))
@pytest.mark.parametrize('training', (False, True))
@pytest.mark.parametrize('size', SIZES)
def test_conv_gather_cpu_kernel(monkeypatch, size, training, channels_last):
    """``mmge::conv_gather`` and its backward on the CPU in float32 run the
    C kernel: the float64 definition's context, statistics, levels' maps
    and gradients (x's, the weights', the norms'), every extent, with and
    without a last ReLU, in x's layout."""
    calls = record_calls(monkeypatch, cpu_kernels, 'conv_gather')
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for levels, last_relu in itertools.product((1, 2, 3), (False, True)):
        x = _layout(torch.randn(2, 11, *size), channels_last)
        params = _levels(levels, channels=11)
        wide = [[t.double() for t in ts] for ts in params]
        got = ge_ops.conv_gather(x, *params, training, 1e-5, last_relu)
        want = ge_ops.reference_conv_gather(x.double(), *wide, training,
                                            1e-5, last_relu)
        assert len(got) == len(want) == 3 + levels
        for a, b in zip(got, want):
            if a.dim() == 4:
                assert a.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
        grad = torch.randn_like(got[0])
        got_g = ge_ops.conv_gather_backward(
            grad, x, *params[:3], got[1], got[2], got[3:], training, 1e-5,
            last_relu, True)
        want_g = ge_ops.reference_conv_gather_backward(
            grad.double(), x.double(), *wide[:3], want[1], want[2],
            want[3:], training, 1e-5, last_relu, True)
        assert got_g[0].is_contiguous(memory_format=fmt)
        for a, b in zip(got_g, want_g):
            assert a.shape == b.shape and a.dtype is torch.float32
            torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3)
    assert len(calls) == 6


@pytest.mark.parametrize('channels_last', (False, True))
def test_global_gather(channels_last):
    """``mmge::global_gather``: the definition (a depthwise convolution
    whose kernel is the map), PyTorch's checks, gradcheck, and operands of
    other shapes refused with the op's name."""
    torch.manual_seed(0)
    x = _layout(torch.randn(2, 3, 5, 4, dtype=torch.float64),
                channels_last).requires_grad_()
    weight = torch.randn(3, 1, 5, 4, dtype=torch.float64,
                         requires_grad=True)
    want = (x * weight.transpose(0, 1)).sum(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(ge_ops.global_gather(x, weight), want)
    opcheck(ge_ops.global_gather, (x, weight))
    torch.autograd.gradcheck(ge_ops.global_gather, (x, weight))
    for input_grad in (True, False):
        opcheck(ge_ops.global_gather_backward,
                (torch.randn(2, 3, 1, 1, dtype=torch.float64), x.detach(),
                 weight.detach(), input_grad))
    with pytest.raises(ValueError, match=r'mmge::global_gather.*\(3, 1, 4'):
        ge_ops.global_gather(x, torch.randn(3, 1, 4, 4))


@pytest.mark.parametrize('training', (False, True))
def test_conv_gather_gradcheck_and_bad_operands(training):
    """The backward op is the forward's derivative (float64); operands of
    other shapes raise errors naming the op."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    params = _levels(2, dtype=torch.float64, requires_grad=True)
    flat = sum(params[:3], [])

    def run(x, *flat):
        return ge_ops.conv_gather(x, list(flat[:2]), list(flat[2:4]),
                                  list(flat[4:]), *params[3:], training,
                                  1e-5, True)[0]
    torch.autograd.gradcheck(run, (x, *flat))
    with pytest.raises(ValueError, match=r'mmge::conv_gather.*\(3, 1, 5'):
        ge_ops.conv_gather(x, [torch.randn(3, 1, 5, 5)], *params[1:3],
                           *params[3:], training, 1e-5, True)
    with pytest.raises(ValueError, match='mmge::conv_gather'):
        ge_ops.conv_gather(x, params[0], params[1][:1], *params[2:],
                           training, 1e-5, True)


def test_gradcheck():
    x = torch.randn(1, 2, 7, 5, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    idn = torch.randn_like(x, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b, c: ops.excite(a, b, c, True),
                             (x, gate, idn))
    torch.autograd.gradcheck(lambda a: ops.pool_gather(a, 4), (x, ))


def test_double_backward():
    """Through the input's gradient (itself an excite) double backward
    works; through the gate's it raises an error that names the op."""
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    grad_x, = torch.autograd.grad((ops.excite(x, gate) ** 2).sum(), x,
                                  create_graph=True)
    got = torch.autograd.grad(grad_x.sum(), [x, gate])
    want_x, = torch.autograd.grad((formula_excite(x, gate) ** 2).sum(), x,
                                  create_graph=True)
    want = torch.autograd.grad(want_x.sum(), [x, gate])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    grad_gate, = torch.autograd.grad(ops.excite(x, gate).sum(), gate,
                                     create_graph=True)
    with pytest.raises(RuntimeError, match='mmge.excite_gate_grad'):
        grad_gate.sum().backward()


def test_bad_operands_name_the_op():
    x = torch.randn(1, 2, 6, 6)
    with pytest.raises(ValueError, match=r'mmge::excite.*\(1, 2, 7, 3\)'):
        ops.excite(x, torch.rand(1, 2, 7, 3))
    with pytest.raises(ValueError, match='identity must have the shape'):
        ops.excite(x, torch.rand(1, 2, 3, 3), torch.randn(1, 2, 6, 1))


def test_cpu_kernels_run_for_float32_in_either_layout(monkeypatch):
    """The dispatcher sends float32 CPU tensors to the C kernels (and
    float64 ones to the reference)."""
    assert cpu_kernels.available(), 'mmge._ge_cpu was not built'
    from test_cpu_kernels import count_kernel_calls
    calls = count_kernel_calls(monkeypatch)
    for channels_last, suffix in ((False, ''), (True, '_nhwc')):
        x = _layout(torch.randn(2, 3, 12, 12), channels_last)
        gate = torch.rand(2, 3, 3, 3)
        calls.clear()
        ops.excite(x, ops.pool_gather(x, 4))
        ge_ops.excite_gate_grad(torch.randn_like(x), x, gate)
        assert sorted(name for name, _ in calls) == sorted(
            f'ge_{k}{suffix}' for k in ('pool_forward', 'excite',
                                        'gate_grad'))
        calls.clear()
        ops.excite(x.double(), ops.pool_gather(x.double(), 4))
        assert calls == []


def test_compiled_graph_keeps_the_ops(monkeypatch):
    """``torch.compile(fullgraph=True)`` keeps each op whole, so the
    compiled code calls the C kernels, forward and backward."""
    assert cpu_kernels.available(), 'mmge._ge_cpu was not built'
    from test_cpu_kernels import count_kernel_calls

    def ge(x, identity):
        return ops.excite(x, ops.pool_gather(x, 4).sigmoid(), identity, True)

    compiled = torch.compile(ge, fullgraph=True)
    x = torch.randn(2, 3, 16, 12, requires_grad=True)
    idn = torch.randn(2, 3, 16, 12)
    out = compiled(x, idn)
    calls = count_kernel_calls(monkeypatch)
    out = compiled(x, idn)
    grad, = torch.autograd.grad(out.sum(), x)
    assert {'ge_pool_forward', 'ge_excite', 'ge_gate_grad'} <= {
        name for name, _ in calls}
    ref = x.detach().double().requires_grad_()
    want = formula_excite(ref, formula_pool(ref, 4).sigmoid(), idn, True)
    torch.testing.assert_close(out.double(), want, **tol(out.dtype))
    exp, = torch.autograd.grad(want.sum(), ref)
    torch.testing.assert_close(grad.double(), exp, **tol(out.dtype))


def test_traced_function_is_plain_aten_and_takes_other_sizes():
    """Under ``torch.jit.trace`` (what mmdeploy runs) the ops are written as
    ATen operations of the input's own size: the trace holds no mmge op and
    gives the formula's values at sizes it was not traced at."""
    def ge(x):
        return ops.excite(x, ops.pool_gather(x, 4).sigmoid(), x, True)

    traced = torch.jit.trace(ge, torch.randn(1, 3, 16, 16))
    assert 'mmge::' not in str(traced.graph)
    for size in ((16, 16), (23, 9), (5, 40)):
        x = torch.randn(1, 3, *size)
        want = formula_excite(x, formula_pool(x, 4).sigmoid(), x, True)
        torch.testing.assert_close(traced(x).double(), want,
                                   **tol(torch.float32))
