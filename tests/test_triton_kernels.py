"""The CUDA kernels of the ``mmge::`` ops (Triton) against the ops'
reference implementations in float64: on a GPU where there is one, else on
CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, which
conftest.py sets before mmge is imported)."""
import itertools
import os

import pytest
import torch

from mmge.ops import cuda, ge_ops

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
SIZES = ((1, 1), (7, 13), (37, 50))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CASES = list(itertools.product(SIZES, (False, True), DTYPES))


def test_kernels_run_where_they_should():
    assert cuda is not None, 'Triton is not installed: CUDA runs no kernel'
    assert DEVICE == 'cuda' or os.environ.get('TRITON_INTERPRET') == '1'


def _tol(dtype):
    # one rounding to the output's dtype (float32 arithmetic inside)
    return {torch.float32: dict(rtol=1e-5, atol=1e-5),
            torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
            torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]


def _make(shape, dtype, channels_last=False, positive=False):
    t = torch.rand(shape) if positive else torch.randn(shape)
    t = t.to(device=DEVICE, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) \
        if channels_last else t


def _check(got, args, reference, dtype):
    """``got`` against ``reference`` on the same values in float64: same
    shapes, the layouts the op promises, the values within ``dtype``'s
    rounding."""
    args64 = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    want = reference(*args64)
    got = got if isinstance(got, tuple) else (got, )
    want = want if isinstance(want, tuple) else (want, )
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert a.stride() == b.stride()
        torch.testing.assert_close(a.double(), b, **_tol(dtype))


def _gate_shape(size, extent):
    if extent == 'global':
        return 2, 5, 1, 1
    return (2, 5) + tuple(-(-s // extent) for s in size)


@pytest.mark.parametrize('size, channels_last, dtype', CASES)
def test_excite(size, channels_last, dtype):
    x = _make((2, 5) + size, dtype, channels_last)
    identity = _make((2, 5) + size, dtype, channels_last)
    for extent, with_identity, relu in itertools.product(
            (2, 4, 8, 'global'), (False, True), (False, True)):
        gate = _make(_gate_shape(size, extent), dtype, positive=True)
        args = (x, gate, identity if with_identity else None, relu)
        out = cuda.excite(*args)
        assert out.dtype == dtype
        _check(out, args, ge_ops.reference_excite, dtype)


@pytest.mark.parametrize('size, channels_last, dtype', CASES)
def test_excite_mixed_dtypes_promote(size, channels_last, dtype):
    """Under autocast the features are low precision, the gate float32."""
    x = _make((2, 5) + size, dtype, channels_last)
    gate = _make(_gate_shape(size, 4), torch.float32, positive=True)
    out = cuda.excite(x, gate, x, True)
    assert out.dtype == torch.float32
    _check(out, (x, gate, x, True), ge_ops.reference_excite, dtype)


@pytest.mark.parametrize('size, channels_last, dtype', CASES)
def test_excite_gate_grad(size, channels_last, dtype):
    x = _make((2, 5) + size, dtype, channels_last)
    grad = _make((2, 5) + size, dtype, channels_last)
    for extent, gate_last in itertools.product((2, 4, 8, 'global'),
                                               (False, True)):
        gate = _make(_gate_shape(size, extent), dtype, gate_last,
                     positive=True)
        args = (grad, x, gate)
        _check(cuda.excite_gate_grad(*args), args,
               ge_ops.reference_excite_gate_grad, dtype)


@pytest.mark.parametrize('size, channels_last, dtype', CASES)
def test_pool_gather_and_its_backward(size, channels_last, dtype):
    x = _make((2, 5) + size, dtype, channels_last)
    for extent in (2, 4, 8):
        _check(cuda.pool_gather(x, extent), (x, extent),
               ge_ops.reference_pool_gather, dtype)
        grad = _make(_gate_shape(size, extent), dtype, channels_last)
        _check(cuda.pool_gather_backward(grad, x, extent), (grad, x, extent),
               ge_ops.reference_pool_gather_backward, dtype)


def test_autograd_through_the_ops():
    """The ops' autograd formula on the kernels of ``DEVICE`` (CUDA's on a
    GPU; on the CPU its C kernels), against the float64 formula."""
    from mmge import ops
    x = _make((2, 5, 19, 23), torch.float32, True).requires_grad_()
    idn = _make((2, 5, 19, 23), torch.float32, True).requires_grad_()
    out = ops.excite(x, ops.pool_gather(x, 4).sigmoid(), idn, True)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, idn], grad)
    ref = [t.detach().double().requires_grad_() for t in (x, idn)]
    pooled = torch.nn.functional.avg_pool2d(ref[0], 7, 4, 3,
                                            count_include_pad=False)
    gate = torch.nn.functional.interpolate(pooled.sigmoid(),
                                           size=(19, 23), mode='nearest')
    want = (ref[0] * gate + ref[1]).relu()
    torch.testing.assert_close(out.double(), want, **_tol(torch.float32))
    exp = torch.autograd.grad(want, ref, grad.double())
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.double(), b, **_tol(torch.float32))


def test_other_dtypes_run_the_reference():
    x = _make((1, 2, 5, 6), torch.float64)
    gate = _make((1, 2, 2, 2), torch.float64, positive=True)
    torch.testing.assert_close(cuda.excite(x, gate),
                               ge_ops.reference_excite(x, gate))
