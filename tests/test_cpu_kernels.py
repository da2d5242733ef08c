"""GE's native CPU kernels (mmge/csrc/ge_cpu.c, ge_conv_gather.c) and the
path built on them.

The kernels run on float32; every test compares them with the ATen ops (or
the plain formula of docs/operators.md) computed in float64 from the same numbers.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmge.models.layers.ge_block import ge_block_tail
from mmge.models import GatherExcite, GEResNet
from mmge.ops import cpu_kernels
from mmge.models.layers.excite import Excite
from mmge.models.layers.ge_autograd import (conv_gather_forward,
                                             conv_gather_params)
from mmge.ops.resize import resize_multiply
from mmge.models.layers.gather import ConvGather

SIZES = ((13, 9), (16, 16), (1, 31), (29, 2), (7, 7), (56, 56), (25, 42),
         (8, 1), (3, 3))
TOL = dict(atol=2e-5, rtol=1e-4)


def close(got, expect):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expect, **TOL)


def test_the_kernels_are_built():
    """setup.py builds them; a broken build must not pass silently."""
    assert cpu_kernels.available()
    assert cpu_kernels.usable(torch.zeros(1, 1, 2, 2))
    assert not cpu_kernels.usable(torch.zeros(1, 1, 2, 2, dtype=torch.float64))
    assert not cpu_kernels.usable(torch.zeros(1, 1, 4, 4)[..., ::2])


def _affine(c, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, generator=g, dtype=torch.float64), \
        torch.randn(c, generator=g, dtype=torch.float64)


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('extent', (2, 4, 8))
@pytest.mark.parametrize('affine', (False, True))
def test_pool_gather_is_avg_pool(size, extent, affine):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    scale, shift = _affine(3, 1) if affine else (None, None)
    y = x if not affine else \
        x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    expect = F.avg_pool2d(y, 2 * extent - 1, extent, extent - 1,
                          count_include_pad=False)
    got = cpu_kernels.pool_gather(
        x.float(), extent, None if scale is None else scale.float(),
        None if shift is None else shift.float())
    close(got, expect)


@pytest.mark.parametrize('size,gate', (((56, 56), (7, 7)), ((13, 9), (2, 2)),
                                       ((13, 9), (5, 4)), ((10, 10), (3, 7)),
                                       ((7, 7), (1, 1)), ((1, 31), (1, 4))))
@pytest.mark.parametrize('affine', (False, True))
def test_gate_grad_excite_and_input_grad_are_the_resize(size, gate, affine):
    """Divisible sizes and not: the nearest resize's own indices."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    grad = torch.randn_like(x)
    identity = torch.randn_like(x)
    g = torch.rand(2, 3, *gate, dtype=torch.float64)
    scale, shift = _affine(3, 2) if affine else (None, None)
    y = x if not affine else \
        x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    # float32 resize indices, as the kernels use for float32 tensors
    up = F.interpolate(g.float(), size=size, mode='nearest').double()
    leaf = g.clone().requires_grad_(True)
    product = y * F.interpolate(
        leaf.float(), size=size, mode='nearest').double()
    expect_gate_grad, = torch.autograd.grad(product, leaf, grad)

    f = dict(x=x.float(), grad=grad.float(), gate=g.float(),
             identity=identity.float())
    close(cpu_kernels.gate_grad(
        f['grad'], f['x'], gate, None if scale is None else scale.float(),
        None if shift is None else shift.float()), expect_gate_grad)
    close(cpu_kernels.input_grad(f['grad'], f['gate']), grad * up)
    close(cpu_kernels.excite(f['x'], f['gate']), x * up)
    close(cpu_kernels.excite(f['x'], f['gate'], f['identity']),
          x * up + identity)
    inplace = f['x'].clone()
    out = cpu_kernels.excite(inplace, f['gate'], f['identity'], out=inplace)
    assert out.data_ptr() == inplace.data_ptr()
    close(inplace, x * up + identity)


@pytest.mark.parametrize('size,gate', (((56, 56), (7, 7)), ((13, 9), (5, 4)),
                                       ((7, 7), (1, 1)), ((12, 5), (3, 1))))
def test_excite_applies_the_blocks_relu(size, gate):
    """relu=True gives torch.relu of the result, in place too; a NaN stays
    NaN, as ATen's ReLU keeps it (gate widths 1 take a loop of their
    own; the last cell of a row is in the vector that ends the row)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    x[0, 0, 0, 0] = x[1, 2, -1, -1] = float('nan')
    identity = torch.randn_like(x)
    g = torch.rand(2, 3, *gate, dtype=torch.float64)
    scale, shift = _affine(3, 3)
    y = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    up = F.interpolate(g.float(), size=size, mode='nearest').double()
    before = y * up + identity
    assert (before < 0).any()
    f = [t.float() for t in (x, g, identity, scale, shift)]
    for out in (None, f[0].clone()):
        got = cpu_kernels.excite(out if out is not None else f[0], f[1],
                                 f[2], out=out, scale=f[3], shift=f[4],
                                 relu=True)
        assert out is None or got.data_ptr() == out.data_ptr()
        assert torch.isnan(got[0, 0, 0, 0]) and torch.isnan(got[1, 2, -1, -1])
        torch.testing.assert_close(got.double(), before.relu(),
                                   equal_nan=True, **TOL)


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('extent', (2, 8))
@pytest.mark.parametrize('affine,relu', ((False, False), (True, True)))
def test_pool_excite_is_the_pool_then_the_excite(size, extent, affine, relu):
    """GE-theta-minus's one-pass inference kernel: the formula's values,
    with the shortcut and without."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    identity = torch.randn_like(x)
    scale, shift = _affine(3, 4) if affine else (None, None)
    y = x if not affine else \
        x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    gate = F.avg_pool2d(y, 2 * extent - 1, extent, extent - 1,
                        count_include_pad=False).sigmoid()
    up = F.interpolate(gate.float(), size=size, mode='nearest').double()
    f = {k: None if v is None else v.float()
         for k, v in dict(x=x, identity=identity, scale=scale,
                          shift=shift).items()}
    for ident in (None, f['identity']):
        expect = y * up + (0 if ident is None else identity)
        got = cpu_kernels.pool_excite(f['x'], extent, ident, f['scale'],
                                      f['shift'], relu)
        close(got, expect.relu() if relu else expect)


@pytest.mark.parametrize('planes,size', ((2 * 11, (16, 16)),
                                         (3 * 9, (7, 7)),
                                         (2, (370, 362))))
def test_pool_excite_in_groups_of_planes(planes, size):
    """The kernel pools up to eight planes (fewer when they would not fit
    in the cache together: one at 370x362) before their gates go through
    one vector sigmoid: every plane of a group, the last group's too, gets
    its own gate."""
    torch.manual_seed(0)
    x = torch.randn(1, planes, *size)
    identity = torch.randn_like(x)
    gate = F.avg_pool2d(x.double(), 15, 8, 7,
                        count_include_pad=False).sigmoid()
    expect = x.double() * F.interpolate(gate, size=size, mode='nearest') + \
        identity.double()
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(cpu_kernels.pool_excite(x, 8, identity))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*results)
    close(results[0], expect)


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('extent', (2, 4, 8))
def test_input_grad_adds_the_pools_backward(size, extent):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    pooled = F.avg_pool2d(x, 2 * extent - 1, extent, extent - 1,
                          count_include_pad=False)
    pool_grad = torch.randn_like(pooled)
    gate = torch.rand_like(pooled)
    grad = torch.randn_like(x)
    expect, = torch.autograd.grad(pooled, x, pool_grad)
    expect = expect + grad * F.interpolate(
        gate.float(), size=size, mode='nearest').double()
    got = cpu_kernels.input_grad(grad.float(), gate.float(),
                                 pool_grad.float(), extent)
    close(got, expect)


def test_kernels_split_over_threads_give_the_same_values():
    """Above the kernels' parallel threshold the planes are split over
    PyTorch's threads; one thread and two must agree exactly."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 56, 56)
    grad, gate = torch.randn_like(x), torch.rand(2, 64, 7, 7)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((cpu_kernels.pool_gather(x, 8),
                            cpu_kernels.gate_grad(grad, x, (7, 7)),
                            cpu_kernels.input_grad(grad, gate, gate, 8),
                            cpu_kernels.excite(x, gate, grad)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)
    close(results[0][0], F.avg_pool2d(x.double(), 15, 8, 7,
                                      count_include_pad=False))


def count_calls(monkeypatch, name):
    """Wrap ``cpu_kernels.<name>`` to record its calls; returns the list
    (each call's keyword arguments)."""
    calls, kernel = [], getattr(cpu_kernels, name)

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels, name, spy)
    return calls


def count_kernel_calls(monkeypatch):
    """Record every call into the native library (wrappers or prepared
    calls alike); returns the list of ``(name, args)``."""
    calls, lib = [], cpu_kernels._library()

    class Spy:
        def __getattr__(self, name):
            fn = getattr(lib, name)

            def spy(*args):
                calls.append((name, args))
                return fn(*args)

            return spy

    monkeypatch.setattr(cpu_kernels, '_library', Spy)
    return calls


def _theta_minus_pair(channels, train_norm, momentum=0.1, affine=True):
    torch.manual_seed(0)
    layer = GatherExcite(channels, 'theta_minus', 8)
    norm = nn.BatchNorm2d(channels, momentum=momentum, affine=affine)
    if affine:
        nn.init.uniform_(norm.weight, 0.5, 1.5)
        nn.init.uniform_(norm.bias, -0.5, 0.5)
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    norm.train(train_norm)
    return layer, norm


@pytest.mark.parametrize('memory_efficient', (False, True))
@pytest.mark.parametrize('train_norm', (True, False))
@pytest.mark.parametrize('momentum', (0.1, None))
@pytest.mark.parametrize('size', ((56, 56), (13, 9), (7, 7)))
def test_native_theta_minus_equals_the_formula(memory_efficient, train_norm,
                                               momentum, size, monkeypatch):
    """GE-theta-minus in a block (norm given, as GEResNet calls it) on the
    native path: output, the gradients of the norm's input, the shortcut,
    the norm's weight and bias, and the norm's running statistics are
    those of the plain formula in float64."""
    layer, norm = _theta_minus_pair(4, train_norm, momentum)
    layer.memory_efficient = memory_efficient
    ref_norm = copy.deepcopy(norm).double()
    torch.manual_seed(1)
    inp = torch.randn(2, 4, *size, dtype=torch.float64) * 2 + 0.3
    identity = torch.randn_like(inp)
    grad = torch.randn_like(inp)
    leaves = [t.float().requires_grad_(True) for t in (inp, identity)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (inp, identity)]

    calls = count_calls(monkeypatch, 'input_grad')
    out = ge_block_tail(layer, leaves[0], leaves[1], norm=norm)
    out.backward(grad.float())
    assert calls, 'the native backward was not taken'

    y = ref_norm(ref_leaves[0])
    gate = F.interpolate(
        F.avg_pool2d(y, 15, 8, 7, count_include_pad=False).sigmoid(),
        size=size, mode='nearest')
    ref_out = y * gate + ref_leaves[1]
    ref_out.backward(grad)
    close(out.detach(), ref_out.detach())
    for leaf, ref in zip(leaves, ref_leaves):
        close(leaf.grad, ref.grad)
    close(norm.weight.grad, ref_norm.weight.grad)
    close(norm.bias.grad, ref_norm.bias.grad)
    close(norm.running_mean, ref_norm.running_mean)
    close(norm.running_var, ref_norm.running_var)
    assert int(norm.num_batches_tracked) == int(ref_norm.num_batches_tracked)


def test_native_theta_minus_without_norm_affine_or_running_stats():
    """A BatchNorm2d without weight and bias and without running
    statistics, and GE called without a norm."""
    torch.manual_seed(0)
    layer = GatherExcite(3, 'theta_minus', 4)
    norm = nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    inp = torch.randn(2, 3, 11, 10, dtype=torch.float64)
    grad = torch.randn_like(inp)
    for with_norm in (True, False):
        leaf = inp.float().requires_grad_(True)
        ref = inp.clone().requires_grad_(True)
        out = ge_block_tail(
                layer, leaf, None, norm=norm if with_norm else None)
        out.backward(grad.float())
        y = F.batch_norm(ref, None, None, training=True) if with_norm \
            else ref
        gate = F.avg_pool2d(y, 7, 4, 3, count_include_pad=False).sigmoid()
        ref_out = y * F.interpolate(gate, size=(11, 10), mode='nearest')
        ref_out.backward(grad)
        close(out.detach(), ref_out.detach())
        close(leaf.grad, ref.grad)


@pytest.mark.parametrize('variant', ('theta_minus', 'theta', 'theta_plus'))
def test_native_path_keeps_only_the_norms_input(variant):
    """On the native path both modes keep the norm's input (which the
    block keeps anyway), not GE's input."""
    layer, norm = _theta_minus_pair(4, True)
    layer = GatherExcite(4, variant, 8, reduction=2)
    inp = torch.randn(2, 4, 16, 16, requires_grad=True)
    identity = torch.randn_like(inp, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ge_block_tail(layer, inp, identity, norm=norm)
    big = [t for t in saved if t.numel() == inp.numel()]
    assert big and all(t.data_ptr() == inp.data_ptr() for t in big)


@pytest.mark.parametrize('variant', ('theta_minus', 'theta', 'theta_plus'))
@pytest.mark.parametrize('size', ((32, 32), (7, 7), (13, 9)))
def test_inference_equals_the_formula_and_keeps_the_callers_tensors(
        variant, size, monkeypatch):
    """Without grad, GE on the kernels makes the norm's output on the fly
    (excite with the norm's affine) in one kernel call: GE-theta-minus pools
    and excites each plane, GE-theta(-plus)'s gather kernel also runs the
    gate (the MLP included) and the excite. The formula's values in
    float64, and the caller's input and shortcut stay as they were."""
    layer, norm = _theta_pair(variant, 2, False)
    inp, identity = torch.randn(2, 11, *size), torch.randn(2, 11, *size)
    kept = inp.clone(), identity.clone()
    calls = count_kernel_calls(monkeypatch)
    kernel = 'ge_pool_excite' if variant == 'theta_minus' else \
        'ge_conv_gather'
    with torch.no_grad():
        ref = _formula_forward(copy.deepcopy(layer).double())(
            inp.double(), identity.double(), copy.deepcopy(norm).double())
        # the first call prepares the kernel call, the second replays it
        outs = [ge_block_tail(
                layer, inp, identity, norm=norm) for _ in range(2)]
    assert [name for name, _ in calls] == [kernel] * 2, \
        'the native inference was not taken in one call'
    if variant != 'theta_minus':
        for _, args in calls:
            spec = args[-4]._obj  # the excite runs in the gather's call
            assert spec.identity == identity.data_ptr()
            assert bool(spec.mlp_w1) == (variant == 'theta_plus')
    close(outs[0], ref)
    assert torch.equal(outs[0], outs[1])
    assert outs[0].data_ptr() != outs[1].data_ptr()
    assert torch.equal(inp, kept[0]) and torch.equal(identity, kept[1])


@pytest.mark.parametrize('variant', ('theta_minus', 'theta', 'theta_plus'))
def test_inference_gates_in_place_without_touching_the_callers_tensors(
        variant):
    """Without grad and with a norm in training mode, GE-theta-minus writes
    into the norm's output, which it made itself, and GE-theta(-plus) run
    the norm inside the gather's kernel: the modules' values and running
    statistics, and the caller's input and shortcut stay as they were."""
    torch.manual_seed(0)
    layer = GatherExcite(8, variant, 2).eval()
    norm = nn.BatchNorm2d(8).train()
    inp, identity = torch.randn(2, 8, 32, 32), torch.randn(2, 8, 32, 32)
    kept = inp.clone(), identity.clone()
    with torch.no_grad():
        used = copy.deepcopy(norm)
        out = ge_block_tail(layer, inp, identity, norm=used)
        y = norm(inp)  # one forward: the running statistics GE must leave
        expect = resize_multiply(y, layer.excite.gate(layer.gather(y)),
                                 identity)
        alone = layer(inp)
        expect_alone = resize_multiply(
            inp, layer.excite.gate(layer.gather(inp)))
    assert torch.equal(inp, kept[0]) and torch.equal(identity, kept[1])
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(alone, expect_alone)
    _buffers_close(used, norm)


def _conv_gather(channels, extent, last_act=False, train=True, **kwargs):
    torch.manual_seed(0)
    gather = ConvGather(channels, extent, last_act=last_act, **kwargs)
    for m in gather.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
        elif isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0, 0.5)
    return gather.train(train)


def _buffers_close(module, ref):
    for (name, b), r in zip(module.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b.double(), r.double(), atol=2e-5,
                                   rtol=1e-4, msg=name)


def native_gather(gather, x):
    """``gather(x)`` on the native kernel, as GE's fused paths run it."""
    params = conv_gather_params(gather, x)
    assert params is not None, 'the kernel does not take this gather'
    return conv_gather_forward(gather, x, params).context


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('extent', (2, 4, 8))
@pytest.mark.parametrize('train', (True, False))
def test_conv_gather_is_the_modules(size, extent, train, monkeypatch):
    """GE-theta's gather on the kernel (conv_gather_forward) gives the
    modules' output in float64 and updates the running statistics and
    num_batches_tracked as they do. 11 channels: one full block of the
    kernel's 8 and one partial."""
    gather = _conv_gather(11, extent, last_act=extent == 4, train=train)
    ref = copy.deepcopy(gather).double()
    x = torch.randn(4, 11, *size, dtype=torch.float64)
    calls = count_calls(monkeypatch, 'conv_gather')
    with torch.no_grad():
        got = native_gather(gather, x.float())
        expect = ref(x)
    assert calls, 'the kernel was not used'
    close(got, expect)
    _buffers_close(gather, ref)


@pytest.mark.parametrize('case', ('cumulative', 'untracked', 'float64',
                                  'one_in_eval'))
def test_conv_gather_updates_running_stats_as_the_modules(case,
                                                          monkeypatch):
    """The kernel updates the training levels' running statistics and
    num_batches_tracked itself (float32 ones of a norm in training mode),
    as the modules do over two calls: a cumulative momentum (None), a norm
    that does not track, float64 running statistics (left to Python), a
    level in eval mode among training ones."""
    norm_cfg = dict(type='BN', momentum=None) if case == 'cumulative' \
        else dict(type='BN')
    gather = _conv_gather(11, 8, norm_cfg=norm_cfg)
    norms = [m for m in gather.modules() if isinstance(m, nn.BatchNorm2d)]
    if case == 'untracked':
        norms[1].track_running_stats = False
        for name in ('running_mean', 'running_var', 'num_batches_tracked'):
            norms[1]._buffers[name] = None
    if case == 'one_in_eval':
        norms[1].eval()
    ref = copy.deepcopy(gather)
    if case == 'float64':  # the reference's stay float32 (ATen's need)
        for name in ('running_mean', 'running_var'):
            norms[1]._buffers[name] = norms[1]._buffers[name].double()
    for step in range(2):
        x = torch.randn(4, 11, 30, 23)
        calls = count_calls(monkeypatch, 'conv_gather')
        with torch.no_grad():
            native_gather(gather, x)
        assert calls, 'the kernel was not used'
        monkeypatch.undo()
        with torch.no_grad():
            ref(x)
    for norm, want in zip(norms, [m for m in ref.modules()
                                  if isinstance(m, nn.BatchNorm2d)]):
        for (name, b), w in zip(norm.named_buffers(), want.buffers()):
            torch.testing.assert_close(b.double(), w.double(), atol=2e-5,
                                       rtol=1e-4, msg=name)
    assert int(norms[0].num_batches_tracked) == 2


@pytest.mark.parametrize('size', ((56, 56), (13, 9), (7, 7)))
def test_conv_gather_of_an_affine_map_and_the_gates_gradient(size):
    """The kernel gathers ``scale * x + shift`` made on the fly, returns
    the first level's batch statistics, and the gate's gradient
    ``resize^T(grad * y)``."""
    gather = _conv_gather(11, 8)
    ref = copy.deepcopy(gather).double()
    torch.manual_seed(1)
    x = torch.randn(2, 11, *size, dtype=torch.float64)
    grad = torch.randn_like(x)
    scale, shift = _affine(11, 1)
    y = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    params = conv_gather_params(gather, x.float())
    context, mean, var, grad_gate, *_ = cpu_kernels.conv_gather(
        x.float(), params, scale.float(), shift.float(), grad.float())
    close(context, ref(y))
    z = F.conv2d(y, ref.convs[0].conv.weight, stride=2, padding=1,
                 groups=11)
    close(mean[0], z.mean((0, 2, 3)))
    close(var[0], z.var((0, 2, 3), unbiased=False))
    gate = torch.zeros_like(context, dtype=torch.float64,
                            requires_grad=True)
    expect, = torch.autograd.grad(
        F.interpolate(gate, size=size, mode='nearest'), gate, grad * y)
    close(grad_gate, expect)
    with pytest.raises(ValueError, match='gate and dcontext together'):
        cpu_kernels.conv_gather_backward(x.float(), params, grad.float(),
                                         gate=context)


def test_conv_gather_backward_from_a_kept_first_level():
    """GE-theta-plus's backward keeps the first level from the kernel's
    first call: the second call then gives the same values bit for bit,
    and refuses level1 without the context's gradient."""
    gather = _conv_gather(11, 8, last_act=True)
    x, grad = torch.randn(2, 11, 30, 23), torch.randn(2, 11, 30, 23)
    scale, shift = torch.rand(11), torch.rand(11)
    params = conv_gather_params(gather, x)
    first = cpu_kernels.conv_gather(x, params, scale, shift, grad,
                                    keep_level1=True)
    context, grad_gate, level1 = first.context, first.grad_gate, first.level1
    gate, dcontext = context.sigmoid(), grad_gate * 0.3
    again = cpu_kernels.conv_gather_backward(x, params, grad, scale, shift,
                                             gate, dcontext)
    kept = cpu_kernels.conv_gather_backward(x, params, grad, scale, shift,
                                            gate, dcontext, level1)
    _bit_equal(again, kept)
    with pytest.raises(ValueError, match='level1 replaces the input'):
        cpu_kernels.conv_gather_backward(x, params, grad, scale, shift,
                                         level1=level1)


def _mlp_reference(context, grad_gate, mlp):
    """GE-theta-plus's MLP on ``context``'s cells in float64 autograd: the
    gate, the context's gradient for ``grad_gate``, and the gradients of
    the MLP's tensors (None where a bias is None), as float32 tensors."""
    n, c, h, w = context.shape
    rows = context.double().permute(0, 2, 3, 1).reshape(-1, c)
    rows.requires_grad_(True)
    tensors = [None if t is None else t.double().requires_grad_(True)
               for t in mlp[:4]]
    w1, b1, w2, b2 = tensors
    hidden = F.linear(rows, w1.flatten(1), b1)
    gate = F.linear(hidden.relu() if mlp.relu else hidden, w2.flatten(1),
                    b2).sigmoid()
    wrt = [rows] + [t for t in tensors if t is not None]
    grads = iter(torch.autograd.grad(
        gate, wrt, grad_gate.double().permute(0, 2, 3, 1).reshape(-1, c)))

    def nchw(t):
        return t.view(n, h, w, c).permute(0, 3, 1, 2).float()

    dcontext = nchw(next(grads))
    return (nchw(gate.detach()), dcontext,
            [None if t is None else next(grads).float() for t in tensors])


@pytest.mark.parametrize('layout', ('contiguous', 'channels_last'))
# (no map of one row: with extent 8 the last level's norm then sees 2 values,
# and its gradient is rounding of larger terms that cancel)
@pytest.mark.parametrize('size', ((20, 18), (13, 9), (56, 56), (9, 40)))
def test_conv_gather_backward_runs_the_mlps_backward(layout, size):
    """GE-theta-plus's backward in one call: given the MLP, the kernel runs
    its forward and backward between the gather's forward and backward.
    Every gradient is the two-call path's with the MLP's gate and
    gradients from float64 autograd; the MLP's own gradients are
    autograd's too. With and without the norm's statistics, a ReLU between
    the MLP's layers or none, biases or none, 3, 11 and 20 channels (hidden
    widths 1, 2 and 5: a part block alone, units split unevenly over
    threads); the MLP is refused
    together with a gate, a context gradient or a kept first level. Given
    the context its forward kept (``keep_context``), the call gives the
    same values without gathering it again; a context without the MLP, of
    another shape or dtype is refused."""
    fmt = torch.channels_last if layout == 'channels_last' else \
        torch.contiguous_format
    for channels in (3, 11, 20):
        gather = _conv_gather(channels, 8, last_act=True)
        x, grad = (torch.randn(2, channels, *size).contiguous(
            memory_format=fmt) for _ in range(2))
        params = conv_gather_params(gather, x)
        scale, shift = torch.rand(channels) + 0.5, torch.randn(channels)
        stats = cpu_kernels.NormStats(x.mean((0, 2, 3)),
                                      torch.rand(channels) + 0.5, True)
        hidden = max(1, channels // 4)
        torch.manual_seed(3)
        w1, w2 = torch.randn(hidden, channels, 1, 1), torch.randn(
            channels, hidden, 1, 1)
        b1, b2 = torch.randn(hidden), torch.randn(channels)
        for relu, biases, with_stats in ((True, True, True),
                                         (False, True, False),
                                         (True, False, False)):
            mlp = cpu_kernels.MLPParams(w1, b1 if biases else None, w2,
                                        b2 if biases else None, relu)
            st = stats if with_stats else None
            first = cpu_kernels.conv_gather(x, params, scale, shift, grad,
                                            channels_last=True)
            gate, dcontext, mlp_grads = _mlp_reference(
                first.context, first.grad_gate, mlp)
            want = cpu_kernels.conv_gather_backward(
                x, params, grad, scale, shift, gate, dcontext, stats=st)
            got = cpu_kernels.conv_gather_backward(x, params, grad, scale,
                                                   shift, stats=st, mlp=mlp)
            assert got.dx.is_contiguous(memory_format=fmt)
            want = want._replace(
                **dict(zip(cpu_kernels.MLP_GRADS, mlp_grads)))
            for field, g, e in zip(got._fields, got, want):
                assert (g is None) == (e is None), field
                if g is not None:
                    close_to_scale(g, e.view_as(g), field)
            # given the context its forward kept, the call does not gather
            # it again: the same values (bit for bit where the forward's
            # gather is the backward's, without the norm's statistics)
            context = cpu_kernels.conv_gather(
                x, params, scale, shift,
                excite=cpu_kernels.Excitation(mlp=mlp),
                keep_context=True).context
            assert context.is_contiguous(memory_format=torch.channels_last)
            kept = cpu_kernels.conv_gather_backward(
                x, params, grad, scale, shift, stats=st, mlp=mlp,
                context=context)
            if st is None:
                _bit_equal(kept, got)
            else:
                for field, g, e in zip(got._fields, kept, got):
                    if g is not None:
                        close_to_scale(g, e, field)
        for extra in (dict(gate=gate, dcontext=dcontext),
                      dict(level1=cpu_kernels.conv_gather(
                          x, params, scale, shift, keep_level1=True).level1)):
            with pytest.raises(ValueError, match='takes mlp without gate'):
                cpu_kernels.conv_gather_backward(x, params, grad, scale,
                                                 shift, mlp=mlp, **extra)
        for kwargs in (dict(context=context), dict(
                mlp=mlp, context=context[:, :, :1]), dict(
                    mlp=mlp, context=context.double())):
            with pytest.raises(ValueError, match='takes context with mlp'):
                cpu_kernels.conv_gather_backward(x, params, grad, scale,
                                                 shift, **kwargs)
        with pytest.raises(ValueError, match='keep_context is for a call'):
            cpu_kernels.conv_gather(x, params, keep_context=True)


@pytest.mark.parametrize('affine', (True, False))
def test_norm_affine_is_the_eval_batch_norm(affine):
    """invstd, scale and shift of a batch norm with running statistics, as
    one kernel call: y = scale * x + shift is the module's output."""
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(5, affine=affine, eps=1e-3).eval()
    norm.running_mean.uniform_(-2, 2)
    norm.running_var.uniform_(0.5, 2)
    if affine:
        nn.init.uniform_(norm.weight, 0.5, 1.5)
        nn.init.uniform_(norm.bias, -0.5, 0.5)
    invstd, scale, shift = cpu_kernels.norm_affine(
        norm.running_mean, norm.running_var, norm.weight, norm.bias,
        norm.eps)
    expect = (norm.running_var.double() + 1e-3).rsqrt()
    close(invstd, expect)
    x = torch.randn(2, 5, 3, 4)
    with torch.no_grad():
        close(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1),
              norm.double()(x.double()))


def test_small_tensors_channels_last_give_the_same_values():
    """GE-theta-plus's MLP multiplies rows of channels: the kernels write the
    context and the gate's gradient channels-last when asked, and read a
    channels-last gate and context gradient, with the same values bit for
    bit; the excite reads a gate in either layout."""
    gather = _conv_gather(11, 4, last_act=True)
    x, grad = torch.randn(2, 11, 30, 23), torch.randn(2, 11, 30, 23)
    scale, shift = torch.rand(11), torch.rand(11)
    params = conv_gather_params(gather, x)
    nchw = cpu_kernels.conv_gather(x, params, scale, shift, grad)
    nhwc = cpu_kernels.conv_gather(x, params, scale, shift, grad,
                                   channels_last=True)
    for t in (nhwc.context, nhwc.grad_gate):
        assert cpu_kernels.channels_last(t)
    _bit_equal(nchw, nhwc)
    gate, dcontext = nchw.context.sigmoid(), nchw.grad_gate * 0.3
    as_cl = [t.contiguous(memory_format=torch.channels_last)
             for t in (gate, dcontext)]
    _bit_equal(
        cpu_kernels.conv_gather_backward(x, params, grad, scale, shift, gate,
                                         dcontext),
        cpu_kernels.conv_gather_backward(x, params, grad, scale, shift,
                                         *as_cl))
    assert torch.equal(cpu_kernels.excite(x, gate, grad),
                       cpu_kernels.excite(x, as_cl[0], grad))
    odd = gate.transpose(2, 3).contiguous().transpose(2, 3)  # neither
    assert torch.equal(cpu_kernels.excite(x, gate), cpu_kernels.excite(x, odd))


def _fused_norm(channels, affine=True):
    torch.manual_seed(2)
    norm = nn.BatchNorm2d(channels, affine=affine).double()
    if affine:
        nn.init.uniform_(norm.weight, 0.5, 1.5)
        nn.init.uniform_(norm.bias, -0.5, 0.5)
    return norm


def _features(shape, offset, seed):
    """float64 features that float32 holds exactly, spread 0.5 around
    ``offset``."""
    torch.manual_seed(seed)
    return (torch.randn(shape) * 0.5 + offset).double()


def close_as_aten(got, expect, aten):
    """``got`` (float32) is about as close to the float64 ``expect`` as
    ATen's float32 ``aten`` is: for features far from zero, where float32
    itself cannot do better. The kernels make ``y = scale * x + shift``,
    whose rounding is about ``ulp(scale * x)``: a few times ATen's
    ``(x - mean) * invstd * weight + bias`` there (both far below the usual
    tolerance)."""
    err = (got.double() - expect).abs().max().item()
    bound = 5 * (aten.double() - expect).abs().max().item() + 2e-6
    assert err <= bound, (err, bound)


@pytest.mark.parametrize('size', ((56, 56), (13, 9), (7, 7), (1, 31)))
@pytest.mark.parametrize('offset', (0.0, 40.0))
@pytest.mark.parametrize('affine', (True, False))
def test_conv_gather_runs_the_norm_before_it(size, offset, affine):
    """Given the batch norm before the gather (training), the kernel
    computes its batch statistics in its pass over x and gathers norm(x):
    the context and the statistics are the float64 modules', also for
    features far from zero (offset 40, spread 0.5: as close as ATen's
    float32)."""
    gather = _conv_gather(11, 8)
    norm = _fused_norm(11, affine)
    x = _features((3, 11, *size), offset, 3)

    def modules(dtype):
        n = copy.deepcopy(norm).to(dtype)
        return copy.deepcopy(gather).to(dtype)(n(x.to(dtype))).detach()

    fused = cpu_kernels.FusedNorm(
        None if norm.weight is None else norm.weight.float(),
        None if norm.bias is None else norm.bias.float(), norm.eps)
    got = cpu_kernels.conv_gather(x.float(),
                                  conv_gather_params(gather, x.float()),
                                  norm=fused)
    if offset:
        close_as_aten(got.context, modules(torch.float64),
                      modules(torch.float32))
    else:
        close(got.context, modules(torch.float64))
    close(got.norm_mean, x.mean((0, 2, 3)))
    close(got.norm_var, x.var((0, 2, 3), unbiased=False))
    grad = torch.randn(3, 11, *size)
    with pytest.raises(ValueError, match='fused norm'):
        cpu_kernels.conv_gather(x.float(), conv_gather_params(gather, x.float()),
                                torch.ones(11), torch.zeros(11), norm=fused)
    with pytest.raises(ValueError, match='fused norm'):
        cpu_kernels.conv_gather(x.float(), conv_gather_params(gather, x.float()),
                                grad=grad, norm=fused)


@pytest.mark.parametrize('size', ((56, 56), (13, 9), (7, 7)))
@pytest.mark.parametrize('train', (True, False))
@pytest.mark.parametrize('offset', (0.0, 40.0))
def test_conv_gather_backward_runs_the_norms_backward(size, train, offset):
    """Given the statistics of the batch norm that made y, the backward
    returns the gradient of the norm's input (through batch statistics in
    training, running ones else) and of its weight and bias: autograd's in
    float64 (as close as ATen's float32 for features far from zero)."""
    gather = _conv_gather(11, 8, train=train)
    norm = _fused_norm(11).train(train)
    norm.running_mean.uniform_(-1, 1).add_(offset)
    norm.running_var.uniform_(0.5, 2)
    x = _features((2, 11, *size), offset, 4)
    grad = torch.randn_like(x)

    def autograd(dtype):
        n, g = copy.deepcopy(norm).to(dtype), copy.deepcopy(gather).to(dtype)
        leaf = x.to(dtype).requires_grad_(True)
        y = F.batch_norm(leaf, n.running_mean, n.running_var, n.weight,
                         n.bias, train, 0.0, n.eps)
        out = y * F.interpolate(g(y).sigmoid(), size=size, mode='nearest')
        return torch.autograd.grad(out, [leaf, n.weight, n.bias],
                                   grad.to(dtype))

    if train:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    else:
        mean, var = norm.running_mean, norm.running_var
    invstd = (var + norm.eps).rsqrt()
    scale = norm.weight.detach() * invstd
    shift = norm.bias.detach() - mean * scale
    xf = x.float()
    got = cpu_kernels.conv_gather_backward(
        xf, conv_gather_params(gather, xf), grad.float(), scale.float(),
        shift.float(),
        stats=cpu_kernels.NormStats(mean.float(), invstd.float(), train))
    got = (got.dx, got.norm_dweight, got.norm_dbias)
    expect = autograd(torch.float64)
    aten = autograd(torch.float32) if offset else (None, ) * 3
    for g, e, a in zip(got, expect, aten):
        if offset:
            close_as_aten(g, e, a)
        else:
            close(g, e)


def _bit_equal(first, second):
    """Two kernel results: the same fields given, bit-equal."""
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert (a is None) == (b is None)
        assert a is None or torch.equal(a, b)


def _theta_pair(variant, extent, train):
    torch.manual_seed(0)
    layer = GatherExcite(11, variant, extent, reduction=2)
    norm = nn.BatchNorm2d(11)
    for bn in [norm] + [m for m in layer.modules()
                        if isinstance(m, nn.BatchNorm2d)]:
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return layer.train(train), norm.train(train)


@pytest.mark.parametrize('variant', ('theta', 'theta_plus'))
@pytest.mark.parametrize('extent', (2, 8))
@pytest.mark.parametrize('train', (True, False))
@pytest.mark.parametrize('size', ((56, 56), (13, 9), (7, 7)))
def test_native_theta_equals_the_formula(variant, extent, train, size,
                                         monkeypatch):
    """GE-theta and GE-theta-plus in a block (norm given), in both modes,
    on the native path: output, the gradients of the norm's input, the
    shortcut and every parameter (gather convolutions and norms, MLP, the
    block's norm), and every buffer are the float64 formula's."""
    torch.manual_seed(1)
    inp = torch.randn(4, 11, *size, dtype=torch.float64) * 2 + 0.3
    identity = torch.randn_like(inp)
    grad = torch.randn_like(inp)
    for memory_efficient in (False, True):
        layer, norm = _theta_pair(variant, extent, train)
        layer.memory_efficient = memory_efficient
        ref_layer = copy.deepcopy(layer).double()
        ref_norm = copy.deepcopy(norm).double()
        leaves = [t.float().requires_grad_(True) for t in (inp, identity)]
        ref_leaves = [t.clone().requires_grad_(True)
                      for t in (inp, identity)]
        calls = count_calls(monkeypatch, 'conv_gather_backward')
        out = ge_block_tail(layer, leaves[0], leaves[1], norm=norm)
        out.backward(grad.float())
        assert calls, 'the native backward was not taken'
        monkeypatch.undo()
        ref_out = _formula_forward(ref_layer)(ref_leaves[0], ref_leaves[1],
                                              ref_norm)
        ref_out.backward(grad)
        close(out.detach(), ref_out.detach())
        for leaf, ref in zip(leaves, ref_leaves):
            close(leaf.grad, ref.grad)
        for module, ref in ((layer, ref_layer), (norm, ref_norm)):
            for (name, p), q in zip(module.named_parameters(),
                                    ref.parameters()):
                torch.testing.assert_close(p.grad.double(), q.grad,
                                           msg=name, **TOL)
            _buffers_close(module, ref)


@pytest.mark.parametrize('variant', ('theta', 'theta_plus'))
@pytest.mark.parametrize('norm_cfg', (
    dict(), dict(momentum=None), dict(track_running_stats=False),
    dict(affine=False)))
def test_native_theta_runs_the_block_norm_in_its_kernels(
        variant, norm_cfg, monkeypatch):
    """In training, GE-theta(-plus) runs the block's batch norm inside its
    kernels (ATen's batch norm is not called, forward or backward): the
    output, the gradients and the norm's running statistics and
    num_batches_tracked are the float64 formula's, for every kind of plain
    batch norm."""
    torch.manual_seed(5)
    layer = GatherExcite(11, variant, 8, reduction=2).train()
    norm = nn.BatchNorm2d(11, **norm_cfg).train()
    if norm.weight is not None:
        nn.init.uniform_(norm.weight, 0.5, 1.5)
        nn.init.uniform_(norm.bias, -0.5, 0.5)
    ref_layer, ref_norm = (copy.deepcopy(m).double() for m in (layer, norm))
    inp = torch.randn(4, 11, 30, 23, dtype=torch.float64) * 2 + 0.7
    grad = torch.randn_like(inp)
    for _ in range(2):  # twice: the cumulative momentum counts batches
        seen = []
        kernel = cpu_kernels.conv_gather
        monkeypatch.setattr(
            cpu_kernels, 'conv_gather',
            lambda *a, **k: seen.append(k.get('norm')) or kernel(*a, **k))
        for name in ('batch_norm_forward', 'batch_norm_backward'):
            monkeypatch.setattr(
                f'mmge.models.layers.ge_autograd.{name}',
                lambda *a, **k: pytest.fail('ATen batch norm was called'))
        leaf = inp.float().requires_grad_(True)
        out = ge_block_tail(layer, leaf, norm=norm)
        out.backward(grad.float())
        monkeypatch.undo()
        assert any(isinstance(n, cpu_kernels.FusedNorm) for n in seen)
        ref_leaf = inp.clone().requires_grad_(True)
        ref_out = _formula_forward(ref_layer)(ref_leaf, None, ref_norm)
        ref_out.backward(grad)
        close(out.detach(), ref_out.detach())
        close(leaf.grad, ref_leaf.grad)
    for module, ref in ((layer, ref_layer), (norm, ref_norm)):
        for (name, p), q in zip(module.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad.double(), q.grad, msg=name,
                                       **TOL)
        _buffers_close(module, ref)


def test_native_theta_refuses_one_value_per_channel_untouched():
    """A training batch norm that would see one value per channel raises
    PyTorch's error before any running statistic changes."""
    layer = GatherExcite(11, 'theta', 2).eval()
    norm = nn.BatchNorm2d(11).train()
    before = copy.deepcopy((layer.state_dict(), norm.state_dict()))
    leaf = torch.randn(1, 11, 1, 1, requires_grad=True)
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        ge_block_tail(layer, leaf, norm=norm)
    for state, kept in zip((layer.state_dict(), norm.state_dict()), before):
        for name, value in state.items():
            assert torch.equal(value, kept[name]), name


@pytest.mark.parametrize('size', ((56, 56), (13, 9), (7, 7)))
@pytest.mark.parametrize('mlp', (False, True))
@pytest.mark.parametrize('train', (False, True))
def test_conv_gather_excites_what_it_gathers(size, mlp, train):
    """With an Excitation the gather's kernel also makes the gate (through
    GE-theta-plus's MLP, with or without its ReLU) and writes
    ``y * resize(gate) + identity`` and the ReLU: the float64 modules'
    values, for y made by a batch norm with its running statistics (eval)
    or the batch's (training, which also returns them), 11 channels (a
    partial block) and 20 (hidden width 1 after reduction 16); for the MLP
    also hidden widths of two whole vectors (64 / 4) and one past a whole
    vector (72 / 8), its dot products' vector loops and their tails."""
    for channels, reduction in ((11, 16), (20, 16), (64, 4), (72, 8)):
        if reduction != 16 and not mlp:
            continue
        torch.manual_seed(channels)
        gather = _conv_gather(channels, 8, last_act=mlp)
        excite = Excite(channels, reduction if mlp else None)
        norm = _fused_norm(channels).float().train(train)
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        x, identity = torch.randn(2, channels, *size), torch.randn(
            2, channels, *size)
        params = conv_gather_params(gather, x)
        ref_norm = copy.deepcopy(norm).double()
        fused = cpu_kernels.FusedNorm(
            norm.weight, norm.bias, norm.eps,
            *((None, None) if train else (norm.running_mean,
                                          norm.running_var)))
        for relu_between in ((False, True) if mlp else (False, )):
            if mlp:
                excite.mlp[0].activate = nn.ReLU() if relu_between else None
                excite.mlp[0].with_activation = relu_between
            first, second = excite.mlp or (None, None)
            spec = cpu_kernels.Excitation(
                identity, True, None if not mlp else cpu_kernels.MLPParams(
                    first.conv.weight, first.conv.bias, second.conv.weight,
                    second.conv.bias, relu_between))
            with torch.no_grad():
                got = cpu_kernels.conv_gather(x, params, norm=fused,
                                              excite=spec)
                y = ref_norm(x.double())
                context = copy.deepcopy(gather).double()(y)
                gate = copy.deepcopy(excite).double().gate(context)
            expect = (y * F.interpolate(gate, size=size, mode='nearest') +
                      identity.double()).relu()
            assert got.context is None
            close(got.out, expect)
            if train:
                close(got.norm_mean, x.double().mean((0, 2, 3)))
            else:
                assert got.norm_mean is None


@pytest.mark.parametrize('size', ((20, 18), (13, 9), (7, 7), (1, 5), (3, 17)))
@pytest.mark.parametrize('extent', (2, 4, 8))
def test_pool_kernels_read_channels_last(size, extent):
    """GE-theta-minus's kernels on channels-last tensors (the pool, the
    input's gradient with and without the pool's backward, the inference
    pool and excite) give the values they give on contiguous ones, in
    channels-last results, for 11 and 20 channels (vector loops over the
    channels with a tail of 3 and 4); a shortcut in the other layout is
    copied to x's."""
    fmt = torch.channels_last
    for channels in (11, 20):
        torch.manual_seed(channels)
        x = torch.randn(2, channels, *size)
        scale, shift = torch.rand(channels) + 0.5, torch.randn(channels)
        xl = x.contiguous(memory_format=fmt)
        for affine in ((None, None), (scale, shift)):
            want = cpu_kernels.pool_gather(x, extent, *affine)
            got = cpu_kernels.pool_gather(xl, extent, *affine)
            assert got.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        gate = want.sigmoid()
        grad, identity = torch.randn_like(x), torch.randn_like(x)
        pool_grad = torch.randn_like(gate)
        for pg in (None, pool_grad):
            want = cpu_kernels.input_grad(grad, gate, pg, extent)
            # gate and pool_grad in NCHW: copied to the gradient's layout
            got = cpu_kernels.input_grad(grad.contiguous(memory_format=fmt),
                                         gate, pg, extent)
            assert got.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        norm = cpu_kernels.FusedNorm(scale, shift, 1e-5,
                                     torch.randn(channels),
                                     torch.rand(channels) + 0.5)
        for kwargs in (dict(), dict(identity=identity, relu=True),
                       dict(identity=identity, norm=norm)):
            want = cpu_kernels.pool_excite(x, extent, **kwargs)
            got = cpu_kernels.pool_excite(xl, extent, **kwargs)
            assert got.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def close_to_scale(got, want, msg):
    """float32 results of different summation orders: within TOL's atol
    times the larger of 1 and ``want``'s largest magnitude (a value near
    zero in a field of sums of hundreds carries their rounding), and
    TOL's rtol."""
    atol = TOL['atol'] * max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, atol=atol, rtol=TOL['rtol'],
                               msg=msg)


def _same_in_both_layouts(call, x, others, to_scale=False):
    """``call(x, *others)`` with x channels-last (and ``others``, the
    full-resolution operands, in the other layout: copied to x's) returns
    the values of the call on contiguous tensors, its full-resolution
    outputs channels-last; with ``to_scale``, compared by
    :func:`close_to_scale` (gradients through GE-theta-plus's MLP, whose
    input, the gate's gradient, rounds differently in each layout)."""
    fmt = torch.channels_last
    want = call(x, *others)
    got = call(x.contiguous(memory_format=fmt), *others)
    for field, g, w in zip(type(want)._fields, got, want):
        if w is None or field == 'level1':  # the kernel's own layout
            assert g is None or field == 'level1', field
            continue
        if g.dim() == 4 and g.shape[-2:] == x.shape[-2:]:
            assert g.is_contiguous(memory_format=fmt), field
        if to_scale:
            close_to_scale(g, w, field)
        else:
            torch.testing.assert_close(g, w, **TOL, msg=field)


@pytest.mark.parametrize('size',
                         ((20, 18), (13, 9), (7, 7), (1, 5), (32, 32)))
@pytest.mark.parametrize('train', (False, True))
def test_conv_gather_reads_channels_last(size, train):
    """On channels-last x the gather's kernel (forward with the norm and
    the excite, and backward with the norm's backward) gives the values it
    gives on contiguous x, for 11 and 20 channels (a part block after none
    or two whole ones), also when a first call with the norm's statistics
    hands its first pass to the backward; grad and the shortcut in the
    other layout are copied to x's; other layouts are refused. At 32 x 32
    the per-block buffers at the gate's size (2 x 8 x 8 positions, 4 KB)
    lie one cache line more apart (cl_pitch)."""
    for channels in (11, 20):
        gather = _conv_gather(channels, 4, train=train)
        params = conv_gather_params(gather, torch.randn(2, channels, *size))
        excite = Excite(channels, 4)
        first, second = excite.mlp
        mlp = cpu_kernels.MLPParams(first.conv.weight, first.conv.bias,
                                    second.conv.weight, second.conv.bias,
                                    True)
        norm = _fused_norm(channels).float()
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        x = torch.randn(2, channels, *size) * 2 + 1
        identity, grad = torch.randn_like(x), torch.randn_like(x)
        fused = cpu_kernels.FusedNorm(
            norm.weight.detach(), norm.bias.detach(), norm.eps,
            *((None, None) if train else (norm.running_mean,
                                          norm.running_var)))
        scale = torch.rand(channels) + 0.5
        shift = torch.randn(channels)
        _same_in_both_layouts(
            lambda x, g: cpu_kernels.conv_gather(x, params, scale, shift,
                                                 grad=g), x, (grad, ))
        for with_mlp in (False, True):
            _same_in_both_layouts(
                lambda x, i: cpu_kernels.conv_gather(
                    x, params, norm=fused, excite=cpu_kernels.Excitation(
                        i, True, mlp if with_mlp else None)),
                x, (identity, ))
        stats = cpu_kernels.NormStats(x.mean((0, 2, 3)), torch.rand(
            channels) + 0.5, train)
        gate = torch.rand(2, channels, *cpu_kernels.conv_gather_size(
            *size, 2))
        for kept in (False, True):
            _same_in_both_layouts(
                lambda x, g: cpu_kernels.conv_gather_backward(
                    x, params, g, scale, shift, stats=stats),
                x, (grad, ))
            _same_in_both_layouts(
                lambda x, g: cpu_kernels.conv_gather_backward(
                    x, params, g, scale, shift, gate, gate * 0.1,
                    cpu_kernels.conv_gather(x, params, scale, shift,
                                            keep_level1=True).level1
                    if kept else None),
                x, (grad, ))
        # GE-theta-plus's backward in one call, the MLP inside
        _same_in_both_layouts(
            lambda x, g: cpu_kernels.conv_gather_backward(
                x, params, g, scale, shift, stats=stats, mlp=mlp),
            x, (grad, ), to_scale=True)
        # channels-last, a first call given the norm's statistics makes the
        # second's first pass (GE-theta-plus's backward, MLP on autograd)
        _same_in_both_layouts(
            lambda x, g: cpu_kernels.conv_gather_backward(
                x, params, g, scale, shift, gate, gate * 0.1,
                cpu_kernels.conv_gather(
                    x, params, scale, shift, g, keep_level1=True,
                    stats=None if x.is_contiguous() else stats).level1,
                stats), x, (grad, ))
        with pytest.raises(ValueError, match='contiguous or channels-last'):
            cpu_kernels.conv_gather(
                torch.randn(2, channels, size[0], 2 * size[1])[..., ::2],
                params)


def test_conv_gather_excite_only_in_a_forward_call():
    """The excite of the gather's kernel belongs to a forward call: with the
    gradient of the output, or keeping the first level, it is refused; a
    norm with running statistics is not given with scale and shift."""
    gather = _conv_gather(8, 4)
    x = torch.randn(2, 8, 16, 16)
    params = conv_gather_params(gather, x)
    spec = cpu_kernels.Excitation()
    with pytest.raises(ValueError, match='excite runs in a forward call'):
        cpu_kernels.conv_gather(x, params, grad=torch.randn_like(x),
                                excite=spec)
    with pytest.raises(ValueError, match='excite runs in a forward call'):
        cpu_kernels.conv_gather(x, params, keep_level1=True, excite=spec)
    running = cpu_kernels.FusedNorm(None, None, 1e-5, torch.zeros(8),
                                    torch.ones(8))
    with pytest.raises(ValueError, match='fused norm'):
        cpu_kernels.conv_gather(x, params, torch.ones(8), torch.zeros(8),
                                norm=running)


@pytest.mark.parametrize('case', ('autocast', 'gelu'))
def test_theta_plus_mlp_the_kernel_does_not_run(case, monkeypatch):
    """GE-theta-plus's MLP runs in the gather's kernel only in its plain
    layout and without autocast; otherwise its modules run between the
    gather's call and the excite's, with their values."""
    torch.manual_seed(0)
    act = dict(type='GELU') if case == 'gelu' else dict(type='ReLU')
    layer = GatherExcite(16, 'theta_plus', 4).eval()
    if case == 'gelu':
        layer.excite = Excite(16, 4, act_cfg=act)
    x, identity = torch.randn(2, 16, 20, 20), torch.randn(2, 16, 20, 20)
    calls = count_calls(monkeypatch, 'conv_gather')
    excites = count_calls(monkeypatch, 'excite')
    with torch.no_grad(), torch.autocast('cpu', enabled=case == 'autocast'):
        out = ge_block_tail(layer, x, identity)
    assert len(calls) == 1 and calls[0]['excite'] is None
    assert len(excites) == 1
    with torch.no_grad():
        context = layer.gather.convs(x)
        gate = F.interpolate(layer.excite.mlp(context).sigmoid(),
                             size=(20, 20), mode='nearest')
    tol = dict(atol=2e-2, rtol=2e-2) if case == 'autocast' else {}
    torch.testing.assert_close(out, x * gate + identity, **tol)


@pytest.mark.parametrize('layout', ('contiguous', 'channels_last'))
def test_conv_gather_split_over_threads_gives_the_same_values(layout):
    """Each channel block runs on one thread in a fixed order, and
    channels-last's row passes add their units' sums in unit order: one
    thread and two give bit-equal results, with and without the fused
    norm, and with GE-theta-plus's MLP (forward and backward; its 10
    hidden units split 5 and 5, so one thread's range ends in an unpaired
    unit)."""
    gather = _conv_gather(43, 8, last_act=True)
    torch.manual_seed(4)
    mlp = cpu_kernels.MLPParams(torch.randn(10, 43, 1, 1), torch.randn(10),
                                torch.randn(43, 10, 1, 1), torch.randn(43),
                                True)
    fmt = torch.channels_last if layout == 'channels_last' else \
        torch.contiguous_format
    x, grad = (torch.randn(2, 43, 56, 56).contiguous(memory_format=fmt)
               for _ in range(2))
    scale, shift = torch.rand(43), torch.rand(43)
    params = conv_gather_params(gather, x)
    stats = cpu_kernels.NormStats(torch.randn(43), torch.rand(43) + 0.5,
                                  True)
    fused = cpu_kernels.FusedNorm(torch.rand(43), torch.rand(43), 1e-5)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(
                cpu_kernels.conv_gather(x, params, scale, shift, grad,
                                        keep_level1=True) +
                cpu_kernels.conv_gather(x, params, norm=fused) +
                cpu_kernels.conv_gather_backward(x, params, grad, scale,
                                                 shift) +
                cpu_kernels.conv_gather_backward(x, params, grad, scale,
                                                 shift, stats=stats) +
                cpu_kernels.conv_gather(x, params, norm=fused,
                                        excite=cpu_kernels.Excitation(
                                            mlp=mlp)) +
                cpu_kernels.conv_gather_backward(x, params, grad, scale,
                                                 shift, stats=stats,
                                                 mlp=mlp))
    finally:
        torch.set_num_threads(threads)
    _bit_equal(*results)


def test_conv_gather_leaves_other_layers_to_their_modules():
    """The kernel takes only what it computes: other activations or norms,
    the global extent, float64, a layout other than contiguous or
    channels-last, and a batch norm that would see one value per channel
    (the module's own error then) take the modules' forward."""
    x = torch.randn(2, 8, 16, 16)
    assert conv_gather_params(_conv_gather(8, 4), x) is not None
    for kwargs in (dict(act_cfg=dict(type='GELU')),
                   dict(norm_cfg=dict(type='GN', num_groups=2)),
                   dict(norm_cfg=dict(type='SyncBN'))):
        gather = _conv_gather(8, 4, **kwargs)
        assert conv_gather_params(gather, x) is None, kwargs
    gather = _conv_gather(8, 4, act_cfg=dict(type='GELU'))
    with torch.no_grad():
        torch.testing.assert_close(gather(x), gather.convs(x))
    assert conv_gather_params(_conv_gather(8, 'global', feat_size=16), x) is None
    gather = _conv_gather(8, 4)
    assert conv_gather_params(gather, x.double()) is None
    assert conv_gather_params(
        gather, x.to(memory_format=torch.channels_last)) is not None
    # a strided view, and H and W swapped in memory
    assert conv_gather_params(
        gather, torch.randn(2, 8, 16, 32)[..., ::2]) is None
    assert conv_gather_params(gather, x.transpose(2, 3)) is None
    one = torch.randn(1, 8, 8, 8)
    assert conv_gather_params(_conv_gather(8, 8), one) is None
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        with torch.no_grad():
            _conv_gather(8, 8)(one)
    assert conv_gather_params(_conv_gather(8, 8, train=False), one) is not None


@pytest.mark.parametrize('variant,kernel', (
    ('theta_minus', 'input_grad'), ('theta', 'conv_gather_backward'),
    ('theta_plus', 'conv_gather_backward')))
def test_ge_resnet_trains_on_the_native_path(variant, kernel, monkeypatch):
    """A GE ResNet's training step gives the float64 formula's gradients
    and running statistics (the native backward runs in every block)."""
    torch.manual_seed(0)
    model = GEResNet(18, ge_cfg=dict(variant=variant, extent=8),
                     out_indices=(3, ))
    model.init_weights()
    ref = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 64, 64)
    calls = count_calls(monkeypatch, kernel)
    model(x)[0].square().mean().backward()
    assert len(calls) == sum(
        isinstance(m, GatherExcite) for m in model.modules()) == 8
    for m in ref.modules():
        if isinstance(m, GatherExcite):
            m.forward = _formula_forward(m)
    ref(x.double())[0].square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, atol=1e-5,
                                   rtol=1e-3, msg=name)
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b.double(), c.double(), atol=1e-5,
                                   rtol=1e-4, msg=name)


def _formula_forward(layer):
    def forward(x, identity=None, norm=None, relu=False):
        if norm is not None:
            x = norm(x)
        if layer.variant == 'theta_minus':
            context = F.avg_pool2d(x, 2 * layer.extent - 1, layer.extent,
                                   layer.extent - 1, count_include_pad=False)
        else:
            context = layer.gather.convs(x)
            if layer.excite.mlp is not None:
                context = layer.excite.mlp(context)
        out = x * F.interpolate(
            context.sigmoid(), size=x.shape[-2:], mode='nearest')
        out = out if identity is None else out + identity
        return out.relu() if relu else out

    return forward
