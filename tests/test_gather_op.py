"""GE-theta's gather on the ``mmge::conv_gather`` op (its levels in one op,
as on a GPU) against its modules: values, gradients, running statistics,
what autograd keeps, and where the modules run instead.

The op runs where a device has kernels of its own (CUDA; the CPU in
float32); these tests let it run on the CPU in every dtype
(:data:`mmge.models.layers.gather_op.KERNELS`), so that in float64 the op's
reference implementation (or, in one test, the Triton kernels in Triton's
interpreter) stands in for a GPU's kernels."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmge.models import GatherExcite
from mmge.models.layers import gather_op
from mmge.models.layers.gather import ConvGather
from mmge.models.layers.ge_block import ge_block_tail
from helpers.spy import record_calls
from mmge.ops import cpu_kernels, cuda, ge_ops


def everywhere(monkeypatch, devices=('cpu', 'cuda')):
    """The gather ops on ``devices`` in every dtype."""
    for op in gather_op.KERNELS:
        monkeypatch.setitem(gather_op.KERNELS, op,
                            dict.fromkeys(devices))


@pytest.fixture
def on_cpu(monkeypatch):
    """The ops on CPU tensors, their calls recorded by name."""
    calls = []

    def counted(name, op):
        def run(*args):
            calls.append(name)
            return op(*args)
        return run

    everywhere(monkeypatch)
    for name in ('conv_gather', 'global_gather'):
        monkeypatch.setattr(ge_ops, name,
                            counted(name, getattr(ge_ops, name)))
    return calls


def _randomise(module):
    """Random norm parameters and running statistics."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return module


def _grads(module, *tensors):
    return [t.grad for t in tensors] + [p.grad for p in module.parameters()]


def _compare(module, ref, x, x_ref, out, want, tol=1e-12):
    """``out = module(x)`` against ``want = ref(x_ref)`` (the same input):
    values, gradients (input, every parameter) and buffers, within ``tol``
    (100 times that for gradients)."""
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    for a, b in zip(_grads(module, x), _grads(ref, x_ref)):
        torch.testing.assert_close(a, b, rtol=100 * tol, atol=10 * tol)
    for a, b in zip(module.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _check_against_modules(gather, ref, size):
    """``gather(x)`` (on an op) against ``ref``'s modules on the same
    float64 input."""
    x = torch.randn(3, 6, *size, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    _compare(gather, ref, x, x_ref, gather(x), ref.convs(x_ref))


@pytest.mark.parametrize('extent', (2, 4, 8))
@pytest.mark.parametrize('last_act', (False, True))
@pytest.mark.parametrize('training', (True, False))
@pytest.mark.parametrize('momentum', (0.1, None))
@pytest.mark.parametrize('size', ((16, 16), (13, 11)))
def test_the_op_is_the_modules(on_cpu, extent, last_act, training,
                               momentum, size):
    """ConvGather on the op: the modules' values, gradients (input, every
    weight and norm parameter) and running statistics (momentum or a
    cumulative average), twice in a row."""
    torch.manual_seed(0)
    gather = _randomise(ConvGather(6, extent, last_act=last_act).double())
    for m in gather.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    gather.train(training)
    ref = copy.deepcopy(gather)
    for step in range(2):
        _check_against_modules(gather, ref, size)
        assert on_cpu == ['conv_gather'] * (step + 1)


def test_the_op_under_autocast_runs_in_its_dtype(on_cpu):
    """Under autocast the levels' convolutions run in its dtype, as
    ``conv2d`` would: the op takes the input rounded to it."""
    torch.manual_seed(0)
    gather = _randomise(ConvGather(8, 4))
    ref = copy.deepcopy(gather)
    x = torch.randn(2, 8, 16, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = gather(x)
        want = ref.convs(x)
    assert len(on_cpu) == 1
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2,
                               atol=2e-2)


@pytest.mark.parametrize('last_act', (False, True))
@pytest.mark.parametrize('training', (True, False))
def test_the_global_extent_runs_its_convolution_on_its_op(
        on_cpu, last_act, training):
    """Global-extent GE-theta: its whole-map convolution on
    ``mmge::global_gather``, then its norm (and activation) as modules:
    the modules' values, gradients and running statistics."""
    torch.manual_seed(0)
    gather = _randomise(ConvGather(6, 'global', feat_size=(7, 9),
                                   last_act=last_act).double())
    gather.train(training)
    ref = copy.deepcopy(gather)
    _check_against_modules(gather, ref, (7, 9))
    assert on_cpu == ['global_gather']


@pytest.mark.skipif(not cpu_kernels.available(),
                    reason='the native CPU kernels are not built')
@pytest.mark.parametrize('extent', (2, 8))
@pytest.mark.parametrize('training', (True, False))
def test_on_the_cpu_float32_nchw_maps_take_the_c_kernel(
        monkeypatch, extent, training):
    """By default, on the CPU a float32 NCHW map's gather with autograd on
    is the op on its C kernel, with the modules' values, gradients and
    running statistics; a channels-last map, a bfloat16 one (under
    autocast) and a call without autograd run the modules."""
    calls = record_calls(monkeypatch, cpu_kernels, 'conv_gather')
    torch.manual_seed(0)
    gather = _randomise(ConvGather(12, extent)).train(training)
    ref = copy.deepcopy(gather)
    x = torch.randn(2, 12, 19, 22, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = gather(x)
    assert len(calls) == 1
    _compare(gather, ref, x, x_ref, out, ref.convs(x_ref), tol=1e-5)
    gather(x.detach().contiguous(memory_format=torch.channels_last))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        gather(x.detach())
    with torch.no_grad():
        gather(x.detach())
    assert len(calls) == 1


class NotPlainBN(nn.BatchNorm2d):
    """A batch norm with a forward of its own (as SyncBN has)."""

    def forward(self, x):
        return super().forward(x) * 1.0


@pytest.mark.parametrize('case', ('device', 'hook', 'norm', 'act',
                                  'mixed modes', 'one value', 'global hook'))
def test_the_modules_run_where_the_op_does_not_compute(monkeypatch, on_cpu,
                                                       case):
    """Off the op's devices, with a hook on any level, another norm or
    activation, levels in different modes, a batch norm in training over
    one value per channel (which raises, as the module does) and a hook on
    a global extent's convolution, the modules run."""
    torch.manual_seed(0)
    size = (16, 16)
    kwargs = {}
    if case == 'norm':
        kwargs['norm_cfg'] = dict(type='GN', num_groups=2)
    if case == 'act':
        kwargs['act_cfg'] = dict(type='LeakyReLU')
    if case == 'global hook':
        kwargs = dict(extent='global', feat_size=size)
    gather = ConvGather(8, kwargs.pop('extent', 4), **kwargs)
    if case == 'device':
        everywhere(monkeypatch, ('cuda', ))
    if case in ('hook', 'global hook'):
        gather.convs[-1].conv.register_forward_hook(lambda *a: None)
    if case == 'mixed modes':
        gather.convs[0].bn.eval()
    if case == 'norm':
        gather.convs[0].bn = NotPlainBN(8)
    x = torch.randn(1 if case == 'one value' else 2, 8, *size)
    if case == 'one value':
        with pytest.raises(ValueError, match='more than 1 value'):
            gather(torch.randn(1, 8, 4, 4))
    else:
        gather(x)
    assert not on_cpu


@pytest.mark.parametrize('variant', ('theta', 'theta_plus'))
@pytest.mark.parametrize('extent', (4, 'global'))
@pytest.mark.parametrize('size', ((16, 16), (19, 22)))
def test_default_mode_on_the_op_keeps_no_full_resolution_map(
        on_cpu, variant, extent, size):
    """A block's GE after a batch norm, default mode, on the op: the
    formula's values and gradients and the running statistics moved once;
    autograd keeps the norm's input and no other map of its size."""
    torch.manual_seed(0)
    layer = _randomise(GatherExcite(
        8, variant=variant, extent=extent, reduction=2,
        feat_size=size if extent == 'global' else None).double())
    norm = _randomise(nn.BatchNorm2d(8).double())
    ref_layer, ref_norm = copy.deepcopy(layer), copy.deepcopy(norm)
    inp = torch.randn(2, 8, *size, dtype=torch.float64, requires_grad=True)
    identity = torch.randn_like(inp, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ge_block_tail(layer, inp, identity, norm=norm, relu=True)
    assert on_cpu == ['global_gather' if extent == 'global' else
                      'conv_gather']
    full = [t for t in saved.values() if t.shape == inp.shape]
    assert [t.data_ptr() for t in full] == [inp.data_ptr()] or \
        sorted(t.data_ptr() for t in full) == sorted(
            [inp.data_ptr(), out.data_ptr()])  # the ReLU's output
    x = ref_norm(inp)
    ctx = ref_layer.gather.convs(x)
    if ref_layer.excite.mlp is not None:
        ctx = ref_layer.excite.mlp(ctx)
    want = (x * F.interpolate(ctx, size=size, mode='nearest').sigmoid() +
            identity).relu()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [inp, identity, *layer.parameters(),
                                    *norm.parameters()], grad)
    exp = torch.autograd.grad(want, [inp, identity, *ref_layer.parameters(),
                                     *ref_norm.parameters()], grad)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for a, b in zip([*layer.buffers(), *norm.buffers()],
                    [*ref_layer.buffers(), *ref_norm.buffers()]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('channels_last', (False, True))
@pytest.mark.parametrize('extent', (8, 'global'))
@pytest.mark.parametrize('variant', ('theta', 'theta_plus'))
def test_default_mode_on_the_triton_kernels(monkeypatch, channels_last,
                                            extent, variant):
    """The same block tail with the op's CUDA kernels (Triton; in its
    interpreter on CPU tensors where there is no GPU) in float32: the
    formula's values and gradients in float64."""
    calls = []

    def counted(kernel):
        def run(*args):
            calls.append(kernel)
            return kernel(*args)
        return run

    everywhere(monkeypatch)
    names = ('global_gather', 'global_gather_backward') \
        if extent == 'global' else ('conv_gather', 'conv_gather_backward')
    for name in names:
        monkeypatch.setattr(ge_ops, name, counted(getattr(cuda, name)))
    torch.manual_seed(0)
    layer = _randomise(GatherExcite(
        8, variant=variant, extent=extent, reduction=2,
        feat_size=(19, 22) if extent == 'global' else None))
    norm = _randomise(nn.BatchNorm2d(8))
    ref_layer, ref_norm = copy.deepcopy(layer).double(), copy.deepcopy(
        norm).double()
    inp = torch.randn(2, 8, 19, 22)
    if channels_last:
        inp = inp.contiguous(memory_format=torch.channels_last)
    # float32 on the CPU runs the native kernels: the path GPUs take is
    # the one a float64 or autocast call takes; here the op's kernels are
    # called through it directly
    from mmge.models.layers import input_recompute
    inp.requires_grad_()
    out = input_recompute.forward(layer, norm, inp, None, relu=True)
    x = ref_norm(inp.double())
    ctx = ref_layer.gather.convs(x)
    if ref_layer.excite.mlp is not None:
        ctx = ref_layer.excite.mlp(ctx)
    want = (x * F.interpolate(ctx, size=(19, 22), mode='nearest').sigmoid()
            ).relu()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [inp, *layer.parameters()], grad)
    exp = torch.autograd.grad(want, [inp, *ref_layer.parameters()],
                              grad.double())
    assert calls == [getattr(cuda, name) for name in names]
    # float32 against float64; the global extent's batch norm sees two
    # values per channel, which float32 resolves less well
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3,
                                   atol=1e-4 if extent == 'global' else 1e-5)
    for a, b in zip(layer.buffers(), ref_layer.buffers()):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=1e-5, atol=1e-6)


HERE = ('cpu', 'cuda') if torch.cuda.is_available() else ('cpu', )


@pytest.mark.parametrize('device', HERE)
def test_a_block_tail_under_autocast_on_each_device(monkeypatch, device):
    """GE-theta E8 after a batch norm, default mode, channels-last in
    bfloat16 (on a GPU under autocast, as GPUs train; on the CPU, where
    float32 under autocast takes the native kernels, a bfloat16 input): the
    op runs (on a GPU its Triton kernels, on the CPU its reference), and
    values and gradients are the float64 formula's within bfloat16's
    rounding (norm-wise)."""
    calls = []
    op = ge_ops.conv_gather

    def counted(*args):
        calls.append(args[0].device.type)
        return op(*args)

    everywhere(monkeypatch)
    monkeypatch.setattr(ge_ops, 'conv_gather', counted)
    torch.manual_seed(0)
    layer = _randomise(GatherExcite(16, variant='theta', extent=8)).to(device)
    norm = _randomise(nn.BatchNorm2d(16)).to(device)
    ref_layer = copy.deepcopy(layer).double()
    ref_norm = copy.deepcopy(norm).double()
    dtype = torch.float32 if device == 'cuda' else torch.bfloat16
    inp = torch.randn(4, 16, 28, 28, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    identity = torch.randn_like(inp).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = ge_block_tail(layer, inp, identity, norm=norm, relu=True)
    assert calls == [device]
    x = ref_norm(inp.double())
    want = (x * F.interpolate(ref_layer.gather.convs(x), size=(28, 28),
                              mode='nearest').sigmoid() +
            identity.double()).relu()
    grad = torch.randn_like(want)
    leaves = [inp, identity, *layer.parameters(), *norm.parameters()]
    got = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    exp = torch.autograd.grad(want, [inp, identity, *ref_layer.parameters(),
                                     *ref_norm.parameters()], grad)
    # maps within 3%; the parameters' gradients, sums over the batch whose
    # terms cancel, within 15% (the modules under autocast are 9% off the
    # first level's norm weight's)
    pairs = [(out, want)] + list(zip(got, exp))
    for i, (a, b) in enumerate(pairs):
        assert (a.double() - b).norm() <= (0.03 if i < 3 else 0.15) * \
            b.norm() + 1e-3


def test_compile_fullgraph_keeps_the_op(on_cpu):
    """``torch.compile(fullgraph=True)`` of a GE-theta layer on the op (no
    graph break in the gather, the running statistics updated in the
    compiled graph): the eager modules' values, gradients and buffers."""
    torch.manual_seed(0)
    layer = _randomise(GatherExcite(8, variant='theta', extent=4))
    ref = copy.deepcopy(layer)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = torch.compile(layer, fullgraph=True)(x)
    assert 'conv_gather' in on_cpu
    gather_op.KERNELS['conv_gather'] = {'cuda': None}
    _compare(layer, ref, x, x_ref, out, ref(x_ref), tol=1e-5)
