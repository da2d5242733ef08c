"""Detection: configs, entry points, distributed CPU run, checkpoints, demo."""
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import textwrap

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

from helpers.payload import Payload
from mmge.datasets import make_shapes_dataset
from mmge.models import GatherExcite, GEResLayer, GEResNet

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = sorted(
    glob.glob(osp.join(ROOT, 'configs', '*.py')) +
    glob.glob(osp.join(ROOT, 'configs', 'demo', 'faster_rcnn*.py')))
DEMO = osp.join(ROOT, 'configs', 'demo', 'faster_rcnn_ge_theta_e8_shapes.py')
PY = sys.executable


def run_tool(args, cwd=ROOT, env=None, timeout=600):
    full_env = dict(os.environ, PYTHONWARNINGS='ignore', **(env or {}))
    return subprocess.run([PY] + args, cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    make_shapes_dataset(str(root), num_train=24, num_val=8, seed=1)
    return str(root)


def tiny_config(tmp_path, shapes, epochs=1, extra=''):
    """The demo config on the tiny dataset, as a user's config file."""
    path = tmp_path / 'tiny.py'
    path.write_text(textwrap.dedent(f"""
        _base_ = {DEMO!r}
        data_root = {shapes + '/'!r}
        train_dataloader = dict(batch_size=4, dataset=dict(
            data_root=data_root))
        val_dataloader = dict(dataset=dict(data_root=data_root))
        test_dataloader = val_dataloader
        val_evaluator = dict(
            ann_file=data_root + 'annotations/instances_val.json')
        test_evaluator = val_evaluator
        train_cfg = dict(max_epochs={epochs}, val_interval={epochs})
        default_hooks = dict(logger=dict(interval=1),
                             checkpoint=dict(interval=1, max_keep_ckpts=3))
        """) + extra)
    return str(path)


# --- every config builds and runs ----------------------------------------


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_builds_and_runs_forward(path):
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    cfg = Config.fromfile(path)
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)  # no init_weights: no downloads here
    model.eval()
    sample = DetDataSample(metainfo=dict(
        img_shape=(128, 160), ori_shape=(128, 160), scale_factor=(1., 1.)))
    with torch.no_grad():
        data = model.data_preprocessor(
            dict(inputs=[torch.randint(0, 255, (3, 128, 160)).byte()],
                 data_samples=[sample]))
        result = model(**data, mode='predict')
    assert len(result) == 1 and 'bboxes' in result[0].pred_instances


def test_ge_detector_is_its_baseline_plus_ge():
    base = Config.fromfile(osp.join(ROOT, 'configs', 'faster_rcnn_r50_c4.py'))
    ge = Config.fromfile(
        osp.join(ROOT, 'configs', 'faster_rcnn_ge_theta_e8.py'))
    ge_cfg = dict(type='GatherExcite', variant='theta', extent=8)
    assert ge.model.backbone.pop('type') == 'GEResNet'
    assert ge.model.backbone.pop('ge_cfg') == ge_cfg
    assert ge.model.roi_head.shared_head.pop('type') == 'GEResLayer'
    assert ge.model.roi_head.shared_head.pop('ge_cfg') == ge_cfg
    base.model.backbone.pop('type')
    base.model.roi_head.shared_head.pop('type')
    assert ge.model == base.model
    assert ge.train_dataloader == base.train_dataloader
    assert ge.param_scheduler == base.param_scheduler


def test_paper_detector_has_ge_in_every_block_and_the_roi_head():
    from mmdet.registry import MODELS
    cfg = Config.fromfile(
        osp.join(ROOT, 'configs', 'faster_rcnn_ge_theta_e8.py'))
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    assert isinstance(model.backbone, GEResNet)
    assert model.backbone.style == 'caffe'
    assert isinstance(model.roi_head.shared_head, GEResLayer)
    layers = [m for m in model.modules() if isinstance(m, GatherExcite)]
    assert len(layers) == 3 + 4 + 6 + 3  # conv2-conv4 + the conv5 head
    assert all(m.variant == 'theta' and m.extent == 8 for m in layers)
    assert type(model.roi_head.bbox_roi_extractor.roi_layers[0]).__name__ \
        == 'RoIAlign'


def test_coco_root_and_year_are_one_variable_each(monkeypatch):
    monkeypatch.setenv('COCO_ROOT', '/datasets/coco/')
    monkeypatch.setenv('COCO_YEAR', '2014')
    cfg = Config.fromfile(
        osp.join(ROOT, 'configs', 'faster_rcnn_ge_theta_e8.py'))
    train = cfg.train_dataloader.dataset
    assert train.data_root == '/datasets/coco/'
    assert train.ann_file == 'annotations/instances_train2014.json'
    assert train.data_prefix.img == 'train2014/'
    assert cfg.val_dataloader.dataset.data_prefix.img == 'val2014/'
    assert cfg.test_evaluator.ann_file == \
        '/datasets/coco/annotations/instances_val2014.json'


def test_ge_pretrained_variable_sets_both_inits(monkeypatch):
    monkeypatch.setenv('GE_PRETRAINED', '/ckpt/ge_r50_backbone.pth')
    cfg = Config.fromfile(
        osp.join(ROOT, 'configs', 'faster_rcnn_ge_theta_e8.py'))
    assert cfg.model.backbone.init_cfg.checkpoint == \
        '/ckpt/ge_r50_backbone.pth'
    assert cfg.model.roi_head.shared_head.init_cfg.checkpoint == \
        '/ckpt/ge_r50_backbone.pth'


# --- entry points: bad input -----------------------------------------------


def test_missing_data_root_is_one_line(tmp_path):
    out = run_tool(['tools/train.py', 'configs/faster_rcnn_ge_theta_e8.py',
                    '--work-dir', str(tmp_path)],
                   env=dict(COCO_ROOT=str(tmp_path / 'nope') + '/'))
    assert out.returncode != 0
    assert 'Traceback' not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith('error: train_dataloader.dataset.data_root')
    assert str(tmp_path / 'nope') in last and 'cocodataset.org' in last


def test_unknown_cfg_option_is_one_line(tmp_path, shapes):
    cfg = tiny_config(tmp_path, shapes)
    out = run_tool(['tools/train.py', cfg, '--work-dir', str(tmp_path),
                    '--cfg-options', 'model.backbone.no_such_arg=1'])
    assert out.returncode != 0
    assert 'Traceback' not in out.stderr
    assert 'no_such_arg' in out.stderr.strip().splitlines()[-1]


def test_missing_image_is_named(tmp_path, shapes):
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(shapes, data)
    os.remove(data / 'train' / '000003.png')
    cfg = tiny_config(tmp_path, str(data))
    out = run_tool(['tools/train.py', cfg, '--work-dir', str(tmp_path)])
    assert out.returncode != 0
    assert '000003.png' in out.stderr


def test_corrupt_image_is_named(tmp_path, shapes):
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(shapes, data)
    (data / 'train' / '000005.png').write_bytes(b'not a png')
    cfg = tiny_config(tmp_path, str(data))
    out = run_tool(['tools/train.py', cfg, '--work-dir', str(tmp_path)])
    assert out.returncode != 0
    assert '000005.png' in out.stderr


# --- checkpoints: weights-only, resume, malicious payload -------------------


@pytest.fixture(scope='module')
def trained(tmp_path_factory, shapes):
    """Two epochs of the tiny config, then a resume to the third."""
    work = tmp_path_factory.mktemp('trained')
    cfg = tiny_config(work, shapes, epochs=2)
    out = run_tool(['tools/train.py', cfg, '--work-dir', str(work)])
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(work=str(work), cfg=cfg)


def test_train_writes_checkpoint_and_log(trained):
    assert osp.isfile(osp.join(trained['work'], 'epoch_2.pth'))
    assert glob.glob(osp.join(trained['work'], '*', '*.log'))


def test_resume_continues_from_the_checkpoint(trained, tmp_path, shapes):
    cfg = tiny_config(tmp_path, shapes, epochs=3)
    out = run_tool(['tools/train.py', cfg, '--work-dir', trained['work'],
                    '--resume', osp.join(trained['work'], 'epoch_2.pth')])
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'resumed epoch: 2' in out.stderr + out.stdout
    assert 'Epoch(train) [1]' not in out.stderr + out.stdout
    assert osp.isfile(osp.join(trained['work'], 'epoch_3.pth'))


def test_test_prints_coco_numbers_and_dumps_json(trained, tmp_path):
    prefix = str(tmp_path / 'res')
    out = run_tool(['tools/test.py', trained['cfg'],
                    osp.join(trained['work'], 'epoch_2.pth'), '--work-dir',
                    str(tmp_path), '--json-prefix', prefix])
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert text.count('Average Precision') == 6
    assert text.count('Average Recall') == 6
    assert 'coco/bbox_mAP' in text
    assert osp.isfile(prefix + '.bbox.json')


@pytest.mark.parametrize('tool', ('test', 'resume'))
def test_malicious_checkpoint_is_refused(trained, tmp_path, tool):
    marker = tmp_path / 'payload_ran'
    evil = tmp_path / 'evil.pth'
    state = torch.load(osp.join(trained['work'], 'epoch_2.pth'))
    state['meta']['note'] = Payload(str(marker))
    torch.save(state, evil)
    if tool == 'test':
        args = ['tools/test.py', trained['cfg'], str(evil)]
    else:
        args = ['tools/train.py', trained['cfg'], '--resume', str(evil)]
    out = run_tool(args + ['--work-dir', str(tmp_path)])
    assert out.returncode != 0
    assert not marker.exists(), 'the payload ran'
    last = out.stderr.strip().splitlines()[-1]
    assert 'refused to load checkpoint' in last and 'system' in last
    assert str(evil) in last


# --- distributed on the CPU ---------------------------------------------------


def test_dist_train_two_processes_gloo(tmp_path, shapes):
    cfg = tiny_config(
        tmp_path, shapes, extra=textwrap.dedent("""
        custom_imports = dict(imports=['mmge', 'rank_weights_hook'],
                              allow_failed_imports=False)
        custom_hooks = [dict(type='RankWeightsHook')]
        """))
    work = tmp_path / 'work'
    env = dict(os.environ, PYTHON=PY, PORT='29517', PYTHONWARNINGS='ignore',
               PYTHONPATH=osp.join(ROOT, 'tests', 'helpers'))
    out = subprocess.run(['bash', 'tools/dist_train.sh', cfg, '2',
                          '--work-dir', str(work)], cwd=ROOT, env=env,
                         text=True, capture_output=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    w0 = torch.load(work / 'weights_rank0.pth', weights_only=True)
    w1 = torch.load(work / 'weights_rank1.pth', weights_only=True)
    assert w0.keys() == w1.keys()
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0, msg=k)
    assert sorted(os.listdir(work)).count('epoch_1.pth') == 1
    assert len(glob.glob(str(work / '*.pth'))) == 3  # ckpt + 2 rank dumps
    assert len(w0) == len(dict(GEResNet(18).named_parameters())) + len(
        [k for k in w0 if not k.startswith('backbone.')])
    assert len(glob.glob(str(work / '*' / '*.log'))) == 1
    assert 'gloo' in (out.stdout + out.stderr)


# --- the demo ---------------------------------------------------------------


def test_demo_short_run(tmp_path):
    work = tmp_path / 'demo'
    out = run_tool(['tools/demo.py', '--work-dir', str(work), '--data-root',
                    str(tmp_path / 'data'), '--epochs', '4', '--num-train',
                    '48', '--num-val', '8', '--log-interval', '1',
                    '--num-pictures', '2'])
    assert out.returncode == 0, out.stderr[-3000:]
    with open(work / 'metrics.json') as f:
        metrics = json.load(f)
    for key in ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s',
                'bbox_mAP_m', 'bbox_mAP_l', 'bbox_AR_1', 'bbox_AR_10',
                'bbox_AR_100', 'bbox_AR_s', 'bbox_AR_m', 'bbox_AR_l'):
        assert key in metrics
    assert set(metrics['per_class']) == {'square', 'circle', 'triangle'}
    assert osp.isfile(work / 'epoch_4.pth')
    assert osp.getsize(work / 'predictions.png') > 1000
    scalars = glob.glob(str(work / '*' / 'vis_data' / 'scalars.json'))
    losses = []
    for path in sorted(scalars):
        with open(path) as f:
            losses += [json.loads(line)['loss'] for line in f
                       if '"loss"' in line]
    assert len(losses) >= 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert 'done in' in out.stdout
    # the last line runs mmdet's DetInferencer on the checkpoint
    prefix, line = out.stdout.splitlines()[-1].split(None, 1)
    assert prefix == 'inference'
    ran = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert len(glob.glob(str(work / 'inference' / 'vis' / '*.png'))) == 1


def test_shapes_datasets_regenerate_cleanly(tmp_path):
    from mmge.datasets import make_shapes_classification
    root = str(tmp_path / 'cls')
    make_shapes_classification(root, num_train=30, num_val=9, seed=0)
    make_shapes_classification(root, num_train=12, num_val=6, seed=1)
    found = sum(len(files) for _, _, files in os.walk(
        osp.join(root, 'train')))
    assert found == 12  # nothing left of the first, larger set
    first = json.load(open(make_shapes_dataset(
        str(tmp_path / 'det'), num_train=5, num_val=3)['val']))
    again = json.load(open(make_shapes_dataset(
        str(tmp_path / 'det2'), num_train=5, num_val=3)['val']))
    assert first == again  # same seed, same data
    other = tmp_path / 'mine'
    other.mkdir()
    (other / 'notes.txt').write_text('keep me')
    with pytest.raises(ValueError, match='holds no generated dataset'):
        make_shapes_classification(str(other))
    assert (other / 'notes.txt').read_text() == 'keep me'
