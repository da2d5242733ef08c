"""Score COCO-format detections against COCO annotations with pycocotools."""
import contextlib
import io
import json
import os.path as osp
from typing import Dict

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# COCOeval.stats, in order: the 12 standard bbox numbers
STAT_NAMES = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s',
              'bbox_mAP_m', 'bbox_mAP_l', 'bbox_AR_1', 'bbox_AR_10',
              'bbox_AR_100', 'bbox_AR_s', 'bbox_AR_m', 'bbox_AR_l')
STAT_LABELS = (
    'AP    @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]',
    'AP    @[ IoU=0.50      | area=   all | maxDets=100 ]',
    'AP    @[ IoU=0.75      | area=   all | maxDets=100 ]',
    'AP    @[ IoU=0.50:0.95 | area= small | maxDets=100 ]',
    'AP    @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]',
    'AP    @[ IoU=0.50:0.95 | area= large | maxDets=100 ]',
    'AR    @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]',
    'AR    @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]',
    'AR    @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]',
    'AR    @[ IoU=0.50:0.95 | area= small | maxDets=100 ]',
    'AR    @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]',
    'AR    @[ IoU=0.50:0.95 | area= large | maxDets=100 ]',
)


class CocoEvalError(ValueError):
    """Bad input to :func:`evaluate_coco`: names the file and the problem."""


def _load_json(path: str, what: str):
    if not osp.isfile(path):
        raise CocoEvalError(f'{what} {path!r} not found')
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CocoEvalError(f'{what} {path!r} is not valid json: {e}')


def evaluate_coco(results_file: str,
                  ann_file: str,
                  per_class: bool = False) -> Dict:
    """COCO bbox metrics of a results json.

    Args:
        results_file (str): Detections, a COCO results json: a list of
            ``{image_id, category_id, bbox: [x, y, w, h], score}``.
        ann_file (str): COCO annotation json of the same images.
        per_class (bool): Also compute AP and AP50 per category.

    Returns:
        dict: The 12 numbers under :data:`STAT_NAMES`, and with
        ``per_class`` a ``'per_class'`` dict ``{name: {'AP', 'AP50'}}``
        (-1 where a class has no ground truth).

    Raises:
        CocoEvalError: For a missing or malformed file, or detections of
            images or categories the annotations do not have.
    """
    gt_json = _load_json(ann_file, 'annotation file')
    dets = _load_json(results_file, 'results file')
    if not isinstance(gt_json, dict) or 'images' not in gt_json:
        raise CocoEvalError(f'annotation file {ann_file!r} is not COCO '
                            f"format (no 'images')")
    if not isinstance(dets, list):
        raise CocoEvalError(f'results file {results_file!r} must hold a list '
                            f'of detections, got {type(dets).__name__}')
    for i, d in enumerate(dets):
        if not isinstance(d, dict) or not {'image_id', 'category_id', 'bbox',
                                           'score'} <= set(d):
            raise CocoEvalError(
                f'results file {results_file!r}: entry {i} is not a COCO bbox '
                f'result (image_id, category_id, bbox, score): {d!r}')
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_json
        gt.createIndex()
    unknown_imgs = {d['image_id'] for d in dets} - set(gt.getImgIds())
    if unknown_imgs:
        raise CocoEvalError(
            f'results file {results_file!r} has detections of images not in '
            f'{ann_file!r}: ids {sorted(unknown_imgs)[:5]}')
    unknown_cats = {d['category_id'] for d in dets} - set(gt.getCatIds())
    if unknown_cats:
        raise CocoEvalError(
            f'results file {results_file!r} has categories not in '
            f'{ann_file!r}: ids {sorted(unknown_cats)[:5]}')
    if not dets:
        metrics = {k: 0.0 for k in STAT_NAMES}
        if per_class:
            metrics['per_class'] = {
                c['name']: dict(AP=0.0, AP50=0.0)
                for c in gt.cats.values()
            }
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(dets)
        coco_eval = COCOeval(gt, dt, 'bbox')
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    metrics = {k: float(v) for k, v in zip(STAT_NAMES, coco_eval.stats)}
    if per_class:
        # precision: [IoU thresholds, recall, category, area, maxDets]
        precision = coco_eval.eval['precision']
        metrics['per_class'] = {}
        for k, cat_id in enumerate(coco_eval.params.catIds):
            name = gt.cats[int(cat_id)]['name']
            p = precision[:, :, k, 0, -1]
            p50 = precision[0, :, k, 0, -1]
            metrics['per_class'][name] = dict(
                AP=float(np.mean(p[p > -1])) if (p > -1).any() else -1.0,
                AP50=float(np.mean(p50[p50 > -1]))
                if (p50 > -1).any() else -1.0)
    return metrics


def format_table(metrics: Dict) -> str:
    """The metrics as the familiar COCO summary, plus the per-class table."""
    lines = [
        f' Average {"Precision" if label.startswith("AP") else "Recall   "}'
        f' {label[6:]} = {metrics[name]:.3f}'
        for name, label in zip(STAT_NAMES, STAT_LABELS)
    ]
    per_class = metrics.get('per_class')
    if per_class:
        width = max(len(n) for n in per_class)
        lines += ['', f'{"class":<{width}}  {"AP":>6}  {"AP50":>6}']
        lines += [f'{n:<{width}}  {v["AP"]:6.3f}  {v["AP50"]:6.3f}'
                  for n, v in per_class.items()]
    return '\n'.join(lines)
