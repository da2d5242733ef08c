"""The probes behind the analysis commands (gates, pruning,
attention, training logs) checked by hand, and the commands run on tiny
demo models and generated data."""
import json
import math
import os.path as osp
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import ContextBlock, NonLocal2d
from mmdet.models.backbones import ResNet

from mmge.analysis import mean_pairwise_cosine_distance
from mmge.analysis.attention import (AttentionRecorder, attention_stats,
                                     key_grid)
from mmge.analysis.ge_probe import (GatePruner, GateRecorder,
                                    ResidualBranchOff, ge_layers)
from mmge.analysis.training_logs import epoch_curves
from mmge.models import GatherExcite, GEResNet, SimplifiedNonLocal2d

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
GE_CLS = 'configs/demo/ge_resnet18_shapes_cls.py'


def run_tool(name, *args, env=None):
    return subprocess.run([sys.executable, f'tools/analysis/{name}.py'] +
                          [str(a) for a in args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


# --- gates and pruning -----------------------------------------------------


def test_gate_recorder_records_the_global_gate():
    layer = GatherExcite(4, variant='theta_minus', extent='global').eval()
    x = torch.randn(2, 4, 5, 3)
    with GateRecorder({'ge': layer}) as rec, torch.no_grad():
        out = layer(x)
    gate = x.mean((2, 3), keepdim=True).sigmoid()
    torch.testing.assert_close(rec.gates['ge'], gate)
    torch.testing.assert_close(out, x * gate)
    with torch.no_grad():  # the hooks are gone
        layer(x + 1)
    torch.testing.assert_close(rec.gates['ge'], gate)


def test_gate_pruner_by_hand():
    layer = GatherExcite(4, variant='theta_minus', extent='global').eval()
    # channel means (-> gates) per image: ranks differ between the images
    means = torch.tensor([[0.3, -1.0, 2.0, 0.0], [1.5, 0.2, -0.4, 3.0]])
    x = means[..., None, None] + torch.tensor([[1.0, -1.0]])  # mean kept
    gate = means.sigmoid()[..., None, None]
    with torch.no_grad():
        plain = layer(x)
        with GatePruner(layer, 0.0):
            assert torch.equal(layer(x), plain)
        with GatePruner(layer, 1.0, 'descending'):
            assert torch.equal(layer(x), torch.zeros_like(x))
        with GatePruner(layer, 0.5, 'ascending'):
            asc = layer(x)
        with GatePruner(layer, 0.5, 'descending'):
            des = layer(x)
    # ascending drops the two smallest gates of each image
    keep_asc = torch.tensor([[1.0, 0, 1, 0], [1, 0, 0, 1]])[..., None, None]
    torch.testing.assert_close(asc, x * gate * keep_asc)
    torch.testing.assert_close(des, x * gate * (1 - keep_asc))
    with pytest.raises(ValueError, match='ratio'):
        GatePruner(layer, 1.2)


def test_gate_pruner_ranks_local_gates_by_their_mean():
    layer = GatherExcite(3, variant='theta_minus', extent=2).eval()
    x = torch.randn(1, 3, 6, 6)
    with GateRecorder({'ge': layer}) as rec, torch.no_grad():
        layer(x)
    gate = rec.gates['ge']
    assert gate.shape == (1, 3, 3, 3)
    drop = int(gate.mean((2, 3)).argmin())
    with GatePruner(layer, 1 / 3), torch.no_grad():
        out = layer(x)
    expect = x * F.interpolate(gate, size=(6, 6), mode='nearest')
    expect[:, drop] = 0
    torch.testing.assert_close(out, expect)


def block_io(block, run):
    """The block's input and output during ``run()``."""
    seen = {}
    h = block.register_forward_hook(
        lambda m, i, o: seen.update(x=i[0], y=o))
    try:
        run()
    finally:
        h.remove()
    return seen['x'], seen['y']


def test_pruning_ratio_one_passes_the_shortcut_in_ge_resnet():
    model = GEResNet(18, base_channels=8, ge_cfg=dict(variant='theta',
                                                      extent=2)).eval()
    x = torch.randn(2, 3, 64, 64)
    block = model.layer2[0]
    (layer, ) = ge_layers(block).values()
    with torch.no_grad():
        plain = model(x)
        with GatePruner(layer, 0.0):
            assert all(torch.equal(a, b) for a, b in zip(model(x), plain))
        with GatePruner(layer, 1.0):
            inp, out = block_io(block, lambda: model(x))
        torch.testing.assert_close(out, block.downsample(inp).relu())
        after = model(x)  # hooks removed on exit
    assert all(torch.equal(a, b) for a, b in zip(after, plain))


def test_residual_branch_off():
    model = ResNet(18, base_channels=8)
    model.eval()  # mmdet's ResNet.train returns None
    block = model.layer3[0]
    with ResidualBranchOff(block), torch.no_grad():
        inp, out = block_io(block, lambda: model(torch.randn(1, 3, 64, 64)))
    torch.testing.assert_close(out, block.downsample(inp).relu())
    ge = GEResNet(18, base_channels=8)
    with pytest.raises(ValueError, match='GatePruner'):
        ResidualBranchOff(ge.layer3[0])


# --- attention --------------------------------------------------------------


def test_non_local_attention_by_hand_and_method_restored():
    block = NonLocal2d(8, reduction=2).eval()
    x = torch.randn(2, 8, 3, 4)
    with torch.no_grad():
        plain = block(x)
        with AttentionRecorder({'nl': block}) as rec:
            out = block(x)
        theta = block.theta(x).flatten(2).transpose(1, 2)
        phi = block.phi(x).flatten(2)
    att = (theta @ phi / math.sqrt(4)).softmax(-1)
    r = rec.records['nl']
    torch.testing.assert_close(r['attention'], att)
    assert torch.equal(r['input'], x) and torch.equal(r['output'], out)
    assert torch.equal(out, plain)
    assert 'embedded_gaussian' not in vars(block)  # the method is back


def test_query_independent_attention_recorded():
    x = torch.randn(2, 8, 3, 4)
    snl = SimplifiedNonLocal2d(8, zero_init=False).eval()
    gc = ContextBlock(8, ratio=0.25).eval()
    gc_avg = ContextBlock(8, ratio=0.25, pooling_type='avg').eval()
    blocks = dict(snl=snl, gc=gc, avg=gc_avg)
    with AttentionRecorder(blocks) as rec, torch.no_grad():
        for b in blocks.values():
            b(x)
        gc_att = gc.conv_mask(x).flatten(1).softmax(1)
        snl_att = snl.attention(x)
    torch.testing.assert_close(rec.records['snl']['attention'],
                               snl_att[:, None])
    torch.testing.assert_close(rec.records['gc']['attention'],
                               gc_att[:, None])
    torch.testing.assert_close(rec.records['avg']['attention'],
                               torch.full((2, 1, 12), 1 / 12))
    assert 'attention' not in vars(snl)
    with pytest.raises(TypeError, match='NonLocal2d'):
        AttentionRecorder({'conv': torch.nn.Conv2d(1, 1, 1)})


def test_sub_sampled_non_local_keys():
    block = NonLocal2d(4, sub_sample=True).eval()
    with AttentionRecorder({'nl': block}) as rec, torch.no_grad():
        block(torch.randn(1, 4, 6, 8))
    assert rec.records['nl']['attention'].shape == (1, 48, 12)
    assert key_grid(6, 8, 12) == (3, 4)
    with pytest.raises(ValueError, match='neither'):
        key_grid(6, 8, 10)


def test_attention_stats_by_hand():
    # two positions with orthogonal features; output = 2 * input
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    rec = dict(input=x, output=2 * x)
    rec['attention'] = torch.tensor([[[0.3, 0.7]]])  # shared by all queries
    (s, ) = attention_stats(rec)
    assert s == dict(input=1.0, output=1.0, attention=0.0, jsd=0.0)
    rec['attention'] = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    (s, ) = attention_stats(rec)
    assert math.isclose(s['attention'], 1.0)
    assert math.isclose(s['jsd'], math.log(2))
    rec['attention'] = torch.tensor([[[2.0, 1.0], [1.0, 2.0]]])  # no softmax
    assert attention_stats(rec)[0]['jsd'] is None


# --- training logs ------------------------------------------------------------


def write_log(work_dir, stamp, entries):
    d = work_dir / stamp / 'vis_data'
    d.mkdir(parents=True)
    (d / f'{stamp}.json').write_text(
        ''.join(json.dumps(e) + '\n' for e in entries))
    (d / 'scalars.json').write_text('{"ignored": 1}\n')


def train_line(epoch, it, acc, loss):
    return {'lr': 0.1, 'loss': loss, 'accuracy_top-1': acc, 'epoch': epoch,
            'iter': it, 'step': it}


def make_run(work_dir, accs=(50.0, 70.0, 90.0), vals=(60.0, 80.0)):
    write_log(work_dir, '20260101_000000', [
        train_line(1, 10, accs[0], 1.0), train_line(1, 20, accs[1], 0.5),
        {'accuracy/top1': vals[0], 'step': 1},
        train_line(2, 10, accs[2], 0.25),
        {'accuracy/top1': vals[1], 'step': 2}])
    # a later test-only run: skipped
    write_log(work_dir, '20260102_000000', [{'accuracy/top1': 99.0}])
    return work_dir


def test_epoch_curves_by_hand(tmp_path):
    run = make_run(tmp_path / 'run')
    # a resumed run adds epoch 3
    write_log(run, '20260103_000000', [train_line(3, 10, 95.0, 0.125),
                                       {'accuracy/top1': 85.0, 'step': 3}])
    c = epoch_curves(str(run))
    assert c['train_error'] == {1: 40.0, 2: 10.0, 3: 5.0}
    assert c['train_loss'] == {1: 0.75, 2: 0.25, 3: 0.125}
    assert c['val_error'] == {1: 40.0, 2: 20.0, 3: 15.0}


def test_epoch_curves_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='neither a log file'):
        epoch_curves(str(tmp_path / 'missing'))
    with pytest.raises(FileNotFoundError, match='no MMEngine scalar logs'):
        epoch_curves(str(tmp_path))
    bad = tmp_path / 'bad.json'
    bad.write_text('{"epoch": 1, "iter": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r'bad.json, line 2: not JSON'):
        epoch_curves(str(bad))
    test_only = tmp_path / 'test.json'
    test_only.write_text('{"accuracy/top1": 50.0}\n')
    with pytest.raises(ValueError, match='no training lines'):
        epoch_curves(str(test_only))


# --- the commands -------------------------------------------------------------


def val_loader(config, env):
    from mmengine.runner import Runner

    from helpers.demo_config import demo_config
    return Runner.build_dataloader(demo_config(config, env).val_dataloader)


def accuracy(model, loader, hook=None):
    """Top-1 (%) computed here, without the tools' code."""
    correct = total = 0
    handle = None if hook is None else hook()
    try:
        with torch.no_grad():
            for batch in loader:
                data = model.data_preprocessor(batch, False)
                pred = model(data['inputs'], mode='tensor').argmax(1)
                labels = torch.tensor(
                    [int(s.gt_label) for s in data['data_samples']])
                correct += int((pred == labels).sum())
                total += len(labels)
    finally:
        if handle is not None:
            handle.remove()
    return 100.0 * correct / total


def test_gate_pruning_command(demo_model, tmp_path):
    config, ckpt, model, env = demo_model(GE_CLS)
    base_config, base_ckpt, base, _ = demo_model(
        'configs/demo/resnet18_shapes_cls.py')
    out = tmp_path / 'out'
    res = run_tool('gate_pruning', '--ge', config, ckpt, '--baseline',
                   base_config, base_ckpt, '--blocks', 'layer3.0',
                   'layer4.0', '--ratios', '0.5', '1', '--out-dir', out,
                   env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / 'gate_pruning.png').stat().st_size > 1000
    report = json.loads((out / 'gate_pruning.json').read_text())
    loader = val_loader(config, env)
    unpruned = accuracy(model, loader)
    assert report['ratios'] == [0.0, 0.5, 1.0]
    assert report['unpruned_top1'] == unpruned
    block = report['blocks']['layer4.0']
    # ratio 0 reproduces the unpruned accuracy, in both orders
    assert block['ascending'][0] == block['descending'][0] == unpruned
    # ratio 1 drops the whole residual branch, whatever the order: the GE
    # layer's output is then zero, and the block passes on its shortcut
    ge = model.backbone.layer4[0].gather_excite
    dropped = accuracy(model, loader, lambda: ge.register_forward_hook(
        lambda m, args, out: torch.zeros_like(out)))
    assert block['ascending'][-1] == block['descending'][-1] == dropped
    # the baseline's reference points, computed here
    blk = base.backbone.layer4[0]
    assert block['baseline']['0'] == accuracy(base, loader)
    assert block['baseline']['1'] == accuracy(
        base, loader, lambda: blk.norm2.register_forward_hook(
            lambda m, i, o: torch.zeros_like(o)))
    assert 'layer4.0' in res.stdout and 'unpruned top-1' in res.stdout


def test_gate_pruning_command_names_bad_input(demo_model, tmp_path):
    config, ckpt, _, env = demo_model(GE_CLS)
    res = run_tool('gate_pruning', '--ge', config, ckpt, '--blocks',
                   'layer9.0', '--out-dir', tmp_path, env=env)
    assert res.returncode != 0
    assert "no module 'layer9.0'" in res.stderr
    assert 'layer4.1' in res.stderr  # the blocks that exist are listed
    res = run_tool('gate_pruning', '--ge', config, ckpt, '--ratios', '2',
                   '--out-dir', tmp_path, env=env)
    assert res.returncode == 2 and 'prune ratios must be in [0, 1]' in \
        res.stderr
    det_config, det_ckpt, _, env = demo_model(
        'configs/demo/faster_rcnn_ge_theta_e8_shapes.py')
    res = run_tool('gate_pruning', '--ge', det_config, det_ckpt, '--out-dir',
                   tmp_path, env=env)
    assert res.returncode != 0 and 'is not a classifier' in res.stderr


def test_convergence_curves_command(tmp_path):
    base = make_run(tmp_path / 'base')
    ge = make_run(tmp_path / 'ge', accs=(60.0, 80.0, 96.0),
                  vals=(70.0, 90.0))
    out = tmp_path / 'out'
    res = run_tool('convergence_curves', '--run', 'baseline', base, '--run',
                   'GE', ge, '--out-dir', out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / 'convergence_curves.png').stat().st_size > 1000
    report = json.loads((out / 'convergence_curves.json').read_text())
    assert report['runs']['baseline']['train_error'] == {'1': 40.0,
                                                         '2': 10.0}
    assert report['runs']['GE']['train_error'] == {'1': 30.0, '2': 4.0}
    assert report['runs']['GE']['val_error'] == {'1': 30.0, '2': 10.0}
    assert 'GE' in res.stdout and '10.00' in res.stdout  # best val error
    res = run_tool('convergence_curves', '--run', 'only', base, '--out-dir',
                   out)
    assert res.returncode == 2 and 'at least two' in res.stderr


def test_attention_stats_command(demo_model, tmp_path):
    runs = {name: demo_model(f'configs/demo/{name.lower()}_resnet18_shapes_'
                             'cls.py') for name in ('NL', 'SNL', 'GC')}
    env = runs['NL'][3]
    # mmcv initialises theta and phi with std 0.01, which makes random
    # non-local attention uniform: sharpen it
    config, _, nl, _ = runs['NL']
    for conv in (nl.backbone.layer2[1].before_block.theta.conv,
                 nl.backbone.layer2[1].before_block.phi.conv):
        conv.weight.data.normal_(0, 1)
    torch.save({'state_dict': nl.state_dict()}, tmp_path / 'nl.pth')
    runs['NL'] = (config, tmp_path / 'nl.pth', nl, env)
    args = []
    for name, (config, ckpt, _, _) in runs.items():
        args += ['--model', name, config, ckpt]
    out = tmp_path / 'out'
    res = run_tool('attention_stats', *args, '--max-images', 6,
                   '--image-index', 2, '--out-dir', out, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / 'attention_stats.png').stat().st_size > 1000
    report = json.loads((out / 'attention_stats.json').read_text())
    nl = report['models']['NL']['blocks']['backbone.layer2.1.before_block']
    snl = report['models']['SNL']['blocks'][
        'backbone.layer2.1.before_block']
    gc = report['models']['GC']['blocks']
    assert len(gc) == 6  # two blocks in each of c3-c5
    # query-independent attention: every query's map is the same
    for s in [snl] + list(gc.values()):
        assert abs(s['attention']) < 1e-9 and abs(s['jsd']) < 1e-9
    assert nl['attention'] > 1e-4 and nl['jsd'] > 1e-6
    # the input statistic, recomputed here over the same six images
    _, _, model, _ = runs['SNL']
    block = model.backbone.layer2[1].before_block
    dists = []
    h = block.register_forward_hook(lambda m, i, o: dists.extend(
        mean_pairwise_cosine_distance(f.flatten(1).T) for f in i[0]))
    loader = val_loader(runs['SNL'][0], env)
    with torch.no_grad():
        for batch in loader:
            model.extract_feat(model.data_preprocessor(batch, False)
                               ['inputs'])
            if len(dists) >= 6:
                break
    h.remove()
    assert math.isclose(snl['input'], sum(dists[:6]) / 6, rel_tol=1e-9)
    assert '| SNL | backbone.layer2.1.before_block |' in res.stdout


def test_attention_stats_command_needs_attention_blocks(demo_model,
                                                        tmp_path):
    config, ckpt, _, env = demo_model(GE_CLS)
    res = run_tool('attention_stats', '--model', 'GE', config, ckpt,
                   '--out-dir', tmp_path, env=env)
    assert res.returncode != 0
    assert 'has no NonLocal2d, SimplifiedNonLocal2d or ContextBlock' in \
        res.stderr
    res = run_tool('attention_stats', '--model', 'GE', config, ckpt,
                   '--points', '0.5,0.5', '2,0', '0,0', '--out-dir', tmp_path)
    assert res.returncode == 2 and "got '2,0'" in res.stderr


def test_gate_maps_command_on_a_classifier(demo_model, tmp_path):
    config, ckpt, model, env = demo_model(GE_CLS)
    out = tmp_path / 'out'
    res = run_tool('gate_maps', config, ckpt, '--num-images', 3,
                   '--out-dir', out, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / 'gate_maps.png').stat().st_size > 1000
    report = json.loads((out / 'gate_maps.json').read_text())
    assert len(report['images']) == 3
    blocks = report['images'][0]['blocks']
    assert list(blocks) == ['layer2.0', 'layer3.0', 'layer4.0']
    # global GE: one gate per channel
    assert blocks['layer4.0']['size'] == [1, 1]
    assert len(blocks['layer4.0']['channel_mean']) == 128
    # the numbers, recomputed here for the first image
    with GateRecorder(ge_layers(model.backbone.layer4[0])) as rec, \
            torch.no_grad():
        batch = next(iter(val_loader(config, env)))
        model.extract_feat(model.data_preprocessor(batch, False)['inputs'])
    (gate, ) = rec.gates.values()
    torch.testing.assert_close(
        torch.tensor(blocks['layer4.0']['channel_mean']),
        gate[0].flatten().float())
    assert math.isclose(blocks['layer4.0']['below_half'],
                        float((gate[0] < 0.5).double().mean()))


def test_gate_maps_command_on_a_detector(demo_model, tmp_path):
    config, ckpt, _, env = demo_model(
        'configs/demo/faster_rcnn_ge_theta_e8_shapes.py')
    out = tmp_path / 'out'
    res = run_tool('gate_maps', config, ckpt, '--num-images', 2, '--blocks',
                   'layer1.1', 'layer2.0', '--out-dir', out, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / 'gate_maps.json').read_text())
    blocks = report['images'][1]['blocks']
    # 128x128 images: 32x32 and 16x16 features, extent 8 -> 4x4 and 2x2
    assert blocks['layer1.1']['size'] == [4, 4]
    assert blocks['layer2.0']['size'] == [2, 2]
    assert all(0 < b['min'] <= b['mean'] <= b['max'] < 1
               for b in blocks.values())
    assert (out / 'gate_maps.png').stat().st_size > 1000


@pytest.mark.parametrize('tool,says', (
    ('class_selectivity', 'Fig. 3'), ('gate_pruning', 'Fig. 5'),
    ('convergence_curves', 'Fig. 4'), ('attention_stats', 'Table 1'),
    ('gate_maps', '--num-images')))
def test_tools_have_help(tool, says):
    res = run_tool(tool, '--help')
    assert res.returncode == 0 and says in res.stdout
    assert '--out-dir' in res.stdout
