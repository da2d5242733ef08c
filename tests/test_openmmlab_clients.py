"""mmge's models and configs through OpenMMLab's own clients.

A downstream project, in a folder outside the repository, inherits mmge's
demo configs with ``_base_ = 'mmge::...'`` and drives them with the
``tools/train.py`` and ``tools/test.py`` that ship inside the installed mmdet
and mmpretrain packages, unmodified, and with their Python APIs
(``DetInferencer``, ``init_detector``, ``ImageClassificationInferencer``,
``get_model``). Every client runs in a fresh interpreter in which nothing but
the config's ``custom_imports`` imports mmge, from its installed package.
"""
import glob
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import textwrap

import mmdet
import mmpretrain
import pytest
import torch
from mmengine.config import Config

from helpers.payload import Payload
from mmge.datasets import make_shapes_classification, make_shapes_dataset

PY = sys.executable
MMDET_TOOLS = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools')
MMPRETRAIN_TOOLS = osp.join(osp.dirname(mmpretrain.__file__), '.mim',
                            'tools')

DETECTOR = """
    _base_ = 'mmge::configs/demo/faster_rcnn_ge_theta_e8_shapes.py'
    data_root = 'data/'
    classes = ('square', 'circle')
    model = dict(roi_head=dict(bbox_head=dict(num_classes=2)))
    train_dataloader = dict(batch_size=4, dataset=dict(
        data_root=data_root, metainfo=dict(classes=classes)))
    val_dataloader = dict(dataset=dict(
        data_root=data_root, metainfo=dict(classes=classes)))
    test_dataloader = val_dataloader
    val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
    test_evaluator = val_evaluator
    train_cfg = dict(max_epochs=1, val_interval=1)
    default_hooks = dict(checkpoint=dict(interval=1))
    """

CLASSIFIER = """
    _base_ = 'mmge::configs/demo/ge_resnet18_shapes_cls.py'
    data_root = 'data/'
    train_dataloader = dict(batch_size=4, dataset=dict(data_root=data_root))
    val_dataloader = dict(dataset=dict(data_root=data_root))
    test_dataloader = val_dataloader
    train_cfg = dict(max_epochs=1, val_interval=1)
    default_hooks = dict(checkpoint=dict(interval=1))
    """


def run(args, cwd, timeout=900):
    """``python ARGS`` in ``cwd``, with nothing of the checkout on its path."""
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    path = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep)
            if p and osp.abspath(p) != root]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path),
               PYTHONWARNINGS='ignore')
    return subprocess.run([PY] + args, cwd=str(cwd), env=env, text=True,
                          capture_output=True, timeout=timeout)


def run_code(code, cwd):
    return run(['-c', textwrap.dedent(code)], cwd)


def tool(tools, name, project, *args):
    """One of the tools inside an installed package, run in ``project``."""
    return run([osp.join(tools, name)] + [str(a) for a in args], project)


def train(tools, project, config, *extra, work_dir='work'):
    out = tool(tools, 'train.py', project, config, '--work-dir', work_dir,
               *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def evil_copy(checkpoint, folder):
    """``checkpoint`` with a pickle payload; returns it and its marker."""
    marker = folder / 'payload_ran'
    state = torch.load(checkpoint)  # conftest's `import mmge` allows it
    state['meta']['note'] = Payload(str(marker))
    evil = folder / 'evil.pth'
    torch.save(state, evil)
    return evil, marker


@pytest.fixture(scope='module')
def detector(tmp_path_factory):
    """A downstream detector trained 2 iterations by mmdet's train.py."""
    project = tmp_path_factory.mktemp('downstream_detector')
    make_shapes_dataset(str(project / 'data'), num_train=8, num_val=4)
    (project / 'my_detector.py').write_text(textwrap.dedent(DETECTOR))
    train(MMDET_TOOLS, project, 'my_detector.py')
    return project


@pytest.fixture(scope='module')
def classifier(tmp_path_factory):
    """A downstream classifier trained 2 iterations by mmpretrain's."""
    project = tmp_path_factory.mktemp('downstream_classifier')
    make_shapes_classification(
        str(project / 'data'), num_train=8, num_val=6, img_size=64)
    (project / 'my_classifier.py').write_text(textwrap.dedent(CLASSIFIER))
    train(MMPRETRAIN_TOOLS, project, 'my_classifier.py')
    return project


# --- the config prefix --------------------------------------------------------


def test_prefix_is_known_before_mmge_is_imported(tmp_path):
    out = run_code(
        """
        import sys
        from mmengine.config.utils import MODULE2PACKAGE
        print(MODULE2PACKAGE.get('mmge'), 'mmge' in sys.modules)
        """, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ['mmge', 'False']


def test_start_up_hook_imports_nothing_heavy(tmp_path):
    out = run_code(
        """
        import sys
        print(sorted(m for m in ('mmengine', 'mmge', 'torch', 'numpy')
                     if m in sys.modules))
        """, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == '[]'


def test_every_config_imports_mmge_itself():
    configs = [
        p for p in glob.glob(
            osp.join(osp.dirname(osp.dirname(__file__)), 'configs', '**',
                     '*.py'), recursive=True)
        if '_base_' not in p
    ]
    assert len(configs) > 50
    for path in configs:
        imports = Config.fromfile(path).get('custom_imports', {})
        assert 'mmge' in imports.get('imports', []), path
        assert imports.get('allow_failed_imports') is False, path


# --- MMDetection ----------------------------------------------------------------


def test_mmdet_train_inherits_and_resumes(detector):
    dumped = Config.fromfile(str(detector / 'work' / 'my_detector.py'))
    assert dumped.model.roi_head.bbox_head.num_classes == 2
    assert dumped.model.backbone.type == 'GEResNet'
    assert (detector / 'work' / 'epoch_1.pth').is_file()
    # in a copy of the work dir: the demo config keeps one checkpoint
    shutil.copytree(detector / 'work', detector / 'work_resumed')
    out = train(MMDET_TOOLS, detector, 'my_detector.py', '--resume',
                '--cfg-options', 'train_cfg.max_epochs=2',
                work_dir='work_resumed')
    assert 'resumed epoch: 1, iter: 2' in out.stdout + out.stderr
    assert (detector / 'work_resumed' / 'epoch_2.pth').is_file()


def test_mmdet_test_scores_the_checkpoint(detector):
    out = tool(MMDET_TOOLS, 'test.py', detector, 'my_detector.py',
               'work/epoch_1.pth', '--work-dir', 'test_work')
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'coco/bbox_mAP_50:' in out.stdout + out.stderr


def test_det_inferencer_and_init_detector_load_the_weights(detector):
    image = sorted(glob.glob(str(detector / 'data' / 'val' / '*.png')))[0]
    out = run_code(
        f"""
        import torch
        from mmdet.apis import DetInferencer, inference_detector, init_detector
        inferencer = DetInferencer(model='my_detector.py',
                                   weights='work/epoch_1.pth', device='cpu')
        result = inferencer({image!r})
        print('inferencer', sorted(result['predictions'][0]))
        model = init_detector('my_detector.py', 'work/epoch_1.pth',
                              device='cpu')
        boxes = inference_detector(model, {image!r}).pred_instances.bboxes
        print('init_detector', boxes.shape[-1])
        saved = torch.load('work/epoch_1.pth')['state_dict']
        for name, net in (('inferencer', inferencer.model), ('init', model)):
            state = net.state_dict()
            assert state.keys() == saved.keys(), name
            assert all(torch.equal(state[k], saved[k]) for k in saved), name
        import mmge
        print('mmge from', mmge.__file__)
        """, detector)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "inferencer ['bboxes', 'labels', 'scores']" in out.stdout
    # the config's custom_imports found the installed mmge, not the checkout
    assert osp.join('site-packages', 'mmge', '__init__.py') in out.stdout
    assert 'init_detector 4' in out.stdout


def test_mmdet_clients_refuse_a_pickle_payload(detector, tmp_path):
    evil, marker = evil_copy(detector / 'work' / 'epoch_1.pth', tmp_path)
    inferencer = run_code(
        f"""
        from mmdet.apis import DetInferencer
        DetInferencer(model='my_detector.py', weights={str(evil)!r},
                      device='cpu')
        """, detector)
    test = tool(MMDET_TOOLS, 'test.py', detector, 'my_detector.py', evil,
                '--work-dir', tmp_path / 'work')
    for out in (inferencer, test):
        assert out.returncode != 0
        assert 'Weights only load failed' in out.stderr, out.stderr[-3000:]
        assert 'posix.system' in out.stderr
    assert not marker.exists(), 'the payload ran'


# --- MMPretrain -----------------------------------------------------------------


def test_mmpretrain_train_test_and_load_from(classifier):
    assert Config.fromfile(str(
        classifier / 'work' /
        'my_classifier.py')).model.backbone.type == 'GEResNet'
    out = tool(MMPRETRAIN_TOOLS, 'test.py', classifier, 'my_classifier.py',
               'work/epoch_1.pth', '--work-dir', 'test_work')
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'accuracy/top1:' in out.stdout + out.stderr
    out = train(MMPRETRAIN_TOOLS, classifier, 'my_classifier.py',
                '--cfg-options', 'load_from=work/epoch_1.pth',
                work_dir='work_load_from')
    assert 'Load checkpoint from work/epoch_1.pth' in out.stdout + out.stderr


def test_mmpretrain_apis_load_and_refuse(classifier, tmp_path):
    image = sorted(glob.glob(str(classifier / 'data' / 'val' / '*' /
                                 '*.png')))[0]
    evil, marker = evil_copy(classifier / 'work' / 'epoch_1.pth', tmp_path)
    out = run_code(
        f"""
        import pickle
        import torch
        from mmpretrain.apis import ImageClassificationInferencer, get_model
        inferencer = ImageClassificationInferencer(
            'my_classifier.py', pretrained='work/epoch_1.pth', device='cpu')
        print('class', inferencer({image!r})[0]['pred_class'])
        model = get_model('my_classifier.py', pretrained='work/epoch_1.pth')
        saved = torch.load('work/epoch_1.pth')['state_dict']
        for name, net in (('inferencer', inferencer.model), ('get', model)):
            state = net.state_dict()
            assert state.keys() == saved.keys(), name
            assert all(torch.equal(state[k], saved[k]) for k in saved), name
        try:
            get_model('my_classifier.py', pretrained={str(evil)!r})
        except pickle.UnpicklingError as e:
            print('refused', 'posix.system' in str(e))
        """, classifier)
    assert out.returncode == 0, out.stderr[-3000:]
    # (the inferencer's progress bar ends without a newline)
    assert re.search(r'class (square|circle|triangle)$', out.stdout,
                     re.M), out.stdout
    assert 'refused True' in out.stdout.splitlines()
    assert not marker.exists(), 'the payload ran'
