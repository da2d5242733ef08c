"""GEShuffleNetV1: mmpretrain's ShuffleNetV1 plus a layer on every branch."""
import pytest
import torch
from mmpretrain.models.backbones import ShuffleNetV1

from mmge.models import GatherExcite, GEShuffleNetV1, GEShuffleUnit


def test_plain_weights_load_with_only_the_layers_missing():
    plain = ShuffleNetV1(groups=3)
    model = GEShuffleNetV1(groups=3, ge_cfg=dict(variant='theta', extent=4))
    res = model.load_state_dict(plain.state_dict(), strict=False)
    assert not res.unexpected_keys
    assert res.missing_keys and all('.gather_excite.' in k
                                    for k in res.missing_keys)
    assert GEShuffleNetV1(ge_cfg=None).state_dict().keys() == \
        plain.state_dict().keys()


def test_layer_sits_on_the_branch_before_add_and_concat(monkeypatch):
    from mmge.models.backbones import ge_shufflenet_v1
    from test_ge_resnet import _spy_block_tail
    model = GEShuffleNetV1(groups=3, ge_cfg=dict(variant='theta_minus',
                                                 extent=2)).eval()
    units = [u for layer in model.layers for u in layer]
    assert len(units) == 16 and all(isinstance(u, GEShuffleUnit)
                                    for u in units)
    concat, add = model.layers[1][0], model.layers[1][1]
    assert concat.gather_excite.in_channels == 480 - 240  # new channels
    assert add.gather_excite.in_channels == 480
    seen = _spy_block_tail(monkeypatch, ge_shufflenet_v1)
    x = torch.randn(1, 480, 9, 9)
    y = add(x)
    # GE's fused tail gets the expanding conv's output, its BN and the
    # shortcut
    expand = add.g_conv_1x1_expand
    assert len(seen) == 1 and seen[0]['ge'] is add.gather_excite
    assert seen[0]['norm'] is expand.norm
    torch.testing.assert_close(seen[0]['identity'], x)
    with torch.no_grad():
        branch = expand.norm(seen[0]['x'])
        expect = torch.relu(x + add.gather_excite(branch))
    torch.testing.assert_close(y, expect)


def test_units_relu_runs_in_ge_pass_with_the_same_result():
    """The unit's ReLU after GE runs in GE's last pass; a hook on it puts
    the module call back, with the same outputs bit for bit."""
    torch.manual_seed(0)
    model = GEShuffleNetV1(groups=3, widen_factor=0.5,
                           ge_cfg=dict(variant='theta', extent=2)).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = []
    with torch.no_grad():
        fused = model(x)
        for u in (u for layer in model.layers for u in layer):
            u.act.register_forward_hook(lambda *a: seen.append(1))
        hooked = model(x)
    assert len(seen) >= 16
    assert all(torch.equal(a, b) for a, b in zip(fused, hooked))


def test_plain_unit_output_unchanged_without_layer():
    torch.manual_seed(0)
    plain = ShuffleNetV1(groups=3)
    plain.eval()  # mmpretrain's train() returns None
    model = GEShuffleNetV1(groups=3, ge_cfg=None).eval()
    model.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], plain(x)[0])


def test_global_needs_input_size_and_derives_stage_sizes():
    with pytest.raises(ValueError, match='needs input_size'):
        GEShuffleNetV1(ge_cfg=dict(variant='theta', extent='global'))
    model = GEShuffleNetV1(
        ge_cfg=dict(variant='theta_plus', extent='global'), input_size=96)
    sizes = [layer[0].gather_excite.feat_size for layer in model.layers]
    assert sizes == [(12, 12), (6, 6), (3, 3)]
    model.eval()
    assert model(torch.randn(1, 3, 96, 96))[0].shape == (1, 960, 3, 3)
    assert all(isinstance(u.gather_excite, GatherExcite)
               for layer in model.layers for u in layer)
