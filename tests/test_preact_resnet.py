"""The CIFAR networks: pre-activation ResNet-110/164 and WRN-16-8."""
import pytest
import torch

from mmge.models import GatherExcite, PreActBlock, PreActResNet, WideResNet


@pytest.mark.parametrize('make,params,out', (
    (lambda: PreActResNet(110), 1_729_872, 64),
    (lambda: PreActResNet(164, bottleneck=True), 1_700_688, 256),
    (lambda: WideResNet(16, 8), 10_956_240, 512),
))
def test_sizes_are_the_published_networks(make, params, out):
    # He et al.: 1.7M for both; Zagoruyko and Komodakis: 11.0M for WRN-16-8
    model = make()
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.randn(2, 3, 32, 32))[-1].shape == (2, out, 8, 8)


def test_units_per_stage():
    assert len(PreActResNet(110).stages[0]) == 18
    assert len(PreActResNet(164, bottleneck=True).stages[2]) == 18
    assert len(WideResNet(16, 8).stages[1]) == 2


@pytest.mark.parametrize('make,match', (
    (lambda: PreActResNet(100), r'6n \+ 2'),
    (lambda: PreActResNet(100, bottleneck=True), r'9n \+ 2'),
    (lambda: WideResNet(18, 8), r'6n \+ 4'),
))
def test_bad_depth(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unit_is_preactivated_and_gated_before_the_add():
    unit = PreActBlock(16, 32, stride=2,
                       ge_cfg=dict(type='GatherExcite', variant='theta_minus',
                                   extent='global')).eval()
    seen = {}
    unit.gather_excite.register_forward_hook(
        lambda m, i, o: seen.update(inp=i[0], out=o))
    x = torch.randn(1, 16, 8, 8)
    y = unit(x)
    pre = torch.relu(unit.norms[0](x))
    branch = unit.convs[1](torch.relu(unit.norms[1](unit.convs[0](pre))))
    torch.testing.assert_close(seen['inp'], branch)
    torch.testing.assert_close(y, seen['out'] + unit.shortcut(pre))


def test_global_ge_gets_each_stage_size():
    model = PreActResNet(
        110, ge_cfg=dict(variant='theta', extent='global'), input_size=32)
    sizes = [stage[0].gather_excite.feat_size for stage in model.stages]
    assert sizes == [(32, 32), (16, 16), (8, 8)]
    assert all(isinstance(u.gather_excite, GatherExcite)
               for stage in model.stages for u in stage)
