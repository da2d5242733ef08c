"""Unit tests: weights-only allowlist for MMEngine checkpoints, COCO scoring."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer

from mmge.evaluation import CocoEvalError, evaluate_coco, format_table
from mmge.utils import allow_mmengine_checkpoints, refusal_message


class _Getattr:
    """Pickles as ``builtins.getattr(obj, name)``."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def __reduce__(self):
        return (getattr, (self.obj, self.name))


def test_history_buffer_and_numpy_load_weights_only(tmp_path):
    allow_mmengine_checkpoints()
    buf = HistoryBuffer()
    for v in (1.0, 3.0):
        buf.update(v)
    path = tmp_path / 'ok.pth'
    torch.save(dict(buf=buf, arr=np.arange(3.), scalar=np.float64(2.5),
                    w=torch.ones(2)), path)
    ck = torch.load(path)  # weights_only=True is torch's default
    assert ck['buf'].mean() == 2.0 and ck['buf'].current() == 3.0
    np.testing.assert_array_equal(ck['arr'], np.arange(3.))
    assert ck['scalar'] == 2.5


@pytest.mark.parametrize('obj,name', ((HistoryBuffer, '__init__'),
                                      (HistoryBuffer, '__class__'),
                                      (np, 'load')))
def test_getattr_is_limited_to_history_buffer_statistics(tmp_path, obj,
                                                         name):
    allow_mmengine_checkpoints()
    path = tmp_path / 'bad.pth'
    if obj is np:
        # a module cannot be pickled; write the opcodes by hand
        payload = (b'\x80\x02cbuiltins\ngetattr\ncnumpy\nndarray\n'
                   b'X\x04\x00\x00\x00loadq\x00\x86R.')
        path.write_bytes(payload)
    else:
        torch.save({'x': _Getattr(obj, name)}, path)
    with pytest.raises(pickle.UnpicklingError) as err:
        torch.load(path)
    assert 'refused to unpickle getattr(' in str(err.value)
    assert repr(name) in str(err.value)


def test_payload_refused_and_named(tmp_path):
    allow_mmengine_checkpoints()
    marker = tmp_path / 'ran'

    class Payload:

        def __reduce__(self):
            return (os.system, (f'touch {marker}', ))

    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': Payload()}, path)
    with pytest.raises(pickle.UnpicklingError) as err:
        torch.load(path)
    assert not marker.exists()
    msg = refusal_message(err.value)
    assert "'posix.system'" in msg and 'nothing in it ran' in msg


# --- COCO scoring -------------------------------------------------------------


@pytest.fixture
def coco_gt(tmp_path):
    gt = dict(
        images=[dict(id=1, width=100, height=100, file_name='a.png'),
                dict(id=2, width=100, height=100, file_name='b.png')],
        annotations=[
            dict(id=1, image_id=1, category_id=1, bbox=[10, 10, 40, 40],
                 area=1600, iscrowd=0),
            dict(id=2, image_id=2, category_id=2, bbox=[50, 50, 30, 30],
                 area=900, iscrowd=0),
        ],
        categories=[dict(id=1, name='cat'), dict(id=2, name='dog')])
    path = tmp_path / 'gt.json'
    path.write_text(json.dumps(gt))
    return str(path)


def _results(tmp_path, dets):
    path = tmp_path / 'res.json'
    path.write_text(json.dumps(dets))
    return str(path)


def test_perfect_detections_score_one(tmp_path, coco_gt):
    res = _results(tmp_path, [
        dict(image_id=1, category_id=1, bbox=[10, 10, 40, 40], score=0.9),
        dict(image_id=2, category_id=2, bbox=[50, 50, 30, 30], score=0.8),
    ])
    m = evaluate_coco(res, coco_gt, per_class=True)
    assert m['bbox_mAP'] == pytest.approx(1.0)
    assert m['bbox_mAP_50'] == pytest.approx(1.0)
    assert m['per_class'] == {'cat': dict(AP=pytest.approx(1.0),
                                          AP50=pytest.approx(1.0)),
                              'dog': dict(AP=pytest.approx(1.0),
                                          AP50=pytest.approx(1.0))}
    assert 'cat' in format_table(m)


def test_half_found_and_a_miss(tmp_path, coco_gt):
    # the cat is found, the dog box is wrong (IoU 0): AP = 0.5 over classes
    res = _results(tmp_path, [
        dict(image_id=1, category_id=1, bbox=[10, 10, 40, 40], score=0.9),
        dict(image_id=2, category_id=2, bbox=[0, 0, 20, 20], score=0.8),
    ])
    m = evaluate_coco(res, coco_gt, per_class=True)
    assert m['bbox_mAP_50'] == pytest.approx(0.5)
    assert m['per_class']['dog']['AP50'] == pytest.approx(0.0)


def test_no_detections_scores_zero(tmp_path, coco_gt):
    m = evaluate_coco(_results(tmp_path, []), coco_gt)
    assert m['bbox_mAP'] == 0.0 and len(m) == 12


@pytest.mark.parametrize('dets,match', (
    ([dict(image_id=9, category_id=1, bbox=[0, 0, 1, 1], score=1.)],
     'images not in'),
    ([dict(image_id=1, category_id=7, bbox=[0, 0, 1, 1], score=1.)],
     'categories not in'),
    ([dict(image_id=1, bbox=[0, 0, 1, 1])], 'entry 0 is not a COCO bbox'),
    ({'not': 'a list'}, 'must hold a list'),
))
def test_bad_results_named(tmp_path, coco_gt, dets, match):
    with pytest.raises(CocoEvalError, match=match):
        evaluate_coco(_results(tmp_path, dets), coco_gt)


def test_missing_and_broken_files_named(tmp_path, coco_gt):
    with pytest.raises(CocoEvalError, match='results file .*nope.json'):
        evaluate_coco(str(tmp_path / 'nope.json'), coco_gt)
    broken = tmp_path / 'broken.json'
    broken.write_text('{')
    with pytest.raises(CocoEvalError, match='broken.json.*not valid json'):
        evaluate_coco(_results(tmp_path, []), str(broken))
