"""The demos: data, training, evaluation (and pictures), on a CPU.

    python tools/demo.py [--task detection|classification]
        [--work-dir DIR] [--data-root DIR] [--epochs N] [--num-train N]
        [--num-val N] [--seed 0]

Detection (the default, the README's main job):

1. Generates (from --seed) a small COCO-format dataset of squares, circles
   and triangles (mmge.datasets.make_shapes_dataset).
2. Trains configs/demo/faster_rcnn_ge_theta_e8_shapes.py (a GE-theta E8
   Faster R-CNN sized for a CPU) with tools/train.py; MMEngine's logger shows
   progress and the ETA.
3. Evaluates the held-out split with tools/test.py (mmdet's CocoMetric) and
   scores the dumped COCO results json again with tools/coco_eval.py.
4. Draws the predictions on a few held-out images.

The work dir then holds the checkpoint, the log, metrics.json,
results.bbox.json and predictions.png. The last line printed runs mmdet's
DetInferencer on the checkpoint (mmpretrain's ImageClassificationInferencer
for classification).

Classification (--task classification): generates one-shape images
(mmge.datasets.make_shapes_classification), trains
configs/demo/ge_resnet18_shapes_cls.py (a narrow GE-theta global ResNet-18)
with tools/train.py and reports top-1 on the held-out split with
tools/test.py; the work dir holds the checkpoint, the log and metrics.json.
"""
import argparse
import glob
import json
import os
import os.path as osp
import shlex
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TASKS = {
    # task: (config, data root variable, defaults: work dir, data root,
    #        epochs, train images, held-out images)
    'detection': ('faster_rcnn_ge_theta_e8_shapes.py', 'SHAPES_ROOT',
                  ('work_dirs/demo', 'data/shapes', 12, 400, 100)),
    'classification': ('ge_resnet18_shapes_cls.py', 'SHAPES_CLS_ROOT',
                       ('work_dirs/demo_cls', 'data/shapes_cls', 15, 3000,
                        300)),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Demos on generated shapes: GE-theta (E8) Faster R-CNN '
        'with COCO mAP and pictures, or a GE-theta classifier with top-1')
    parser.add_argument(
        '--task', choices=sorted(TASKS), default='detection',
        help='which demo (default: detection)')
    parser.add_argument('--work-dir', help='default: work_dirs/demo, '
                        'work_dirs/demo_cls')
    parser.add_argument('--data-root', help='default: data/shapes, '
                        'data/shapes_cls')
    parser.add_argument('--epochs', type=int, help='default: 12, 15')
    parser.add_argument('--num-train', type=int, help='default: 400, 3000')
    parser.add_argument('--num-val', type=int, help='default: 100, 300')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--config', help="train this config instead of the task's demo "
        'config (one of configs/demo/ for the same task and data, e.g. '
        'configs/demo/resnet18_shapes_cls.py, the baseline classifier)')
    parser.add_argument(
        '--val-interval', type=int,
        help='validate every N epochs (default: once, after the last); '
        '1 gives the per-epoch val curve of '
        'tools/analysis/convergence_curves.py')
    parser.add_argument(
        '--log-interval', type=int, default=10,
        help='log every N iterations (default 10)')
    parser.add_argument(
        '--num-pictures', type=int, default=4,
        help='held-out images to draw predictions on (default 4)')
    args = parser.parse_args(argv)
    defaults = TASKS[args.task][2]
    for name, value in zip(
        ('work_dir', 'data_root', 'epochs', 'num_train', 'num_val'),
            defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.val_interval is None:
        args.val_interval = args.epochs
    if args.config is not None and not osp.isfile(args.config):
        parser.error(f'--config {args.config!r} does not exist')
    for name in ('epochs', 'num_train', 'num_val', 'log_interval',
                 'num_pictures', 'val_interval'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1')
    return args


def run(step: str, cmd: list) -> None:
    print(f'\n=== {step}: {" ".join(cmd[1:])}', flush=True)
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f'error: {step} failed (exit {result.returncode})')


def write_config(args, work_dir: str, data_root: str) -> str:
    from mmengine.config import Config
    config, root_var, _ = TASKS[args.task]
    os.environ[root_var] = data_root + '/'
    cfg = Config.fromfile(args.config or
                          osp.join(ROOT, 'configs', 'demo', config))
    e = args.epochs
    cfg.train_cfg.max_epochs = e
    cfg.train_cfg.val_interval = args.val_interval
    cfg.default_hooks.checkpoint.interval = e
    cfg.default_hooks.logger.interval = args.log_interval
    cfg.param_scheduler[-1].end = e
    cfg.randomness = dict(seed=args.seed)
    path = osp.join(work_dir, 'demo_config.py')
    cfg.dump(path)
    return path


def draw_predictions(config: str, checkpoint: str, ann_file: str,
                     img_dir: str, out_file: str, num: int) -> None:
    import mmcv
    import numpy as np
    from mmdet.apis import inference_detector, init_detector
    from mmdet.visualization import DetLocalVisualizer

    model = init_detector(config, checkpoint, device='cpu')
    with open(ann_file) as f:
        images = json.load(f)['images'][:num]
    vis = DetLocalVisualizer()
    vis.dataset_meta = model.dataset_meta
    tiles = []
    for info in images:
        img = mmcv.imread(osp.join(img_dir, info['file_name']),
                          channel_order='rgb')
        result = inference_detector(model, img)
        # drawn twice as large, so that labels stay readable
        vis.add_datasample(
            info['file_name'], mmcv.imrescale(img, 2.0), _rescaled(result, 2.0),
            draw_gt=False, pred_score_thr=0.5, show=False)
        tiles.append(vis.get_image())
    mmcv.imwrite(mmcv.rgb2bgr(np.concatenate(tiles, axis=1)), out_file)


def _rescaled(result, factor: float):
    """The prediction drawn on an image enlarged by ``factor``."""
    result = result.clone()
    result.pred_instances.bboxes = result.pred_instances.bboxes * factor
    return result


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    from mmge.datasets import make_shapes_classification, make_shapes_dataset

    work_dir = osp.abspath(args.work_dir)
    data_root = osp.abspath(args.data_root)
    os.makedirs(work_dir, exist_ok=True)
    print(f'=== data: {args.num_train} train / {args.num_val} held-out images '
          f'in {data_root} (seed {args.seed})', flush=True)
    make = (make_shapes_dataset
            if args.task == 'detection' else make_shapes_classification)
    data = make(data_root, num_train=args.num_train, num_val=args.num_val,
                seed=args.seed)
    config = write_config(args, work_dir, data_root)

    py = sys.executable
    run('train', [py, 'tools/train.py', config, '--work-dir', work_dir])
    checkpoint = osp.join(work_dir, f'epoch_{args.epochs}.pth')
    metrics_file = osp.join(work_dir, 'metrics.json')
    if args.task == 'detection':
        summary = detection_eval(args, config, checkpoint, work_dir, data,
                                 data_root, metrics_file)
    else:
        summary = classification_eval(config, checkpoint, work_dir,
                                      metrics_file, start)
    # this run's logs: training's first, then testing's
    logs = sorted(p for p in glob.glob(osp.join(work_dir, '*', '*.log'))
                  if osp.getmtime(p) >= start)
    print(f'\n=== done in {time.time() - start:.0f}s: {summary}')
    print(f'checkpoint  {checkpoint}\nlog         {logs[0] if logs else "-"}'
          f'\nmetrics     {metrics_file}')
    line = inference_line(args.task, config, checkpoint, data_root, work_dir)
    print(f'inference   {line}')


def inference_line(task: str, config: str, checkpoint: str, data_root: str,
                   work_dir: str) -> str:
    """The shell line that runs OpenMMLab's inferencer on the checkpoint."""
    val = osp.join(data_root, 'val')
    image = next(osp.join(d, f) for d, _, files in sorted(os.walk(val))
                 for f in sorted(files) if f.endswith('.png'))
    q = json.dumps  # double-quoted strings: the shell line quotes in single
    if task == 'detection':
        code = ('from mmdet.apis import DetInferencer; '
                f'DetInferencer(model={q(config)}, weights={q(checkpoint)}, '
                f'device="cpu")({q(image)}, '
                f'out_dir={q(osp.join(work_dir, "inference"))})')
    else:
        code = ('from mmpretrain.apis import ImageClassificationInferencer; '
                f'print(ImageClassificationInferencer({q(config)}, '
                f'pretrained={q(checkpoint)}, device="cpu")'
                f'({q(image)})[0]["pred_class"])')
    return f'{shlex.quote(sys.executable)} -c {shlex.quote(code)}'


def detection_eval(args, config, checkpoint, work_dir, anns, data_root,
                   metrics_file) -> str:
    """tools/test.py with a results json, tools/coco_eval.py, pictures."""
    py = sys.executable
    results = osp.join(work_dir, 'results')
    run('test', [
        py, 'tools/test.py', config, checkpoint, '--work-dir', work_dir,
        '--json-prefix', results
    ])
    run('score', [
        py, 'tools/coco_eval.py', results + '.bbox.json', anns['val'],
        '--per-class', '--out', metrics_file
    ])
    picture = osp.join(work_dir, 'predictions.png')
    draw_predictions(config, checkpoint, anns['val'],
                     osp.join(data_root, 'val'), picture, args.num_pictures)
    with open(metrics_file) as f:
        metrics = json.load(f)
    ap50 = metrics['bbox_mAP_50']
    print(f'results     {results}.bbox.json\npredictions {picture}')
    return (f'bbox mAP {metrics["bbox_mAP"]:.3f}, mAP@0.5 {ap50:.3f} '
            f'(goal >= 0.5: {"met" if ap50 >= 0.5 else "NOT met"})')


def classification_eval(config, checkpoint, work_dir, metrics_file,
                        start) -> str:
    """tools/test.py; its metrics (MMEngine's test log json) -> metrics."""
    run('test', [
        sys.executable, 'tools/test.py', config, checkpoint, '--work-dir',
        work_dir
    ])
    logs = sorted(p for p in glob.glob(osp.join(work_dir, '*', '*.json'))
                  if osp.getmtime(p) >= start)
    with open(logs[-1]) as f:  # the test run's: one line of metrics
        metrics = json.loads(f.read().splitlines()[-1])
    with open(metrics_file, 'w') as f:
        json.dump(metrics, f, indent=2)
    return f'top-1 {metrics["accuracy/top1"]:.2f}% on the held-out images'


if __name__ == '__main__':
    main()
