"""The block's tail as one op, ``mmge::block_tail``: ``relu(GE(norm(x)) +
identity)`` against its float64 definition (values, statistics, gradients,
the C kernels on the CPU), PyTorch's ``opcheck``, and the compiled blocks
that call it instead of their modules."""
import copy
import itertools

import pytest
import torch
import torch.nn as nn
from torch.library import opcheck

from helpers.spy import record_calls
from mmge.models import GatherExcite
from mmge.models.layers import gather_op
from mmge.models.layers.ge_block import ge_block_tail
from mmge.ops import cpu_kernels, ge_ops

SIZES = ((1, 1), (7, 13), (16, 16), (37, 50))
VARIANTS = ('theta', 'theta_minus', 'theta_plus')


def _layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last) \
        if channels_last else t


def _operands(variant, size, training, channels_last, identity=True,
              relu=True, channels=11, levels=2, extent=4):
    """``block_tail``'s operands: random norm, levels and MLP."""
    def vec(lo, hi, n=channels):
        return torch.rand(n) * (hi - lo) + lo

    x = _layout(torch.randn(2, channels, *size), channels_last)
    idn = _layout(torch.randn_like(x), channels_last) if identity else None
    levels = 0 if variant == 'theta_minus' else levels
    gather = ([torch.randn(channels, 1, 3, 3) / 3 for _ in range(levels)],
              [vec(0.5, 1.5) for _ in range(levels)],
              [vec(-0.5, 0.5) for _ in range(levels)],
              [vec(-0.3, 0.3) for _ in range(levels)],
              [vec(0.5, 2.0) for _ in range(levels)])
    mlp = [torch.randn(3, channels, 1, 1) / 2, vec(-0.1, 0.1, 3),
           torch.randn(channels, 3, 1, 1) / 2, vec(-0.1, 0.1)] \
        if variant == 'theta_plus' else []
    return [x, idn, vec(0.5, 1.5), vec(-0.5, 0.5), vec(-0.3, 0.3),
            vec(0.5, 2.0), training, 1e-5, extent, *gather, training, 1e-5,
            False, mlp, True, relu]


def _wide(args):
    """The operands in float64."""
    return [[t.double() for t in a] if isinstance(a, list) else
            a.double() if isinstance(a, torch.Tensor) else a for a in args]


def _grad_operands(args, out):
    """``block_tail_backward``'s operands after ``block_tail(*args)``."""
    (x, _, norm_weight, norm_bias, _, _, norm_training, norm_eps, extent,
     weights, norm_weights, norm_biases, _, _, training, eps, last_relu, mlp,
     mlp_relu, relu) = args
    grad = torch.randn_like(out[0])
    return [grad, x, out[0] if relu else None, norm_weight, norm_bias,
            out[1], out[2], norm_training, norm_eps, extent, weights,
            norm_weights, norm_biases, out[3], out[4], training, eps,
            last_relu, mlp, mlp_relu, out[5]]


@pytest.mark.skipif(not cpu_kernels.available(),
                    reason='the native CPU kernels are not built')
@pytest.mark.parametrize('channels_last', (False, True))
@pytest.mark.parametrize('training', (False, True))
@pytest.mark.parametrize('variant', VARIANTS)
def test_cpu_kernels_against_the_definition(monkeypatch, variant, training,
                                            channels_last):
    """On the CPU in float32 the op runs the C kernels: the float64
    definition's output, statistics and context, and its gradients (x's,
    the shortcut's, the norm's, the levels', the MLP's), sizes from 1x1 and
    sizes the extent does not divide, with and without the shortcut and
    the ReLU, in x's layout."""
    forward, backward = ('batch_stats', 'input_grad') \
        if variant == 'theta_minus' else ('conv_gather',
                                          'conv_gather_backward')
    calls = record_calls(monkeypatch, cpu_kernels, forward)
    backward_calls = record_calls(monkeypatch, cpu_kernels, backward)
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cases = list(itertools.product(SIZES, (False, True), (False, True)))
    for size, identity, relu in cases:
        args = _operands(variant, size, training, channels_last, identity,
                         relu)
        got = ge_ops.block_tail(*args)
        want = ge_ops.reference_block_tail(*_wide(args))
        assert got[0].is_contiguous(memory_format=fmt)
        assert [t.shape for t in got] == [t.shape for t in want]
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
        grad_args = _grad_operands(args, got)
        got_g = ge_ops.block_tail_backward(*grad_args)
        want_g = ge_ops.reference_block_tail_backward(*_wide(grad_args))
        assert got_g[0].is_contiguous(memory_format=fmt)
        # the shortcut's gradient: the masked one, or empty (the output's)
        assert got_g[1].numel() == (args[0].numel() if relu else 0)
        for a, b in zip(got_g, want_g):
            assert a.shape == b.shape and a.dtype is torch.float32
            torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3)
    # every call, forward and backward, on the C kernels (the forward's
    # statistics only where the norm trains)
    assert len(calls) == (len(cases) if training or forward != 'batch_stats'
                          else 0)
    assert len(backward_calls) == len(cases)


@pytest.mark.parametrize('variant,channels_last,training',
                         (('theta', False, True), ('theta_minus', True, True),
                          ('theta_plus', True, False)))
def test_opcheck(variant, channels_last, training):
    """PyTorch's checks of ``mmge::block_tail`` (schema, fake kernel,
    autograd, compiled and AOT results) and of its backward op."""
    torch.manual_seed(0)
    args = _operands(variant, (13, 10), training, channels_last,
                     channels=3)
    for t in [args[0], args[1], args[2], args[3], *args[9], *args[10],
              *args[11], *args[17]]:
        t.requires_grad_()
    opcheck(ge_ops.block_tail, args)
    detached = [[t.detach() for t in a] if isinstance(a, list) else
                a.detach() if isinstance(a, torch.Tensor) else a
                for a in args]
    out = ge_ops.block_tail(*detached)
    opcheck(ge_ops.block_tail_backward, _grad_operands(detached, out))


def test_bad_operands_name_the_op():
    args = _operands('theta', (8, 8), True, False)
    bad = list(args)
    bad[2] = torch.ones(5)
    with pytest.raises(ValueError, match='mmge::block_tail.*norm'):
        ge_ops.block_tail(*bad)
    bad = list(args)
    bad[1] = torch.ones(1, 11, 8, 8)
    with pytest.raises(ValueError, match='mmge::block_tail: identity'):
        ge_ops.block_tail(*bad)
    bad = _operands('theta_minus', (8, 8), True, False, extent=1)
    with pytest.raises(ValueError, match='extent must be >= 2'):
        ge_ops.block_tail(*bad)


def _recording_backend(ops):
    """A ``torch.compile`` backend that records the graph's ``mmge::`` ops
    and runs the graph eagerly."""
    def backend(gm, example_inputs):
        ops.extend(str(node.target) for node in gm.graph.nodes
                   if 'mmge' in str(node.target))
        return gm.forward
    return backend


def _block(variant, channels=16):
    torch.manual_seed(0)
    ge = GatherExcite(channels, variant=variant, extent=4, reduction=4)
    norm = nn.BatchNorm2d(channels)
    with torch.no_grad():
        for m in [norm] + [m for m in ge.modules()
                           if isinstance(m, nn.BatchNorm2d)]:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    return ge, norm


@pytest.mark.skipif(not cpu_kernels.available(),
                    reason='the native CPU kernels are not built')
@pytest.mark.parametrize('channels_last', (False, True))
@pytest.mark.parametrize('train', (False, True))
@pytest.mark.parametrize('variant', VARIANTS)
def test_compiled_tail_is_the_op(variant, train, channels_last):
    """Compiled, a block's tail after a plain batch norm is one
    ``mmge::block_tail`` (no graph break): the eager block's output,
    gradients and running statistics, in training and in eval mode."""
    torch.compiler.reset()  # each case compiles the same functions afresh
    ge, norm = _block(variant)
    ge.train(train)
    norm.train(train)
    ref_ge, ref_norm = copy.deepcopy(ge), copy.deepcopy(norm)
    x = _layout(torch.randn(2, 16, 13, 10), channels_last)
    identity = torch.randn_like(x)
    graph_ops = []
    compiled = torch.compile(
        lambda t: ge_block_tail(ge, t, identity, norm=norm, relu=True),
        fullgraph=True, backend=_recording_backend(graph_ops))
    inp, ref_inp = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(inp)
    want = ge_block_tail(ref_ge, ref_inp, identity, norm=ref_norm, relu=True)
    assert graph_ops == ['mmge.block_tail.default']
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [inp, *ge.parameters(),
                                    *norm.parameters()], grad)
    exp = torch.autograd.grad(want, [ref_inp, *ref_ge.parameters(),
                                     *ref_norm.parameters()], grad)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(list(ge.buffers()) + list(norm.buffers()),
                    list(ref_ge.buffers()) + list(ref_norm.buffers())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_tail_keeps_the_modules_where_the_op_does_not_take_it(
        monkeypatch):
    """A hook on the norm, a norm that is not a plain batch norm, or a
    device without the op's kernels: the compiled tail calls the modules
    (the hook fires) and the smaller ops."""
    torch.compiler.reset()
    ge, norm = _block('theta')
    fired = []
    handle = norm.register_forward_hook(lambda *_: fired.append(1))
    x = torch.randn(2, 16, 13, 10)
    for case in ('hook', 'group norm', 'no kernels'):
        graph_ops = []
        block_norm = nn.GroupNorm(4, 16) if case == 'group norm' else norm
        if case == 'no kernels':
            handle.remove()
            monkeypatch.setitem(gather_op.KERNELS, 'block_tail', {})
        compiled = torch.compile(
            lambda t: ge_block_tail(ge, t, None, norm=block_norm, relu=True),
            fullgraph=True, backend=_recording_backend(graph_ops))
        compiled(x.clone().requires_grad_())
        assert 'mmge.block_tail.default' not in graph_ops, case
        assert 'mmge.excite.default' in graph_ops, case
    assert fired == [1]
