"""GE's native CPU kernels (mmge/csrc/ge_cpu.c) and the path built on them.

The kernels run on float32; every test compares them with the ATen ops (or
the plain formula of SPEC.md) computed in float64 from the same numbers.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmge.models import GatherExcite, GEResNet
from mmge.models.layers import cpu_kernels
from mmge.models.layers.excite import resize_multiply

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
    """Wrap ``cpu_kernels.<name>`` to record its calls; returns the list."""
    calls, kernel = [], getattr(cpu_kernels, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels, name, spy)
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
    out = layer(leaves[0], leaves[1], norm=norm)
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
        out = layer(leaf, None, norm=norm if with_norm else None)
        out.backward(grad.float())
        y = F.batch_norm(ref, None, None, training=True) if with_norm \
            else ref
        gate = F.avg_pool2d(y, 7, 4, 3, count_include_pad=False).sigmoid()
        ref_out = y * F.interpolate(gate, size=(11, 10), mode='nearest')
        ref_out.backward(grad)
        close(out.detach(), ref_out.detach())
        close(leaf.grad, ref.grad)


def test_native_path_keeps_only_the_norms_input():
    """On the native path both modes keep the norm's input (which the
    block keeps anyway), not GE's input."""
    layer, norm = _theta_minus_pair(4, True)
    inp = torch.randn(2, 4, 16, 16, requires_grad=True)
    identity = torch.randn_like(inp, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(inp, identity, norm=norm)
    big = [t for t in saved if t.numel() == inp.numel()]
    assert big and all(t.data_ptr() == inp.data_ptr() for t in big)


@pytest.mark.parametrize('variant', ('theta_minus', 'theta', 'theta_plus'))
def test_inference_gates_in_place_without_touching_the_callers_tensors(
        variant):
    """Without grad, GE writes into the norm's output, which it made
    itself; the caller's input and shortcut stay as they were."""
    torch.manual_seed(0)
    layer = GatherExcite(8, variant, 2).eval()
    norm = nn.BatchNorm2d(8).eval()
    inp, identity = torch.randn(2, 8, 32, 32), torch.randn(2, 8, 32, 32)
    kept = inp.clone(), identity.clone()
    with torch.no_grad():
        out = layer(inp, identity, norm=norm)
        expect = resize_multiply(
            norm(inp), layer.excite.gate(layer.gather(norm(inp))), identity)
        alone = layer(inp)
        expect_alone = resize_multiply(
            inp, layer.excite.gate(layer.gather(inp)))
    assert torch.equal(inp, kept[0]) and torch.equal(identity, kept[1])
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(alone, expect_alone)


def test_ge_resnet_theta_minus_trains_on_the_native_path(monkeypatch):
    """A GE-theta-minus ResNet's training step gives the float64 formula's
    gradients (the native backward runs in every block)."""
    torch.manual_seed(0)
    model = GEResNet(18, ge_cfg=dict(variant='theta_minus', extent=8),
                     out_indices=(3, ))
    model.init_weights()
    ref = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 64, 64)
    calls = count_calls(monkeypatch, 'input_grad')
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


def _formula_forward(layer):
    def forward(x, identity=None, norm=None):
        if norm is not None:
            x = norm(x)
        gate = F.avg_pool2d(x, 2 * layer.extent - 1, layer.extent,
                            layer.extent - 1,
                            count_include_pad=False).sigmoid()
        out = x * F.interpolate(gate, size=x.shape[-2:], mode='nearest')
        return out if identity is None else out + identity

    return forward
