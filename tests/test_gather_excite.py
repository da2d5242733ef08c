"""GatherExcite against the independent reference, and its contract."""
import numpy as np
import pytest
import torch

import reference
from mmge.models.layers.ge_autograd import gate_backward
from mmge.models.layers.ge_block import ge_block_tail
from mmge.models import ConvGather, Excite, GatherExcite, PoolGather
from mmge.models.layers.args import gathered_size

VARIANTS = ('theta_minus', 'theta', 'theta_plus')
EXTENTS = (2, 4, 8, 'global')
# odd, tiny, divisible and extreme-aspect sizes
SIZES = ((1, 1), (2, 3), (7, 7), (13, 9), (16, 16), (1, 31), (29, 2),
         (15, 17))


def build(variant, extent, size, channels=4, reduction=2):
    layer = GatherExcite(
        channels, variant=variant, extent=extent, reduction=reduction,
        feat_size=size if extent == 'global' else None).double()
    # random BN statistics and affine terms, so BN is not an identity
    for m in layer.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return layer


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('extent', EXTENTS)
@pytest.mark.parametrize('variant', VARIANTS)
def test_matches_reference(variant, extent, size):
    layer = build(variant, extent, size).eval()
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    ref = reference.gather_excite(x.numpy(), layer, variant, extent)
    assert out.shape == x.shape
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('size', ((13, 9), (1, 31)))
@pytest.mark.parametrize('variant', ('theta', 'theta_plus'))
def test_matches_reference_train_mode_bn(variant, size):
    layer = build(variant, 8, size).train()
    x = torch.randn(3, 4, *size, dtype=torch.float64)
    out = layer(x)
    ref = reference.gather_excite(
        x.numpy(), layer, variant, 8, train=True)
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('extent', EXTENTS)
def test_gather_output_size(extent, size):
    x = torch.randn(1, 3, *size)
    expect = gathered_size(size, extent)
    if extent == 'global':
        assert expect == (1, 1)
    else:
        assert expect == tuple(-(-s // extent) for s in size)
    assert PoolGather(extent)(x).shape[-2:] == expect
    conv = ConvGather(3, extent, feat_size=size).eval()
    assert conv(x).shape[-2:] == expect


@pytest.mark.parametrize('extent,n_convs', ((2, 1), (4, 2), (8, 3),
                                            ('global', 1)))
def test_theta_gather_depth_is_log2_extent(extent, n_convs):
    layer = GatherExcite(8, variant='theta', extent=extent, feat_size=5)
    convs = list(layer.gather.convs)
    assert len(convs) == n_convs
    for m in convs:
        assert m.conv.groups == 8 and m.conv.bias is None
        assert isinstance(m.bn, torch.nn.BatchNorm2d)
    # ReLU after every conv but the last; theta_plus adds it to the last
    assert [m.with_activation for m in convs] == [True] * (n_convs - 1) + [
        False
    ]
    plus = GatherExcite(
        8, variant='theta_plus', extent=extent, feat_size=5)
    assert all(m.with_activation for m in plus.gather.convs)


@pytest.mark.parametrize('extent', EXTENTS)
@pytest.mark.parametrize('variant', VARIANTS)
def test_param_count(variant, extent):
    c, size = 32, (6, 5)
    layer = GatherExcite(c, variant=variant, extent=extent, feat_size=size)
    n = sum(p.numel() for p in layer.parameters())
    if variant == 'theta_minus':
        expect = 0
    else:
        convs = 1 if extent == 'global' else int(np.log2(extent))
        kernel = size[0] * size[1] if extent == 'global' else 9
        expect = convs * (c * kernel + 2 * c)  # depthwise conv + BN affine
        if variant == 'theta_plus':
            hidden = c // 16
            expect += c * hidden + hidden + hidden * c + c
    assert n == expect


@pytest.mark.parametrize('extent', EXTENTS)
@pytest.mark.parametrize('variant', VARIANTS)
def test_gradients_reach_every_parameter(variant, extent):
    layer = GatherExcite(32, variant=variant, extent=extent, feat_size=(9, 7))
    x = torch.randn(2, 32, 9, 7, requires_grad=True)
    (layer(x) * torch.randn(2, 32, 9, 7)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize('module', ('ConvGather', 'Excite', 'GatherExcite'))
def test_parameters_get_gradients_when_the_input_needs_none(module):
    """Used alone, on an input that does not require grad (a frozen
    stem's output, an image), every parameter still gets its gradient."""
    x = torch.randn(2, 8, 9, 7)  # requires_grad False
    if module == 'ConvGather':
        m = ConvGather(8, extent=4)
        out = m(x)
    elif module == 'Excite':
        m = Excite(8, reduction=4)
        out = m(x, torch.randn(2, 8, 3, 2))
    else:
        m = GatherExcite(8, variant='theta_plus', extent=4)
        out = m(x)
    assert out.requires_grad
    out.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_attributes_for_inspection():
    layer = GatherExcite(16, variant='theta_plus', extent='global',
                         feat_size=(7, 5))
    assert layer.variant == 'theta_plus'
    assert layer.extent == 'global'
    assert layer.feat_size == (7, 5)
    assert layer.in_channels == 16
    assert GatherExcite(16, variant='theta_minus').feat_size is None
    assert 'theta_plus' in repr(layer)


def test_sigmoid_gate_bounds_output():
    # the gate is in [0, 1]: |y| <= |x| everywhere
    layer = GatherExcite(8, variant='theta', extent=4).eval()
    x = torch.randn(2, 8, 11, 13) * 10
    y = layer(x)
    assert torch.all(y.abs() <= x.abs() + 1e-6)


@pytest.mark.parametrize('variant', VARIANTS)
def test_bf16_autocast_cpu(variant):
    layer = GatherExcite(16, variant=variant, extent=8).eval()
    x = torch.randn(2, 16, 21, 19)
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = layer(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize('extent', EXTENTS)
@pytest.mark.parametrize('variant', VARIANTS)
def test_channels_last(variant, extent):
    layer = GatherExcite(16, variant=variant, extent=extent,
                         feat_size=(13, 10)).eval()
    x = torch.randn(2, 16, 13, 10)
    xc = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, out = layer(x), layer(xc)
    torch.testing.assert_close(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_excite_parameter_free_is_plain_gate():
    x = torch.randn(1, 2, 4, 4)
    g = torch.zeros(1, 2, 1, 1)
    torch.testing.assert_close(Excite()(x, g), x * 0.5)


# --- bad arguments: clear errors at build time ---------------------------


@pytest.mark.parametrize('extent', (3, 0, -8, 6, 1))
def test_bad_extent_value(extent):
    with pytest.raises(ValueError, match=r"extent.*power of two.*'global'"):
        GatherExcite(8, extent=extent)


@pytest.mark.parametrize('extent', ('foo', 'Global', ''))
def test_bad_extent_string(extent):
    with pytest.raises(ValueError, match='extent'):
        GatherExcite(8, extent=extent)


@pytest.mark.parametrize('extent', (2.0, None, True, [8]))
def test_bad_extent_type(extent):
    with pytest.raises(TypeError, match='extent'):
        GatherExcite(8, extent=extent)


@pytest.mark.parametrize('variant', ('theta-minus', 'se', '', None))
def test_bad_variant(variant):
    with pytest.raises(ValueError,
                       match=r"variant must be one of \('theta_minus'"):
        GatherExcite(8, variant=variant)


@pytest.mark.parametrize('reduction', (0, -16))
def test_bad_reduction_value(reduction):
    with pytest.raises(ValueError, match='reduction must be an int >= 1'):
        GatherExcite(8, variant='theta_plus', reduction=reduction)


@pytest.mark.parametrize('reduction', (1.5, '16', None))
def test_bad_reduction_type(reduction):
    with pytest.raises(TypeError, match='reduction'):
        GatherExcite(8, reduction=reduction)


@pytest.mark.parametrize('channels', (0, -3, 2.0, None))
def test_bad_in_channels(channels):
    with pytest.raises(ValueError, match='in_channels must be a positive'):
        GatherExcite(channels)


@pytest.mark.parametrize('variant', ('theta', 'theta_plus'))
def test_global_theta_needs_feat_size(variant):
    with pytest.raises(ValueError, match='needs feat_size.*local extent'):
        GatherExcite(8, variant=variant, extent='global')
    # the parameter-free global gather needs no size
    GatherExcite(8, variant='theta_minus', extent='global')


@pytest.mark.parametrize('feat_size', ((0, 4), (3, 4, 5), 'x', 2.5))
def test_bad_feat_size(feat_size):
    with pytest.raises((TypeError, ValueError), match='feat_size'):
        GatherExcite(8, variant='theta', extent='global',
                     feat_size=feat_size)


def test_global_theta_at_other_size_says_why():
    layer = GatherExcite(8, variant='theta', extent='global', feat_size=7)
    layer(torch.randn(2, 8, 7, 7))
    with pytest.raises(ValueError) as err:
        layer(torch.randn(2, 8, 9, 7))
    msg = str(err.value)
    assert 'built for feature size (7, 7)' in msg and '(9, 7)' in msg
    assert 'local extent' in msg


@pytest.mark.parametrize('size', ((13, 9), (16, 16), (1, 31), (29, 2)))
@pytest.mark.parametrize('extent', (2, 8))
@pytest.mark.parametrize('variant', VARIANTS)
def test_gradients_equal_the_formula(variant, extent, size):
    """The layer's backward equals autograd through the plain formula."""
    import torch.nn.functional as F
    layer = build(variant, extent, size).train()
    x = torch.randn(2, 4, *size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, *size, dtype=torch.float64)

    def formula(inp):
        ctx = layer.gather(inp)
        if layer.excite.mlp is not None:
            ctx = layer.excite.mlp(ctx)
        gate = F.interpolate(ctx, size=inp.shape[-2:], mode='nearest')
        return inp * gate.sigmoid()

    grads = []
    for fn in (layer, formula):
        layer.zero_grad()
        x.grad = None
        (fn(x) * w).sum().backward()
        grads.append([x.grad.clone()] + [
            p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_resized_gate_is_not_saved_for_backward():
    layer = GatherExcite(8, variant='theta_minus', extent=4)
    x = torch.randn(2, 8, 32, 32, requires_grad=True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = tuple(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    full = [s for s in storages.values() if s[-2:] == (32, 32)]
    assert full == [(2, 8, 32, 32)]  # x itself, no resized gate


@pytest.mark.parametrize('variant', VARIANTS)
def test_bf16_autocast_training_step(variant):
    layer = GatherExcite(16, variant=variant, extent=4).train()
    x = torch.randn(2, 16, 21, 19, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().mean().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        assert torch.isfinite(p.grad).all(), name


def test_channels_last_training_step_matches_contiguous():
    layer = GatherExcite(16, variant='theta', extent=4).train()
    x = torch.randn(2, 16, 21, 19)
    grads = []
    for inp in (x.clone(), x.clone().to(memory_format=torch.channels_last)):
        inp.requires_grad_(True)
        layer.zero_grad()
        (layer(inp) * torch.arange(inp.numel()).view_as(inp) / 1e4).sum(
        ).backward()
        grads.append([inp.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('variant,extent', (('theta', 8), ('theta_minus', 4),
                                            ('theta_plus', 'global')))
def test_compiles_without_graph_breaks(variant, extent):
    layer = GatherExcite(16, variant=variant, extent=extent,
                         feat_size=(13, 10)).train()
    # fullgraph=True raises on any graph break; the eager backend keeps the
    # test fast (no code generation)
    compiled = torch.compile(layer, fullgraph=True, backend='eager')
    x = torch.randn(2, 16, 13, 10, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, layer(x))
    assert x.grad is not None


@pytest.mark.parametrize('act', ('ReLU', 'GELU', None))
@pytest.mark.parametrize('frozen', (False, True))
def test_excite_gate_backward_is_autograds(act, frozen):
    """GE-theta-plus's MLP backward, by hand for the plain layout (ReLU or
    no activation) and on autograd otherwise: the gate, the context's and
    each trainable parameter's gradient are autograd's."""
    torch.manual_seed(0)
    excite = Excite(16, 4, act_cfg=dict(type=act) if act else None).double()
    if frozen:
        excite.mlp[0].conv.weight.requires_grad_(False)
    params = [p for p in excite.parameters() if p.requires_grad]
    context = torch.randn(3, 16, 2, 3, dtype=torch.float64,
                          requires_grad=True)
    grad = torch.randn(3, 16, 2, 3, dtype=torch.float64)
    gate = excite.gate(context)
    expect = torch.autograd.grad(gate, [context] + params, grad)
    got = gate_backward(excite, context.detach(), grad)
    assert len(got) == 2 + len(params)
    torch.testing.assert_close(got[0], gate.detach())
    for a, b in zip(got[1:], expect):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('variant,extent,size', (('theta', 8, 8),
                                                 ('theta_plus', 'global', 7)))
def test_inductor_compiles_a_one_cell_gate(variant, extent, size):
    """Inductor (the default backend) builds the training step of a layer
    whose gate is 1x1 (a map of at most the extent, as ResNet-50's last
    stage at 224x224, or a global extent), with the block's norm, shortcut
    and ReLU, and its outputs and gradients are eager's. Torch 2.13's
    Inductor fails to build the CPU code for the backward of a nearest
    resize from 1x1; the compiled formula broadcasts such a gate instead."""
    import copy

    import torch.nn as nn
    torch.manual_seed(0)
    # float64: the last level's norm sees two values, and its gradient is
    # the rounding of larger terms that cancel
    layer = GatherExcite(16, variant=variant, extent=extent,
                         feat_size=(size, size)).double().train()
    norm = nn.BatchNorm2d(16).double().train()
    mods = [layer, norm, copy.deepcopy(layer), copy.deepcopy(norm)]
    x = torch.randn(2, 16, size, size, dtype=torch.float64)
    identity = torch.randn(2, 16, size, size, dtype=torch.float64)
    results = []
    for ge, bn, run in ((mods[0], mods[1], torch.compile),
                        (mods[2], mods[3], lambda f: f)):
        inp = x.clone().requires_grad_(True)
        out = run(lambda t: ge_block_tail(
                ge, t, identity, norm=bn, relu=True))(inp)
        out.square().sum().backward()
        results.append([out, inp.grad] + [
            p.grad for m in (ge, bn) for p in m.parameters()])
    for got, expect in zip(*results):
        torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-11)
