"""GEResNet: structure, mmdet ResNet behaviour, errors, global extent."""
import pytest
import torch
from mmdet.models.backbones import ResNet
from torch.nn.modules.batchnorm import _BatchNorm

from mmge.models import (GatherExcite, GEBasicBlock, GEBottleneck,
                         GEResNet, SqueezeExcite)
from mmge.models.layers.ge_block import fusable_relu


def ge_layers(model, cls=GatherExcite):
    return [m for m in model.modules() if isinstance(m, cls)]


@pytest.mark.parametrize('depth,n_blocks', ((18, 8), (34, 16), (50, 16),
                                            (101, 33), (152, 50)))
def test_every_block_gets_one_layer(depth, n_blocks):
    model = GEResNet(depth, ge_cfg=dict(variant='theta_minus', extent=4))
    assert len(ge_layers(model)) == n_blocks
    channels = [m.in_channels for m in ge_layers(model)]
    expansion = 1 if depth < 50 else 4
    assert channels[0] == 64 * expansion and channels[-1] == 512 * expansion


@pytest.mark.parametrize('depth', (18, 34, 50))
def test_forward_shapes_odd_input(depth):
    model = GEResNet(depth, ge_cfg=dict(variant='theta', extent=8))
    model.init_weights()
    outs = model(torch.randn(2, 3, 45, 67))
    expansion = 1 if depth < 50 else 4
    assert [o.shape[1] for o in outs] == [64 * expansion * 2**i
                                          for i in range(4)]
    assert [tuple(o.shape[-2:]) for o in outs] == [(12, 17), (6, 9),
                                                   (3, 5), (2, 3)]


def _spy_block_tail(monkeypatch, module):
    """Record the arguments of every ``ge_block_tail`` call a backbone
    module makes."""
    seen, tail = [], module.ge_block_tail

    def spy(ge, x, identity=None, norm=None, relu=False):
        seen.append(dict(ge=ge, x=x, identity=identity, norm=norm))
        return tail(ge, x, identity, norm=norm, relu=relu)

    monkeypatch.setattr(module, 'ge_block_tail', spy)
    return seen


def test_basic_block_layer_sits_after_norm2_before_add(monkeypatch):
    from mmge.models.backbones import ge_resnet
    model = GEResNet(18, ge_cfg=dict(variant='theta', extent=2)).eval()
    block = model.layer1[0]
    assert isinstance(block, GEBasicBlock)
    assert block.after_conv2_plugin_names == ['gather_excite']
    seen = _spy_block_tail(monkeypatch, ge_resnet)
    x = torch.randn(1, 64, 9, 9)
    y = block(x)
    conv2_out = block.conv2(block.relu(block.norm1(block.conv1(x))))
    # the block ends with GE's fused tail: norm2's input, norm2 and the
    # shortcut, which GE adds itself
    assert len(seen) == 1 and seen[0]['ge'] is block.gather_excite
    torch.testing.assert_close(seen[0]['x'], conv2_out)
    torch.testing.assert_close(seen[0]['identity'], x)
    assert seen[0]['norm'] is block.norm2
    with torch.no_grad():
        expect = torch.relu(block.gather_excite(block.norm2(conv2_out)) + x)
    torch.testing.assert_close(y, expect)


def test_a_hook_on_the_layer_sees_the_plain_block(monkeypatch):
    """A forward hook on the GE layer itself sees the layer called as
    mmdet's block calls a plugin, on norm2's output."""
    from mmge.models.backbones import ge_resnet
    model = GEResNet(18, ge_cfg=dict(variant='theta', extent=2)).eval()
    block = model.layer1[0]
    seen_tail = _spy_block_tail(monkeypatch, ge_resnet)
    seen = []
    block.gather_excite.register_forward_hook(
        lambda m, args, out: seen.append(args))
    x = torch.randn(1, 64, 9, 9)
    y = block(x)
    assert seen_tail == [] and len(seen) == 1 and len(seen[0]) == 1
    conv2_out = block.conv2(block.relu(block.norm1(block.conv1(x))))
    torch.testing.assert_close(seen[0][0], block.norm2(conv2_out))
    with torch.no_grad():
        expect = torch.relu(block.gather_excite(block.norm2(conv2_out)) + x)
    torch.testing.assert_close(y, expect)


@pytest.mark.parametrize('depth', (18, 50))
def test_blocks_last_relu_runs_in_ge_pass_unless_a_hook_would_see(
        depth, monkeypatch):
    """Each block's last ReLU runs in GE's excite pass (its module is
    called once fewer per block); a hook on it, or on the GE layer (which
    then sees its output before the activation), brings the call back. The
    outputs are the same bit for bit."""
    torch.manual_seed(0)
    model = GEResNet(depth, base_channels=8,
                     ge_cfg=dict(variant='theta', extent=4)).eval()
    blocks = [m for m in model.modules()
              if isinstance(m, (GEBasicBlock, GEBottleneck))]
    calls = []
    forward = torch.nn.ReLU.forward
    monkeypatch.setattr(torch.nn.ReLU, 'forward',
                        lambda self, x: calls.append(self) or forward(self, x))
    x = torch.randn(2, 3, 64, 64)

    def run():
        calls.clear()
        with torch.no_grad():
            return model(x), len(calls)

    fused, n_fused = run()
    handles = [b.relu.register_forward_hook(lambda *a: None) for b in blocks]
    hooked, n_hooked = run()
    assert n_hooked == n_fused + len(blocks)
    assert all(torch.equal(a, b) for a, b in zip(fused, hooked))
    for h in handles:
        h.remove()
    handle = ge_layers(blocks[1])[0].register_forward_hook(lambda *a: None)
    assert run()[1] == n_fused + 1
    handle.remove()
    assert run()[1] == n_fused


def test_fusable_relu_looks_at_the_two_modules_own_hooks():
    """The block's ReLU runs in GE's pass unless a hook would see the
    difference: on the ReLU, on the GE layer itself, or global. A hook
    inside GE (on its gather) sees only the gather's values."""
    layer, act = GatherExcite(8, extent=4), torch.nn.ReLU()
    assert fusable_relu(act, layer)
    assert not fusable_relu(torch.nn.ReLU6(), layer)
    inner = layer.gather.convs[0].register_forward_hook(lambda *a: None)
    assert fusable_relu(act, layer)
    inner.remove()
    for module in (act, layer):
        for register in (module.register_forward_hook,
                         module.register_forward_pre_hook):
            handle = register(lambda *a: None)
            assert not fusable_relu(act, layer)
            handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda *a: None)
    try:
        assert not fusable_relu(act, layer)
    finally:
        handle.remove()
    assert fusable_relu(act, layer)


def test_bottleneck_layer_sits_after_conv3():
    model = GEResNet(50, ge_cfg=dict(variant='theta_minus', extent=2)).eval()
    block = model.layer2[0]
    assert block.after_conv3_plugin_names == ['gather_excite']
    assert block.after_conv1_plugin_names == []
    assert block.after_conv2_plugin_names == []


def test_zero_init_residual_basic_block():
    model = GEResNet(18)
    model.init_weights()
    for layer in (model.layer1, model.layer4):
        for block in layer:
            assert torch.all(block.norm2.weight == 0)
    no_zero = GEResNet(18, zero_init_residual=False)
    no_zero.init_weights()
    assert torch.all(no_zero.layer1[0].norm2.weight == 1)


@pytest.mark.parametrize('stages,expect', (((True, False, False, False), 3),
                                           ((False, False, True, False), 6),
                                           ((False, ) * 4, 0)))
def test_ge_stages(stages, expect):
    model = GEResNet(50, ge_stages=stages)
    assert len(ge_layers(model)) == expect
    for i, on in enumerate(stages):
        assert bool(ge_layers(getattr(model, f'layer{i + 1}'))) == on


def test_ge_cfg_none_is_plain_resnet():
    model = GEResNet(50, ge_cfg=None)
    plain = ResNet(50)
    assert model.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize('style', ('pytorch', 'caffe'))
def test_style(style):
    model = GEResNet(50, style=style)
    block = model.layer2[0]
    stride_conv = block.conv1 if style == 'caffe' else block.conv2
    assert stride_conv.stride == (2, 2)
    assert model(torch.randn(2, 3, 33, 33))[-1].shape[-2:] == (2, 2)


def test_frozen_stages_and_norm_eval():
    model = GEResNet(50, frozen_stages=1, norm_eval=True)
    model.train()
    for p in model.layer1.parameters():  # GE parameters included
        assert not p.requires_grad
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert all(not m.training for m in model.modules()
               if isinstance(m, _BatchNorm))
    model = GEResNet(50, norm_eval=False)
    model.train()
    assert all(m.training for m in model.modules()
               if isinstance(m, _BatchNorm))


def test_out_indices():
    model = GEResNet(18, out_indices=(1, 3))
    outs = model(torch.randn(2, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [128, 512]


@pytest.mark.parametrize('depth', (18, 50))
@pytest.mark.parametrize('variant', ('theta_minus', 'theta', 'theta_plus'))
@pytest.mark.parametrize('dtype', (torch.float32, torch.float64))
def test_with_cp_same_outputs_and_grads(depth, variant, dtype):
    """Checkpointing (whose saved tensors unpack as other objects) loses no
    gradient, on the native CPU path (float32) and the ATen path (float64)
    alike."""
    torch.manual_seed(1)
    ge_cfg = dict(variant=variant, extent=4)
    a = GEResNet(depth, with_cp=False, norm_eval=False, ge_cfg=ge_cfg)
    b = GEResNet(depth, with_cp=True, norm_eval=False, ge_cfg=ge_cfg)
    b.load_state_dict(a.state_dict())
    a.train(), b.train()
    a.to(dtype), b.to(dtype)
    x = torch.randn(2, 3, 40, 40, dtype=dtype, requires_grad=True)
    for m in (a, b):
        m(x)[-1].sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


# --- the global extent: sizes derived from input_size ---------------------


@pytest.mark.parametrize('input_size,sizes', (
    (224, [(56, 56), (28, 28), (14, 14), (7, 7)]),
    ((225, 100), [(57, 25), (29, 13), (15, 7), (8, 4)]),
))
def test_global_feat_size_from_input_size(input_size, sizes):
    model = GEResNet(
        50, ge_cfg=dict(variant='theta', extent='global'),
        input_size=input_size)
    got = [ge_layers(getattr(model, f'layer{i}'))[0].feat_size
           for i in range(1, 5)]
    assert got == sizes
    h, w = (input_size, input_size) if isinstance(input_size,
                                                  int) else input_size
    model.eval()
    outs = model(torch.randn(1, 3, h, w))
    assert [tuple(o.shape[-2:]) for o in outs] == sizes


def test_global_feat_size_follows_strides():
    model = GEResNet(
        50, ge_cfg=dict(variant='theta_plus', extent='global'),
        input_size=64, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))
    assert ge_layers(model.layer4)[0].feat_size == (4, 4)
    assert model(torch.randn(2, 3, 64, 64))[-1].shape[-2:] == (4, 4)


def test_global_theta_by_class_or_scoped_name():
    for layer in (GatherExcite, 'GatherExcite'):
        model = GEResNet(
            18, ge_cfg=dict(type=layer, variant='theta', extent='global'),
            input_size=32)
        assert ge_layers(model.layer4)[0].feat_size == (1, 1)


def test_global_theta_without_input_size():
    with pytest.raises(ValueError, match='needs input_size.*local extent'):
        GEResNet(50, ge_cfg=dict(variant='theta', extent='global'))
    # parameter-free global GE needs no size and runs at any size
    model = GEResNet(50, ge_cfg=dict(variant='theta_minus', extent='global'))
    model(torch.randn(1, 3, 37, 50))


def test_global_theta_other_input_size_fails_clearly():
    model = GEResNet(
        18, ge_cfg=dict(variant='theta', extent='global'), input_size=64)
    with pytest.raises(ValueError, match=r'built for feature size \(16, 16\)'
                       r'.*\(20, 20\).*local extent'):
        model(torch.randn(1, 3, 80, 80))


@pytest.mark.parametrize('depth', (18, 50))
def test_bf16_autocast_and_channels_last(depth):
    model = GEResNet(depth, ge_cfg=dict(variant='theta_plus', extent=8))
    model.init_weights()
    model.eval()
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model(x)
        cl = model.to(memory_format=torch.channels_last)(
            x.to(memory_format=torch.channels_last))
    for r, b, c in zip(ref, low, cl):
        assert b.dtype == torch.bfloat16 and torch.isfinite(b).all()
        assert (b.float() - r).abs().mean() < 0.05 * r.abs().mean()
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-4)
        assert c.is_contiguous(memory_format=torch.channels_last)


# --- bad arguments ---------------------------------------------------------


@pytest.mark.parametrize('stages', ((True, True, True), (True, ) * 5, True))
def test_bad_ge_stages(stages):
    with pytest.raises(ValueError, match='ge_stages must be a tuple of 4'):
        GEResNet(50, ge_stages=stages)


def test_bad_plugin_stages():
    plugin = dict(cfg=dict(type='GatherExcite'), stages=(True, False),
                  position='after_conv3')
    with pytest.raises(ValueError, match="'stages' must have one flag"):
        GEResNet(50, ge_cfg=None, plugins=[plugin])


@pytest.mark.parametrize('depth', (20, 0, '50'))
def test_bad_depth(depth):
    with pytest.raises(ValueError, match=r'depth must be one of \[18, 34'):
        GEResNet(depth)


@pytest.mark.parametrize('cfg,exc,match', (
    (dict(variant='theta', extent=3), ValueError, 'extent'),
    (dict(variant='nope'), ValueError, 'variant'),
    (dict(variant='theta_plus', reduction=0), ValueError, 'reduction'),
))
def test_bad_ge_cfg_fails_at_build(cfg, exc, match):
    with pytest.raises(exc, match=match):
        GEResNet(50, ge_cfg=cfg)


def test_basic_block_rejects_other_plugin_positions():
    plugin = dict(cfg=dict(type='GatherExcite'), position='after_conv3')
    with pytest.raises(ValueError, match="only at position 'after_conv2'"):
        GEResNet(18, ge_cfg=None, plugins=[plugin])


# --- SE and GC through the same argument -----------------------------------


def test_se_and_gc_in_the_same_slot():
    se = GEResNet(50, ge_cfg=dict(type='SqueezeExcite'))
    assert len(ge_layers(se, SqueezeExcite)) == 16
    assert se.layer1[0].after_conv3_plugin_names == ['squeeze_excite']
    gc = GEResNet(
        50, ge_cfg=dict(type='ContextBlock', ratio=1. / 16),
        ge_stages=(False, True, True, True))
    assert gc.layer2[0].after_conv3_plugin_names == ['context_block']
    assert gc.layer1[0].after_conv3_plugin_names == []
    for model in (se, gc):
        model(torch.randn(2, 3, 32, 32))
    basic_se = GEResNet(18, ge_cfg=dict(type='SqueezeExcite'))
    assert basic_se.layer1[0].after_conv2_plugin_names == ['squeeze_excite']


def test_log_says_whether_ge_layers_were_loaded():
    from mmengine.logging import MMLogger
    logger = MMLogger.get_instance('mmge-init-report')
    plain = ResNet(18).state_dict()
    messages = []
    handler = __import__('logging').Handler()
    handler.emit = lambda r: messages.append(r.getMessage())
    logger.addHandler(handler)
    try:
        model = GEResNet(18, ge_cfg=dict(variant='theta', extent=4))
        model.load_state_dict(plain, strict=False)
        model.load_state_dict(model.state_dict())
    finally:
        logger.removeHandler(handler)
    assert any('GEResNet: the loaded weights have no entries for its '
               'gather_excite layers' in m for m in messages)
    assert any('GEResNet: its gather_excite layers were loaded' in m
               for m in messages)
