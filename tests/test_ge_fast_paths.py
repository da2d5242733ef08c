"""The fast paths of GE against the plain formula of docs/operators.md.

The layer gates through a broadcast instead of a resized gate, adds the
shortcut in the same pass, recomputes the gather in backward and, in its
memory-saving mode, recomputes its input from the norm layer before it.
None of that may change a value: every test compares with autograd through
``x * F.interpolate(sigmoid(f(gather(x))), size=x.shape[-2:])``.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmge.models.layers.ge_block import ge_block_tail
from mmge.models import GatherExcite, GEResNet
from mmge.ops.resize import (block_factor, nearest_index, resize_multiply,
                             resize_multiply_grad)

VARIANTS = ('theta_minus', 'theta', 'theta_plus')
SIZES = ((13, 9), (16, 16), (56, 56), (1, 31), (29, 2), (25, 42))


def formula(layer, x, identity=None, norm=None, relu=False):
    """GE as docs/operators.md writes it, with plain autograd (then the
    block's ReLU, with ``relu``)."""
    if norm is not None:
        x = norm(x)
    gather = layer.gather
    ctx = gather.convs(x) if hasattr(gather, 'convs') else gather(x)
    if layer.excite.mlp is not None:
        ctx = layer.excite.mlp(ctx)
    y = x * F.interpolate(ctx, size=x.shape[-2:], mode='nearest').sigmoid()
    y = y if identity is None else y + identity
    return y.relu() if relu else y


@pytest.mark.parametrize('dtype', (torch.float32, torch.float64))
def test_nearest_index_is_interpolates_own(dtype):
    """In both directions and both precisions (float64 resizes compute
    their indices in double precision and differ, e.g. 2 -> 164)."""
    double = dtype == torch.float64
    for in_size in range(1, 40):
        for out_size in range(in_size, 200):
            ramp = torch.arange(in_size, dtype=dtype)
            expect = F.interpolate(
                ramp.view(1, 1, -1, 1), size=(out_size, 1),
                mode='nearest').view(-1).long()
            assert torch.equal(
                nearest_index(out_size, in_size, double=double), expect)
            s = block_factor(out_size, in_size, double)
            if s:
                assert torch.equal(expect, torch.arange(out_size) // s)
            else:
                assert out_size % in_size or not torch.equal(
                    expect,
                    torch.arange(out_size) // (out_size // in_size))


def test_block_factor_values():
    assert block_factor(56, 7) == 8
    assert block_factor(7, 7) == 1
    assert block_factor(13, 2) == 0  # rows 0-6 and 7-12: unequal runs
    assert block_factor(334, 42) == 0


@pytest.mark.parametrize('size,gate', (((56, 56), (7, 7)), ((13, 9), (2, 2)),
                                       ((25, 42), (4, 6)), ((29, 2), (4, 1)),
                                       ((8, 8), (1, 1)), ((9, 9), (9, 9)),
                                       ((24, 30), (8, 10)),
                                       ((12, 20), (3, 4))))
@pytest.mark.parametrize('channels_last', (False, True))
def test_resize_multiply_and_its_gradient(size, gate, channels_last):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    identity = torch.randn(2, 3, *size, dtype=torch.float64)
    g = torch.rand(2, 3, *gate, dtype=torch.float64, requires_grad=True)
    up = F.interpolate(g, size=size, mode='nearest')
    torch.testing.assert_close(resize_multiply(x, g.detach()), x * up)
    torch.testing.assert_close(
        resize_multiply(x, g.detach(), identity), x * up + identity)
    grad = torch.randn(2, 3, *size, dtype=torch.float64)
    expect, = torch.autograd.grad(x * up, g, grad)
    torch.testing.assert_close(resize_multiply_grad(grad, x, g), expect)


def _check_against_formula(variant, extent, size, memory_efficient,
                           channels=6):
    kw = dict(feat_size=size) if extent == 'global' else {}
    layer = GatherExcite(channels, variant=variant, extent=extent,
                         reduction=2, memory_efficient=memory_efficient,
                         **kw).double().train()
    norm = nn.BatchNorm2d(channels).double().train()
    ref_layer, ref_norm = copy.deepcopy(layer), copy.deepcopy(norm)
    x = torch.randn(2, channels, *size, dtype=torch.float64,
                    requires_grad=True)
    identity = torch.randn_like(x, requires_grad=True)
    grad = torch.randn_like(x)
    results = []
    for m, n, fn in ((layer, norm, layer), (ref_layer, ref_norm, None)):
        out = ge_block_tail(
                fn, x, identity, norm=n) if fn is not None else formula(
            m, x, identity, n)
        wrt = [x, identity, *m.parameters(), *n.parameters()]
        results.append([out, *torch.autograd.grad(out, wrt, grad)])
        results[-1] += list(m.buffers()) + list(n.buffers())
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('extent', (2, 8, 'global'))
@pytest.mark.parametrize('variant', VARIANTS)
def test_values_and_gradients_equal_the_formula(variant, extent, size):
    """Output, the gradients of input, shortcut and every parameter, and the
    running statistics (updated once, not again by the recomputation)."""
    _check_against_formula(variant, extent, size, memory_efficient=False)


@pytest.mark.parametrize('size', ((13, 9), (16, 16), (29, 2)))
@pytest.mark.parametrize('extent', (2, 8, 'global'))
@pytest.mark.parametrize('variant', VARIANTS)
def test_memory_saving_mode_equals_the_formula(variant, extent, size):
    _check_against_formula(variant, extent, size, memory_efficient=True)


@pytest.mark.parametrize('dtype,train', ((torch.float32, False),
                                         (torch.float32, True),
                                         (torch.float64, False),
                                         (torch.float64, True)))
@pytest.mark.parametrize('variant', VARIANTS)
def test_relu_is_the_blocks_activation_after_ge(variant, dtype, train):
    """``relu=True``: the formula's result through a ReLU, on the native
    kernels (float32) and the ATen path (float64), without autograd (eval)
    and with it (training: gradients of input, shortcut and parameters)."""
    torch.manual_seed(0)
    layer = GatherExcite(6, variant=variant, extent=4,
                         reduction=2).to(dtype).train(train)
    norm = nn.BatchNorm2d(6).to(dtype).train(train)
    for bn in [norm] + [m for m in layer.modules()
                        if isinstance(m, nn.BatchNorm2d)]:
        bn.running_var.uniform_(0.5, 2)
    ref_layer, ref_norm = copy.deepcopy(layer), copy.deepcopy(norm)
    x = torch.randn(2, 6, 13, 16, dtype=dtype, requires_grad=train)
    identity = torch.randn_like(x, requires_grad=train)
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else \
        dict(rtol=1e-10, atol=1e-12)
    results = []
    for m, n, fn in ((layer, norm, layer), (ref_layer, ref_norm, None)):
        with torch.set_grad_enabled(train):
            out = ge_block_tail(
                    fn, x, identity, norm=n, relu=True) if fn is not None \
                else formula(m, x, identity, n, relu=True)
        assert (out == 0).any() and (out >= 0).all()
        if train:
            wrt = [x, identity, *m.parameters(), *n.parameters()]
            grads = torch.autograd.grad(out, wrt, torch.randn_like(
                out, generator=torch.Generator().manual_seed(1)))
        else:
            grads = ()
        results.append([out, *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize('train', (False, True))
@pytest.mark.parametrize('variant', VARIANTS)
def test_a_shortcut_that_broadcasts_is_added_after(variant, train):
    """The kernels add a shortcut of the features' own shape in their pass;
    a (N, C, 1, 1) one broadcasts as in the formula (it used to be read as
    a full map: values past its end)."""
    torch.manual_seed(0)
    layer = GatherExcite(8, variant=variant, extent=4,
                         reduction=2).train(train)
    norm = nn.BatchNorm2d(8).train(train)
    ref_layer, ref_norm = copy.deepcopy(layer), copy.deepcopy(norm)
    x = torch.randn(2, 8, 16, 16, requires_grad=train)
    identity = torch.randn(2, 8, 1, 1, requires_grad=train)
    results = []
    for m, n, fn in ((layer, norm, layer), (ref_layer, ref_norm, None)):
        with torch.set_grad_enabled(train):
            out = ge_block_tail(
                    fn, x, identity, norm=n, relu=True) if fn is not None \
                else formula(m, x, identity, n, relu=True)
        grads = torch.autograd.grad(out, [x, identity, *m.parameters()],
                                    torch.ones_like(out)) if train else ()
        results.append([out, *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


def test_kernels_refuse_a_shortcut_of_another_shape():
    from mmge.ops import cpu_kernels
    if not cpu_kernels.available():
        pytest.skip('native kernels not built')
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r'identity must have the shape of '
                       r'x, \(2, 4, 8, 8\), got \(2, 4, 1, 1\)'):
        cpu_kernels.excite(x, torch.rand(2, 4, 2, 2),
                           torch.randn(2, 4, 1, 1))
    with pytest.raises(ValueError, match='ge_pool_excite: identity'):
        cpu_kernels.pool_excite(x, 4, torch.randn(2, 4, 8, 1))


@pytest.mark.parametrize('train', (False, True))
@pytest.mark.parametrize('variant', VARIANTS)
def test_a_hook_on_the_norm_before_ge_fires(variant, train):
    """GEResNet hands GE the last norm layer, whose output the kernels make
    themselves; with a forward hook on it, it is called (once per
    forward), and the hook sees its output."""
    model = GEResNet(50, ge_cfg=dict(variant=variant, extent=4),
                     out_indices=(0, )).train(train)
    block = model.layer1[0]
    seen = []
    block.norm3.register_forward_hook(
        lambda m, args, out: seen.append((args[0], out)))
    x = torch.randn(2, 3, 32, 32)
    with torch.set_grad_enabled(train):
        model(x)
    assert len(seen) == 1
    inp, out = seen[0]
    assert inp.shape == (2, 256, 8, 8)
    if not train:
        torch.testing.assert_close(out, block.norm3(inp))


def _saved_storages(fn):
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, list(saved.values())


@pytest.mark.parametrize('variant', VARIANTS)
def test_default_mode_keeps_only_its_input(variant):
    layer = GatherExcite(8, variant=variant, extent=4, reduction=2)
    x = torch.randn(2, 8, 32, 32, requires_grad=True) * 1
    _, saved = _saved_storages(lambda: layer(x))
    params = {p.data_ptr() for p in layer.parameters()}
    activations = [t for t in saved if t.data_ptr() not in params]
    assert [t.data_ptr() for t in activations].count(x.data_ptr()) == 1
    assert _own_context(variant, activations, x, False) == \
        len(activations) - 1


def _own_context(variant, activations, x, memory_efficient):
    """How many of ``activations`` are GE-theta-plus's context (extent 4:
    (N, C, H / 4, W / 4)), which it keeps outside the memory-saving mode on
    the native kernels for its backward's MLP; asserts that no other
    variant or mode keeps one."""
    from mmge.ops import cpu_kernels
    n, c, h, w = x.shape
    contexts = [t for t in activations
                if tuple(t.shape) == (n, c, h // 4, w // 4)]
    kept = variant == 'theta_plus' and not memory_efficient and \
        cpu_kernels.available()
    assert len(contexts) == int(kept)
    return len(contexts)


def _keeps_only_the_norms_input(variant, memory_efficient, fmt):
    """A conv, then GE after its norm, in memory layout ``fmt``: what
    autograd keeps is the conv's input and output (which the norm would
    keep without GE), nothing of GE's own but GE-theta-plus's context
    outside the memory-saving mode (:func:`_own_context`); the output stays
    in ``fmt``."""
    layer = GatherExcite(8, variant=variant, extent=4, reduction=2,
                         memory_efficient=memory_efficient)
    norm = nn.BatchNorm2d(8)
    conv = nn.Conv2d(8, 8, 1)
    layer, norm, conv = (m.to(memory_format=fmt)
                         for m in (layer, norm, conv))
    inp = torch.randn(2, 8, 32, 32).contiguous(memory_format=fmt)
    c_box = []

    def run():
        c = conv(inp)
        c_box.append(c)
        return ge_block_tail(layer, c, norm=norm)

    out, saved = _saved_storages(run)
    assert out.is_contiguous(memory_format=fmt)
    params = {p.data_ptr() for m in (layer, norm, conv)
              for p in m.parameters()}
    activations = [t for t in saved if t.data_ptr() not in params]
    context = _own_context(variant, activations, c_box[0], memory_efficient)
    assert sorted(t.data_ptr() for t in activations
                  if t.shape == inp.shape) == sorted(
        [inp.data_ptr(), c_box[0].data_ptr()])
    assert len(activations) == 2 + context


@pytest.mark.parametrize('variant', VARIANTS)
def test_memory_saving_mode_keeps_only_the_norms_input(variant):
    # the conv keeps its input; GE keeps the conv's output, which the
    # norm layer would keep without GE: nothing of GE's own
    _keeps_only_the_norms_input(variant, True, torch.contiguous_format)


def test_memory_saving_mode_needs_the_norm():
    layer = GatherExcite(8, memory_efficient=True)
    with pytest.raises(ValueError, match='norm=') as err:
        layer(torch.randn(1, 8, 8, 8))
    assert 'memory_efficient=False' in str(err.value)
    with pytest.raises(TypeError, match='memory_efficient must be a bool'):
        GatherExcite(8, memory_efficient='yes')


@pytest.mark.parametrize('dtype', (torch.float64, torch.float32))
def test_ge_resnet_memory_saving_mode_same_values_less_memory(dtype):
    """float64 takes the ATen path, float32 on the CPU the native path.
    After a plain batch norm both keep the norm's input; on the ATen path
    the default mode also keeps the gather's small maps."""
    torch.manual_seed(0)
    models = [
        GEResNet(50, ge_cfg=dict(variant='theta', extent=4,
                                 memory_efficient=m), norm_eval=False)
        for m in (False, True)
    ]
    plain = GEResNet(50, ge_cfg=None, norm_eval=False)
    models[1].load_state_dict(models[0].state_dict())
    for m in models + [plain]:
        m.to(dtype)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    outs, grads, saved = [], [], []
    for m in models + [plain]:
        m.train()
        out, kept = _saved_storages(lambda: m(x)[-1])
        saved.append(sum(t.untyped_storage().nbytes() for t in kept))
        out.square().mean().backward()
        outs.append(out)
        grads.append([p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # neither mode keeps GE's own full-resolution input per block
    if dtype == torch.float64:
        assert saved[1] < saved[0] <= 1.2 * saved[2]
    else:
        assert saved[1] == saved[0]
    assert saved[1] <= 1.03 * saved[2]
    for name in ('running_mean', 'running_var'):
        for a, b in zip(models[0].modules(), models[1].modules()):
            if hasattr(a, name):
                torch.testing.assert_close(getattr(a, name),
                                           getattr(b, name))


@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('norm_type', ('BN', 'GN'))
@pytest.mark.parametrize('memory_efficient', (False, True))
@pytest.mark.parametrize('extent, size', ((4, (20, 20)), (4, (19, 22)),
                                          ('global', (9, 7))))
def test_which_input_the_aten_path_keeps(variant, norm_type,
                                         memory_efficient, extent, size):
    """On the ATen path (float64 here; CUDA and autocast alike) a layer
    given a plain batch norm keeps that norm's input in both modes and runs
    the norm again in backward (the default mode keeps the gather's smaller
    maps too: ``input_recompute``); after another norm the default mode
    keeps GE's own input (the norm's output) instead. Values and gradients
    are the formula's either way, and the running statistics move once."""
    torch.manual_seed(0)
    layer = GatherExcite(8, variant=variant, extent=extent, reduction=2,
                         feat_size=size if extent == 'global' else None,
                         memory_efficient=memory_efficient).double()
    norm = (nn.BatchNorm2d(8) if norm_type == 'BN' else
            nn.GroupNorm(2, 8)).double()
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.uniform_(norm.bias, -0.5, 0.5)
    ref_norm = copy.deepcopy(norm)
    ref_layer = copy.deepcopy(layer)
    inp = torch.randn(2, 8, *size, dtype=torch.float64, requires_grad=True)
    identity = torch.randn_like(inp, requires_grad=True)
    out, saved = _saved_storages(lambda: ge_block_tail(
            layer, inp, identity, norm=norm))
    params = {p.data_ptr() for m in (layer, norm) for p in m.parameters()}
    full = [t for t in saved if t.data_ptr() not in params
            and t.shape == inp.shape]
    # the norm's input, and with GE's own input the norm's output too
    # (which the norm's autograd saves the input beside)
    keeps_own = norm_type == 'GN' and not memory_efficient
    assert len(full) == 1 + keeps_own
    assert inp.data_ptr() in [t.data_ptr() for t in full]
    grad = torch.randn_like(out)
    out.backward(grad)
    leaves = [inp, identity, *layer.parameters(), *norm.parameters()]
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    ref = formula(ref_layer, inp, identity, ref_norm)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    want = [inp.grad, identity.grad, *ref_layer.parameters(),
            *ref_norm.parameters()]
    want = want[:2] + [p.grad for p in want[2:]]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for a, b in zip(list(layer.buffers()) + list(norm.buffers()),
                    list(ref_layer.buffers()) + list(ref_norm.buffers())):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize('variant', VARIANTS)
def test_default_aten_path_makes_ge_input_once_per_backward(variant):
    """The default mode's ATen path runs the norm once in forward and once
    in each backward (the excite's gradient and the gather's first
    operation share it); a second backward over a retained graph gives the
    same gradients."""
    torch.manual_seed(0)
    layer = GatherExcite(8, variant=variant, extent=4, reduction=2).double()
    norm = nn.BatchNorm2d(8).double()
    calls = []
    norm.register_forward_hook(lambda *args: calls.append(1))
    inp = torch.randn(2, 8, 16, 16, dtype=torch.float64, requires_grad=True)
    out = ge_block_tail(layer, inp, norm=norm)
    assert len(calls) == 1
    grad = torch.randn_like(out)
    grads = []
    for _ in range(2):
        out.backward(grad, retain_graph=True)
        grads.append([t.grad.clone() for t in
                      (inp, *layer.parameters(), *norm.parameters())])
        for t in (inp, *layer.parameters(), *norm.parameters()):
            t.grad = None
    assert len(calls) == 3
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def random_batch_norm(norm, training):
    """``norm`` with random affine parameters and running statistics, in
    training or eval mode."""
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    return norm.train(training)


@pytest.mark.parametrize('dtype', (torch.bfloat16, torch.float64))
@pytest.mark.parametrize('channels_last', (False, True))
@pytest.mark.parametrize('hooked', (False, True))
@pytest.mark.parametrize('training', (True, False))
def test_recomputed_input_is_the_forwards(dtype, channels_last, hooked,
                                          training):
    """GE's input made again in backward equals the forward's: from the
    forward's statistics in one pass (bitwise in bfloat16), or, where a hook
    watches the norm, by calling it again; in the input's layout, and the
    running statistics move once (a norm in eval mode, as with mmdet's
    norm_eval, normalises with them and leaves them alone)."""
    from mmge.models.layers.input_recompute import RecomputedInput
    torch.manual_seed(0)
    norm = random_batch_norm(
        nn.BatchNorm2d(16, momentum=None).to(
            torch.float64 if dtype is torch.float64 else torch.float32),
        training)
    calls = []
    if hooked:
        norm.register_forward_hook(lambda *args: calls.append(1))
    inp = (torch.randn(3, 16, 9, 11) * 3 + 1).to(dtype)
    if channels_last:
        inp = inp.contiguous(memory_format=torch.channels_last)
    want = F.batch_norm(inp, None if training else norm.running_mean,
                        None if training else norm.running_var, norm.weight,
                        norm.bias, training, 0.0, norm.eps)
    x, source = RecomputedInput.run(norm, inp)
    torch.testing.assert_close(x, want, rtol=0, atol=0)
    stats = [t.clone() for t in norm.buffers()]
    again = source.get(inp)
    assert source.get(inp) is again  # made once, kept until released
    assert (source.state is None) == hooked
    assert len(calls) == (2 if hooked else 0)
    assert again.dtype is x.dtype
    assert again.is_contiguous(memory_format=torch.channels_last) == \
        channels_last
    if dtype is torch.bfloat16:
        assert torch.equal(again, x)
    else:
        torch.testing.assert_close(again, x, rtol=1e-14, atol=1e-14)
    for a, b in zip(stats, norm.buffers()):
        assert torch.equal(a, b)
    assert int(norm.num_batches_tracked) == int(training)
    source.release()
    assert source.value is None


@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('hooked', (False, True))
@pytest.mark.parametrize('norm_training', (True, False))
def test_memory_saving_aten_path_makes_x_from_the_statistics(
        variant, hooked, norm_training, monkeypatch):
    """The memory-saving mode off the native kernels makes GE's input again
    from the forward's statistics and runs the norm's backward itself (the
    norm is not run again), unless a hook watches the norm; the values are
    the formula's either way, with the norm in training or in eval mode
    (mmdet's norm_eval)."""
    from mmge.models.layers import ge_autograd
    torch.manual_seed(0)
    layer = GatherExcite(8, variant=variant, extent=4, reduction=2,
                         memory_efficient=True).double()
    norm = random_batch_norm(nn.BatchNorm2d(8).double(), norm_training)
    ref_layer, ref_norm = copy.deepcopy(layer), copy.deepcopy(norm)
    if hooked:
        norm.register_forward_hook(lambda *args: None)
    frozen = []
    call_frozen = ge_autograd.call_frozen
    monkeypatch.setattr(ge_autograd, 'call_frozen',
                        lambda m, *a: frozen.append(m) or call_frozen(m, *a))
    inp = torch.randn(2, 8, 12, 10, dtype=torch.float64, requires_grad=True)
    identity = torch.randn(2, 8, 12, 10, dtype=torch.float64)
    out = ge_block_tail(layer, inp, identity, norm=norm)
    assert out.grad_fn.name() == 'GEFunctionBackward'
    grad = torch.randn_like(out)
    out.backward(grad)
    assert (norm in frozen) == hooked
    assert layer.gather in frozen
    ref_inp = inp.detach().clone().requires_grad_()
    want = formula(ref_layer, ref_inp, identity, norm=ref_norm)
    want.backward(grad)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(inp.grad, ref_inp.grad)
    for a, b in zip([*layer.parameters(), *norm.parameters()],
                    [*ref_layer.parameters(), *ref_norm.parameters()]):
        torch.testing.assert_close(a.grad, b.grad)
    for a, b in zip(norm.buffers(), ref_norm.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize('dtype', (torch.float32, torch.float64))
@pytest.mark.parametrize('memory_efficient', (False, True))
def test_global_theta_refuses_another_size_before_the_norm_runs(
        dtype, memory_efficient):
    """Global GE-theta at another size than it was built for says so, and
    the norm before it has not counted the batch (every path)."""
    layer = GatherExcite(8, variant='theta', extent='global', feat_size=7,
                         memory_efficient=memory_efficient).to(dtype)
    norm = nn.BatchNorm2d(8).to(dtype)
    inp = torch.randn(2, 8, 9, 7, dtype=dtype, requires_grad=True)
    with pytest.raises(ValueError, match=r'built for feature size \(7, 7\)'):
        ge_block_tail(layer, inp, norm=norm)
    assert int(norm.num_batches_tracked) == 0
    assert torch.equal(norm.running_mean, torch.zeros(8, dtype=dtype))


def test_default_aten_path_runs_a_large_cpu_batch_in_parts():
    """The gather's first convolution's backward runs on parts of the batch
    on the CPU once a call outgrows ``GatherConv2d.cpu_chunk`` (as its
    forward does), with the formula's gradients."""
    from mmge.models.layers.depthwise_conv import GatherConv2d
    torch.manual_seed(0)
    layer = GatherExcite(16, variant='theta', extent=4).double()
    norm = nn.BatchNorm2d(16).double()
    ref_layer, ref_norm = copy.deepcopy(layer), copy.deepcopy(norm)
    inp = torch.randn(4, 16, 136, 136, dtype=torch.float64,
                      requires_grad=True)
    assert inp.numel() > GatherConv2d.cpu_chunk > 2 * inp[0].numel()
    out = ge_block_tail(layer, inp, norm=norm)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [t.grad.clone() for t in (inp, *layer.parameters(),
                                    *norm.parameters())]
    inp.grad = None
    want = formula(ref_layer, inp, norm=ref_norm)
    want.backward(grad)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, (inp.grad, *(p.grad for p in ref_layer.parameters()),
                          *(p.grad for p in ref_norm.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_channels_last_stays_channels_last():
    layer = GatherExcite(16, variant='theta', extent=8)
    x = torch.randn(2, 16, 24, 24).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    for train in (True, False):
        layer.train(train)
        identity = torch.randn(2, 16, 24, 24).contiguous(
            memory_format=torch.channels_last)
        with torch.set_grad_enabled(train):
            out = ge_block_tail(layer, x, identity)
        assert out.is_contiguous(memory_format=torch.channels_last)
    model = GEResNet(50, ge_cfg=dict(variant='theta', extent=8)).eval()
    model = model.to(memory_format=torch.channels_last)
    img = torch.randn(1, 3, 64, 64).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        outs = model(img)
    assert all(o.is_contiguous(memory_format=torch.channels_last)
               for o in outs)


@pytest.mark.parametrize('channels', (11, 16))
@pytest.mark.parametrize('size,gate_size', (
    ((16, 16), (2, 2)), ((13, 9), (2, 2)), ((25, 42), (4, 6)),
    ((7, 7), (1, 1))))
def test_channels_last_excite_kernel(channels, size, gate_size):
    """cpu_kernels.excite on channels-last operands (ge_excite_nhwc):
    the formula in float64, in every option, and the result channels-last;
    a channel count with a tail past whole vectors (11)."""
    from mmge.ops import cpu_kernels
    if not cpu_kernels.available():
        pytest.skip('native kernels not built')
    torch.manual_seed(0)
    fmt = torch.channels_last
    x = torch.randn(2, channels, *size).contiguous(memory_format=fmt)
    gate = torch.rand(2, channels, *gate_size)  # NCHW: copied for the kernel
    identity = torch.randn_like(x)
    scale, shift = torch.rand(channels) + 0.5, torch.randn(channels)
    big = F.interpolate(gate.double(), size=size, mode='nearest')
    y = x.double() * scale.double()[:, None, None] + \
        shift.double()[:, None, None]
    for ident in (None, identity):
        for relu in (False, True):
            for affine in (False, True):
                want = (y if affine else x.double()) * big
                want = want if ident is None else want + ident.double()
                want = want.relu() if relu else want
                got = cpu_kernels.excite(
                    x, gate, ident, scale=scale if affine else None,
                    shift=shift if affine else None, relu=relu)
                assert got.is_contiguous(memory_format=fmt)
                torch.testing.assert_close(got.double(), want, rtol=1e-6,
                                           atol=1e-6)
    # in place, and an identity in the other layout is copied to x's
    inplace = x.clone()
    out = cpu_kernels.excite(inplace, gate, identity.contiguous(),
                             out=inplace, relu=True)
    assert out is inplace
    torch.testing.assert_close(out.double(),
                               (x.double() * big + identity.double()).relu(),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match='out must have the layout of x'):
        cpu_kernels.excite(x, gate, out=torch.empty(x.shape))
    # the gate's gradient (ge_gate_grad_nhwc): autograd through the formula
    # in float64; a grad in the other layout is copied to x's
    grad = torch.randn_like(x)
    for affine in (False, True):
        leaf = gate.double().requires_grad_(True)
        y64 = y if affine else x.double()
        (y64 * F.interpolate(leaf, size=size, mode='nearest')).backward(
            grad.double())
        for g in (grad, grad.contiguous()):
            got = cpu_kernels.gate_grad(
                g, x, gate_size, scale=scale if affine else None,
                shift=shift if affine else None)
            assert got.shape == gate.shape
            assert got.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(got.double(), leaf.grad, rtol=1e-5,
                                       atol=1e-5)


#: (variant, path) of a channels-last GE layer: 'native' is the layer's
#: own kernels (:func:`native_plan`), 'aten' the modules' gather (forced by
#: a hook) with the excite on ge_excite_nhwc
CHANNELS_LAST_PATHS = tuple((variant, path) for variant in VARIANTS
                            for path in ('aten', 'native'))


@pytest.mark.parametrize('variant, path', CHANNELS_LAST_PATHS)
def test_channels_last_layer_runs_on_the_kernels(variant, path, monkeypatch):
    """A channels-last GE layer on the CPU runs on the kernels that read
    that layout (eval without grad, and the training forward and
    backward), with the formula's values and gradients, and stays
    channels-last."""
    from mmge.ops import cpu_kernels
    if not cpu_kernels.available():
        pytest.skip('native kernels not built')
    from test_cpu_kernels import count_kernel_calls
    calls = count_kernel_calls(monkeypatch)
    torch.manual_seed(0)
    fmt = torch.channels_last
    # 20 channels: two whole blocks of the gather's kernel and a part one
    layer = GatherExcite(20, variant=variant, extent=4, reduction=4)
    if path == 'aten':
        # a hook on the excite: the layer must leave its own kernels
        layer.excite.register_forward_hook(lambda *args: None)
    norm = nn.BatchNorm2d(20)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.uniform_(norm.bias, -0.5, 0.5)
    layer, norm = layer.to(memory_format=fmt), norm.to(memory_format=fmt)
    x = torch.randn(2, 20, 20, 18).contiguous(memory_format=fmt)
    identity = torch.randn_like(x)
    native = path == 'native'
    for train in (False, True):
        layer.train(train), norm.train(train)
        ref_layer, ref_norm = copy.deepcopy(layer), copy.deepcopy(norm)
        leaf = x.clone().requires_grad_(train)
        calls.clear()
        with torch.set_grad_enabled(train):
            out = ge_block_tail(layer, leaf, identity, norm=norm, relu=True)
        if native and variant == 'theta_minus':
            # the pool and the excite; without autograd in one call
            want_calls = ['ge_pool_forward_nhwc', 'ge_excite_nhwc'] \
                if train else ['ge_pool_excite']
        elif native:
            want_calls = ['ge_conv_gather']
        elif variant != 'theta_minus':
            # the gather's modules (ATen), then the excite's kernel
            want_calls = ['ge_excite_nhwc']
        else:
            # the ops: the pool's kernel, then the excite's
            want_calls = ['ge_pool_forward_nhwc', 'ge_excite_nhwc']
        assert [name for name, _ in calls] == want_calls
        assert out.is_contiguous(memory_format=fmt)
        ref_leaf = x.clone().requires_grad_(train)
        with torch.set_grad_enabled(train):
            want = formula(ref_layer, ref_leaf, identity, ref_norm, relu=True)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        if train:
            torch.testing.assert_close(norm.running_mean,
                                       ref_norm.running_mean)
            torch.testing.assert_close(norm.running_var,
                                       ref_norm.running_var)
            grad = torch.randn_like(out)
            params = list(layer.parameters()) + list(norm.parameters())
            calls.clear()
            got = torch.autograd.grad(out, [leaf] + params, grad)
            if native and variant == 'theta_minus':
                # the gate again, its gradient, then the input's
                want_calls = ['ge_gate_grad_nhwc', 'ge_input_grad_nhwc',
                              'ge_pool_forward_nhwc']
            elif native:
                # GE-theta-plus's MLP runs inside the one call
                want_calls = ['ge_conv_gather']
            elif variant != 'theta_minus':
                # the gate's gradient and grad * resize(gate)
                want_calls = ['ge_excite_nhwc', 'ge_gate_grad_nhwc']
            else:
                # and the pool's kernel, where the backward makes the gate
                # again
                want_calls = ['ge_excite_nhwc', 'ge_gate_grad_nhwc',
                              'ge_pool_forward_nhwc']
            assert sorted(name for name, _ in calls) == want_calls
            assert got[0].is_contiguous(memory_format=fmt)
            exp = torch.autograd.grad(
                want, [ref_leaf] + list(ref_layer.parameters()) +
                list(ref_norm.parameters()), grad)
            for a, b in zip(got, exp):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('memory_efficient', (False, True))
def test_channels_last_keeps_only_the_norms_input(variant, memory_efficient):
    """Channels-last, GE keeps nothing of its own for backward in the
    memory-saving mode, and in the default mode on its native kernels."""
    from mmge.ops import cpu_kernels
    if not (memory_efficient or cpu_kernels.available()):
        pytest.skip('native kernels not built')
    _keeps_only_the_norms_input(variant, memory_efficient,
                                torch.channels_last)


def test_ge_resnet_compiles_without_graph_breaks():
    model = GEResNet(18, ge_cfg=dict(variant='theta', extent=4)).train()
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    x = torch.randn(2, 3, 64, 48)
    outs = compiled(x)
    outs[-1].sum().backward()
    for a, b in zip(outs, model(x)):
        torch.testing.assert_close(a, b)


def _randomise_norm_stats(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)


@pytest.mark.parametrize('what', ('layer', 'ge_resnet50'))
def test_onnx_export_with_dynamic_height_and_width(what, tmp_path):
    """Exported at 64x64, run by onnxruntime at sizes the export never saw,
    divisible by the extent or not (a resize to constant sizes, as in
    pytorch/pytorch#84374, would fail here)."""
    ort = pytest.importorskip('onnxruntime')
    torch.manual_seed(0)
    if what == 'layer':
        model, channels = GatherExcite(
            8, variant='theta_plus', extent=8, reduction=2), 8
    else:
        model, channels = GEResNet(
            50, ge_cfg=dict(variant='theta', extent=8)), 3
    model.eval()
    _randomise_norm_stats(model)
    h = torch.export.Dim('h', min=1, max=4096)
    w = torch.export.Dim('w', min=1, max=4096)
    program = torch.onnx.export(
        model, (torch.randn(1, channels, 64, 64), ),
        dynamic_shapes=({2: h, 3: w}, ), dynamo=True)
    path = str(tmp_path / f'{what}.onnx')
    program.save(path)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for size in ((64, 64), (37, 53), (100, 23), (13, 9)):
        inp = torch.randn(1, channels, *size)
        with torch.no_grad():
            expect = model(inp)
        expect = expect if isinstance(expect, tuple) else (expect, )
        got = session.run(None, {session.get_inputs()[0].name: inp.numpy()})
        assert len(got) == len(expect)
        for a, b in zip(got, expect):
            assert a.shape == tuple(b.shape)
            torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-4,
                                       atol=1e-4)


@pytest.mark.parametrize('channels_last', (False, True))
@pytest.mark.parametrize('memory_efficient', (False, True))
@pytest.mark.parametrize('variant', VARIANTS)
def test_bf16_autocast_recomputes_as_the_forward(variant, memory_efficient,
                                                 channels_last):
    """Under autocast GE's input is bfloat16 (a convolution's output) while
    its weights stay float32: the backward's recomputation runs under the
    forward's autocast, so it does not fail on the mixed dtypes, and the
    layer is as close to float64 as autograd through the formula under the
    same autocast is."""
    torch.manual_seed(0)
    layer = GatherExcite(16, variant=variant, extent=4,
                         memory_efficient=memory_efficient).train()
    norm = nn.BatchNorm2d(16).train()
    x = torch.randn(2, 16, 21, 19).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    identity = torch.randn_like(x)
    w = torch.randn(x.shape, dtype=torch.float64)
    results = {}
    for path in ('layer', 'formula', 'float64'):
        mods = [copy.deepcopy(m) for m in (layer, norm)]
        inp, idn = x.clone(), identity.clone()
        if path == 'float64':
            mods = [m.double() for m in mods]
            inp, idn = inp.double(), idn.double()
        inp.requires_grad_(True)
        idn.requires_grad_(True)
        with torch.autocast('cpu', dtype=torch.bfloat16,
                            enabled=path != 'float64'):
            out = ge_block_tail(
                    mods[0], inp, idn, norm=mods[1]) if path == 'layer' else \
                formula(mods[0], inp, idn, norm=mods[1])
        assert out.dtype == (torch.float64 if path == 'float64' else
                             torch.bfloat16)
        (out.double() * w).sum().backward()
        results[path] = [out, inp.grad, idn.grad] + [
            p.grad for m in mods for p in m.parameters()]
    for got, rounded, exact in zip(*results.values()):
        assert got.dtype == rounded.dtype
        err = (got.double() - exact).abs().max().item()
        # bfloat16 rounding: the two paths order some sums differently
        bound = (rounded.double() - exact).abs().max().item()
        assert err <= 2 * bound + 1e-3 * exact.abs().max().item()


@pytest.mark.parametrize('memory_efficient', (False, True))
@pytest.mark.parametrize('variant', VARIANTS)
def test_ge_resnet_trains_under_bf16_autocast(variant, memory_efficient):
    """A GE-ResNet training step under bfloat16 autocast (MMEngine's
    AmpOptimWrapper(dtype='bfloat16')), where every GE layer's input is a
    bfloat16 convolution's output: finite gradients of every parameter, in
    its own dtype."""
    torch.manual_seed(0)
    model = GEResNet(18, ge_cfg=dict(variant=variant, extent=4,
                                     memory_efficient=memory_efficient),
                     norm_eval=False).train()
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)[-1]
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize('momentum', (0.1, None))
@pytest.mark.parametrize('memory_efficient', (False, True))
@pytest.mark.parametrize('variant', VARIANTS)
def test_recomputing_backward_updates_running_stats_once(
        variant, memory_efficient, momentum):
    """The ATen path (float64 here; CUDA and autocast take it too)
    recomputes the norm and the gather in backward: the norms' running
    statistics and counts end as after one forward of the formula, and
    the norms still track them afterwards."""
    torch.manual_seed(0)
    layer = GatherExcite(8, variant=variant, extent=4,
                         memory_efficient=memory_efficient).double().train()
    norm = nn.BatchNorm2d(8, momentum=momentum).double().train()
    for bn in layer.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = momentum
    ref_layer, ref_norm = copy.deepcopy(layer), copy.deepcopy(norm)
    x = torch.randn(2, 8, 13, 11, dtype=torch.float64, requires_grad=True)
    ge_block_tail(layer, x, norm=norm).sum().backward()
    formula(ref_layer, x.detach(), norm=ref_norm).sum()
    bns = [(a, b) for m, r in ((layer, ref_layer), (norm, ref_norm))
           for a, b in zip(m.modules(), r.modules())
           if isinstance(a, nn.BatchNorm2d)]
    assert len(bns) == {'theta_minus': 1}.get(variant, 3)
    for a, b in bns:
        assert a.track_running_stats
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 1
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)


def test_call_frozen_copies_other_buffers():
    """A module with a buffer that is not a batch norm's runs on a copy of
    its buffers: what its forward writes is dropped."""
    from mmge.models.layers.ge_autograd import call_frozen

    class Counting(nn.Module):

        def __init__(self):
            super().__init__()
            self.register_buffer('calls', torch.zeros(()))
            self.norm = nn.BatchNorm1d(3)

        def forward(self, x):
            self.calls += 1
            return self.norm(x) * self.calls

    module = Counting().train()
    x = torch.randn(4, 3)
    out = call_frozen(module, x)
    torch.testing.assert_close(out, module.norm(x))  # calls was 1 inside
    assert int(module.calls) == 0
    assert int(module.norm.num_batches_tracked) == 1  # only the direct call
    torch.testing.assert_close(module.norm.running_mean,
                               0.1 * x.mean(0))


class _HostToDevice(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every operation that moves a tensor from the host (CPU) to
    another device, or mixes the two."""

    def __init__(self):
        super().__init__()
        self.moves = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(a, torch.Tensor)]
        outs = [o for o in torch.utils._pytree.tree_leaves(out)
                if isinstance(o, torch.Tensor)]
        devices = {t.device.type for t in ins + outs}
        if 'cpu' in devices and len(devices) > 1:
            self.moves.append(str(func))
        return out


@pytest.mark.parametrize('size', ((13, 9), (56, 56), (25, 42)))
def test_resize_makes_its_indices_on_the_device(size):
    """No host-to-device copy per call (on a GPU it waits for the stream):
    the 'meta' device stands in for CUDA."""
    x = torch.empty(2, 4, *size, device='meta')
    gate = torch.empty(2, 4, (size[0] + 7) // 8, (size[1] + 7) // 8,
                       device='meta')
    with _HostToDevice() as mode:
        out = resize_multiply(x, gate)
        grad = resize_multiply_grad(torch.empty_like(out), x, gate)
    assert out.shape == x.shape and grad.shape == gate.shape
    assert mode.moves == []


@pytest.mark.parametrize('channels_last', (False, True))
@pytest.mark.parametrize('variant', VARIANTS)
def test_hooks_on_every_submodule_fire(variant, channels_last):
    """A forward pre-hook and a forward hook on each of GE's submodules
    (the gather, its levels, the excite, its MLP's convolutions) fire,
    as a plugin (``layer(x)``) and as a block calls it, in training and
    in eval; the results stay the formula's."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    layer = GatherExcite(16, variant=variant, extent=4, reduction=4)
    layer = layer.to(memory_format=fmt)
    norm = nn.BatchNorm2d(16)
    seen = []
    for name, m in layer.named_modules():
        if name:
            m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.append(('pre', name)))
            m.register_forward_hook(
                lambda mod, args, out, name=name: seen.append(('post', name)))
    names = {name for name, _ in layer.named_modules() if name}
    x = torch.randn(2, 16, 13, 11).contiguous(memory_format=fmt)
    identity = torch.randn_like(x)
    for train in (False, True):
        layer.train(train), norm.train(train)
        for as_block in (False, True):
            ref_layer, ref_norm = copy.deepcopy(layer), copy.deepcopy(norm)
            seen.clear()
            with torch.set_grad_enabled(train):
                leaf = x.clone().requires_grad_(train)
                out = ge_block_tail(
                        layer, leaf, identity, norm=norm, relu=True) \
                    if as_block else layer(leaf)
            assert {n for kind, n in seen if kind == 'pre'} == names
            assert {n for kind, n in seen if kind == 'post'} == names
            seen.clear()
            want = formula(ref_layer, x, identity, ref_norm, relu=True) \
                if as_block else formula(ref_layer, x)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('variant', VARIANTS)
def test_jit_trace_of_a_ge_resnet_runs_at_other_sizes(variant):
    """``torch.jit.trace`` (what mmdeploy runs) of a GE-ResNet at 64x64
    gives eager's outputs at sizes the extent does not divide."""
    torch.manual_seed(0)
    model = GEResNet(18, ge_cfg=dict(variant=variant, extent=8)).eval()
    _randomise_norm_stats(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64),
                                 check_trace=False)
        for size in ((37, 53), (100, 23)):
            x = torch.randn(1, 3, *size)
            for a, b in zip(traced(x), model(x)):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
