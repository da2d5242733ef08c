"""The papers' studies: their statistics, the simplified non-local block, the
GCNet comparison configs and the class-selectivity command."""
import json
import math
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmdet.models.backbones import ResNet

from mmge.analysis import (class_selectivity, gate_prune_mask, js_divergence,
                           mean_pairwise_cosine_distance, mean_pairwise_jsd)
from mmge.models import GEResNet, SimplifiedNonLocal2d

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def test_class_selectivity_by_hand():
    means = torch.tensor([
        [5.0, 2.0, 0.0, 3.0],  # class 0
        [0.0, 2.0, 0.0, 1.0],  # class 1
        [0.0, 2.0, 0.0, 1.0],  # class 2
    ])
    index = class_selectivity(means)
    # one class only -> 1; all classes equally -> 0; silent -> 0;
    # mu_max 3, mu_rest 1 -> (3 - 1) / (3 + 1)
    torch.testing.assert_close(index, torch.tensor([1.0, 0.0, 0.0, 0.5]))


def test_class_selectivity_refuses_bad_input():
    with pytest.raises(ValueError, match='classes >= 2'):
        class_selectivity(torch.ones(1, 4))
    with pytest.raises(ValueError, match='non-negative'):
        class_selectivity(torch.tensor([[1.0], [-1.0]]))


def test_jensen_shannon_by_hand():
    p = torch.tensor([1.0, 0.0])
    q = torch.tensor([0.5, 0.5])
    assert float(js_divergence(p, p)) == 0.0
    assert math.isclose(float(js_divergence(p, torch.tensor([0.0, 1.0]))),
                        math.log(2))
    # m = (0.75, 0.25): KL(p||m) = ln(4/3), KL(q||m) = (ln(2/3) + ln 2) / 2
    expect = (math.log(4 / 3) + (math.log(2 / 3) + math.log(2)) / 2) / 2
    assert math.isclose(float(js_divergence(p, q)), expect)
    maps = torch.stack([q, q, q])
    assert mean_pairwise_jsd(maps) == 0.0


def test_cosine_distance_by_hand():
    assert math.isclose(mean_pairwise_cosine_distance(
        torch.tensor([[1.0, 2.0], [2.0, 4.0]])), 0.0, abs_tol=1e-12)
    # pairs: (e1, e2) -> 1, (e1, -e1) -> 2, (e2, -e1) -> 1
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert math.isclose(mean_pairwise_cosine_distance(v), 4 / 3)


def test_gate_prune_mask():
    gates = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.6, 0.4]])
    assert torch.equal(gate_prune_mask(gates, 0.0), torch.ones(2, 4))
    assert torch.equal(gate_prune_mask(gates, 1.0), torch.zeros(2, 4))
    assert gate_prune_mask(gates, 0.5).tolist() == [[0, 1, 1, 0],
                                                    [1, 0, 1, 0]]
    assert gate_prune_mask(gates, 0.5, 'descending').tolist() == [
        [1, 0, 0, 1], [0, 1, 0, 1]]
    with pytest.raises(ValueError, match='ratio'):
        gate_prune_mask(gates, 1.5)
    with pytest.raises(ValueError, match='order'):
        gate_prune_mask(gates, 0.5, 'random')


def test_simplified_non_local_by_hand():
    torch.manual_seed(0)
    block = SimplifiedNonLocal2d(4, zero_init=False)
    x = torch.randn(2, 4, 3, 5)
    attn = block.attention(x)
    assert attn.shape == (2, 15)
    torch.testing.assert_close(attn.sum(1), torch.ones(2))
    k = torch.einsum('c,ncp->np', block.conv_key.weight.view(4),
                     x.flatten(2)) + block.conv_key.bias
    a = k.softmax(1)
    ctx = (x.flatten(2) * a[:, None]).sum(-1)
    v = ctx @ block.conv_value.weight.view(4, 4).T + block.conv_value.bias
    torch.testing.assert_close(block(x), x + v[..., None, None])


def test_simplified_non_local_starts_as_identity_and_plugs_in():
    block = SimplifiedNonLocal2d(8)
    block.init_weights()
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(block(x), x)
    model = ResNet(50, plugins=[dict(cfg=dict(type='SimplifiedNonLocal2d'),
                                     stages=(False, False, True, False),
                                     position='after_conv3')])
    assert hasattr(model.layer3[0], 'simplified_non_local')


def test_before_last_block_names_and_errors():
    model = GEResNet(50, ge_cfg=None, before_last_block=dict(
        stage=2, cfg=dict(type='NonLocal2d', reduction=2)))
    keys = [k for k in model.state_dict() if 'before_block' in k]
    assert keys and all(k.startswith('layer3.5.before_block.') for k in keys)
    plain = set(ResNet(50).state_dict())
    assert plain <= set(model.state_dict())  # plain weights still load
    model.eval()
    assert model(torch.randn(1, 3, 64, 64))[2].shape == (1, 1024, 4, 4)
    with pytest.raises(ValueError, match='stage must be an int in 0..3'):
        GEResNet(50, before_last_block=dict(stage=7, cfg=dict(
            type='SimplifiedNonLocal2d')))
    with pytest.raises(ValueError, match='before_last_block must be'):
        GEResNet(50, before_last_block=dict(type='NonLocal2d'))


@pytest.mark.parametrize('name,layer', (
    ('faster_rcnn_nl_fpn.py', 'NonLocal2d'),
    ('faster_rcnn_snl_fpn.py', 'SimplifiedNonLocal2d'),
    ('faster_rcnn_gc_fpn.py', None),
))
def test_gcnet_comparison_configs_build(name, layer):
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope('mmdet')
    cfg = Config.fromfile(osp.join(ROOT, 'configs', name))
    backbone = cfg.model.backbone
    backbone.pop('init_cfg', None)
    model = MODELS.build(backbone)
    if layer is not None:
        assert type(model.layer3[5].before_block).__name__ == layer
        assert not any('before_block' in k for k, _ in
                       model.layer3[4].named_modules())


def test_class_selectivity_command(demo_model, tmp_path):
    """The command on a demo classifier with random weights and generated
    images: PNG and JSON written, one index per channel and block, the
    indices those computed here."""
    config, ckpt, model, env = demo_model(
        'configs/demo/ge_resnet18_shapes_cls.py')
    out_dir = tmp_path / 'out'
    res = subprocess.run([
        sys.executable, 'tools/analysis/class_selectivity.py', '--model',
        'GE', config, str(ckpt), '--model', 'GE again', config, str(ckpt),
        '--max-images', '24', '--out-dir', str(out_dir)
    ], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out_dir / 'class_selectivity.png').stat().st_size > 1000
    report = json.loads((out_dir / 'class_selectivity.json').read_text())
    assert set(report['models']) == {'GE', 'GE again'}
    ge = report['models']['GE']
    assert len(ge['index']) == 2  # ResNet-18's last stage has two blocks
    last = getattr(model.backbone, model.backbone.res_layers[-1])
    channels = last[-1].conv2.out_channels
    assert all(len(block) == channels for block in ge['index'])
    assert all(0.0 <= i <= 1.0 for block in ge['index'] for i in block)
    # the same model twice gives the same indices
    assert ge['index'] == report['models']['GE again']['index']
    # the last block's indices, from class means computed here
    from helpers.demo_config import demo_config
    from mmengine.runner import Runner
    cfg = demo_config(config, env)
    feats, labels = [], []
    h = last[-1].register_forward_hook(
        lambda m, i, o: feats.append(o.mean((2, 3)).double()))
    with torch.no_grad():
        for batch in Runner.build_dataloader(cfg.val_dataloader):
            data = model.data_preprocessor(batch, False)
            model.extract_feat(data['inputs'])
            labels += [int(s.gt_label) for s in data['data_samples']]
    h.remove()
    feats, labels = torch.cat(feats), torch.tensor(labels)
    means = torch.stack([feats[labels == c].mean(0) for c in range(3)])
    torch.testing.assert_close(
        torch.tensor(ge['index'][1], dtype=means.dtype),
        class_selectivity(means))


def test_class_selectivity_command_names_a_missing_checkpoint(tmp_path):
    res = subprocess.run([
        sys.executable, 'tools/analysis/class_selectivity.py', '--model', 'x',
        'configs/demo/ge_resnet18_shapes_cls.py', str(tmp_path / 'no.pth'),
        '--out-dir', str(tmp_path)
    ], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert 'no.pth' in res.stderr and 'does not exist' in res.stderr
