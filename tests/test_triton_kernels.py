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


def _levels(levels, channels=5, dtype=torch.float32):
    """Random parameters and running statistics of a gather's levels."""
    def vec(lo, hi):
        return [(torch.rand(channels) * (hi - lo) + lo).to(DEVICE, dtype)
                for _ in range(levels)]
    # about unit gain per level (a 3x3 kernel's fan-in is 9)
    weights = [_make((channels, 1, 3, 3), dtype) / 3 for _ in range(levels)]
    return weights, vec(0.5, 1.5), vec(-0.5, 0.5), vec(-0.3, 0.3), \
        vec(0.5, 2.0)


def _close(got, want, dtype, exact=None):
    """float32: within its rounding of the float64 result ``want``,
    relative to the largest value (batch statistics spread one rounding
    over a channel). bfloat16 and float16, norm-wise: within a few times
    the error of the reference in that dtype (``want``) against the float64
    result ``exact``, plus two roundings. Norm-wise, because a map rounded
    one unit differently can put a value on the other side of a ReLU, which
    moves its gradient by a whole term; and Triton's interpreter rounds
    float32 to bfloat16 by truncation (GPUs round to nearest)."""
    assert got.shape == want.shape
    got, want = got.double(), want.double()
    tol = _tol(dtype)['rtol']
    if dtype is torch.float32:
        scale = max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)
        return
    exact = exact.double()
    assert (got - exact).norm() <= 4 * (want - exact).norm() + \
        2 * tol * exact.norm() + 1e-6


# Not compared: a 1x1 map in training in bfloat16 or float16. Its batch
# norm sees one value per sample, so the output does not depend on the
# convolution's weight (a gradient of zero, rounding noise on both sides)
GATHER_CASES = [(size, cl, dtype, levels, mode)
                for size, cl, dtype in CASES for levels in (1, 3)
                for mode in ((True, False), (False, True))
                if not (size == (1, 1) and mode[0]
                        and dtype is not torch.float32)]


@pytest.mark.parametrize('size, channels_last, dtype, levels, mode',
                         GATHER_CASES)
def test_conv_gather_and_its_backward(size, channels_last, dtype, levels,
                                      mode):
    """GE-theta's gather: the context, the statistics each level used and
    the levels' maps; then the gradients of the input, the convolutions'
    weights and the norms' weights and biases (:func:`_close`)."""
    training, last_relu = mode
    torch.manual_seed(0)
    x = _make((3, 5) + size, dtype, channels_last)
    params = _levels(levels)
    wide = [[t.double() for t in ts] for ts in params]
    got = cuda.conv_gather(x, *params, training, 1e-5, last_relu)
    exact = ge_ops.reference_conv_gather(x.double(), *wide, training, 1e-5,
                                         last_relu)
    want = exact if dtype is torch.float32 else \
        ge_ops.reference_conv_gather(x, *params, training, 1e-5, last_relu)
    assert len(got) == len(want) == 3 + levels
    for a, b, e in zip(got, want, exact):
        assert a.stride() == b.stride()
        _close(a, b, dtype, e)
    if not training:
        torch.testing.assert_close(got[1], torch.stack(params[3]))
    # the backward kernel and the references from the same saved maps
    grad = _make(got[0].shape, dtype, channels_last)
    saved = got[1], got[2], got[3:]
    got_g = cuda.conv_gather_backward(grad, x, *params[:3], *saved,
                                      training, 1e-5, last_relu, True)
    exact_g = ge_ops.reference_conv_gather_backward(
        grad.double(), x.double(), *wide[:3], saved[0].double(),
        saved[1].double(), [t.double() for t in saved[2]], training, 1e-5,
        last_relu, True)
    want_g = exact_g if dtype is torch.float32 else \
        ge_ops.reference_conv_gather_backward(grad, x, *params[:3], *saved,
                                              training, 1e-5, last_relu,
                                              True)
    assert len(got_g) == len(want_g) == 3 + levels
    assert got_g[0].stride() == x.stride()
    for a, b, e in zip(got_g, want_g, exact_g):
        _close(a, b, dtype, e)


@pytest.mark.parametrize('size, channels_last, dtype', CASES)
def test_excite_backward(size, channels_last, dtype):
    """Both of the excite's gradients in one pass: through the ReLU's mask
    (the masked gradient written for the shortcut) and without it, every
    extent and the global one."""
    for extent in (2, 4, 8, 'global'):
        x = _make((2, 5) + size, dtype, channels_last)
        gate = _make(_gate_shape(size, extent), dtype, positive=True)
        grad = _make((2, 5) + size, dtype, channels_last)
        out = cuda.excite(x, gate, _make((2, 5) + size, dtype,
                                         channels_last), True)
        for relu_out, masked in ((out, True), (out, False), (None, False)):
            got = cuda.excite_backward(grad, x, gate, relu_out, masked)
            want = ge_ops.reference_excite_backward(
                grad.double(), x.double(), gate.double(),
                None if relu_out is None else relu_out.double(), masked)
            assert len(got) == 3
            for a, b in zip(got, want):
                assert a.shape == b.shape and a.stride() == b.stride()
                torch.testing.assert_close(a.double(), b, **_tol(dtype))


@pytest.mark.parametrize('size, channels_last, dtype', CASES)
def test_global_gather_and_its_backward(size, channels_last, dtype):
    """Global-extent GE-theta's whole-map convolution: the output, and the
    input's and the weight's gradients (the weight's alone too)."""
    torch.manual_seed(0)
    x = _make((3, 5) + size, dtype, channels_last)
    # a float32 weight that x's dtype holds exactly (the op rounds it)
    weight = _make((5, 1) + size, dtype).float()
    _check(cuda.global_gather(x, weight), (x, weight),
           ge_ops.reference_global_gather, dtype)
    grad = _make((3, 5, 1, 1), dtype, channels_last)
    for input_grad in (True, False):
        got = cuda.global_gather_backward(grad, x, weight, input_grad)
        want = ge_ops.reference_global_gather_backward(
            grad.double(), x.double(), weight.double(), input_grad)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.stride() == b.stride()
            torch.testing.assert_close(a.double(), b, **_tol(dtype))
