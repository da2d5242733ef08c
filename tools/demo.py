"""The detection demo: data, training, COCO evaluation and pictures, on a CPU.

    python tools/demo.py [--work-dir work_dirs/demo] [--data-root data/shapes]
        [--epochs 12] [--num-train 400] [--num-val 100] [--seed 0]

1. Generates (from --seed) a small COCO-format dataset of squares, circles
   and triangles (mmge.datasets.make_shapes_dataset).
2. Trains configs/demo/faster_rcnn_ge_theta_e8_shapes.py (a GE-theta E8
   Faster R-CNN sized for a CPU) with tools/train.py; MMEngine's logger shows
   progress and the ETA.
3. Evaluates the held-out split with tools/test.py (mmdet's CocoMetric) and
   scores the dumped COCO results json again with tools/coco_eval.py.
4. Draws the predictions on a few held-out images.

The work dir then holds the checkpoint, the log, metrics.json,
results.bbox.json and predictions.png.
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, 'configs', 'demo', 'faster_rcnn_ge_theta_e8_shapes.py')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Detection demo: generated shapes, GE-theta (E8) '
        'Faster R-CNN, COCO mAP, pictures')
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--data-root', default='data/shapes')
    parser.add_argument('--epochs', type=int, default=12)
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=100)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--log-interval', type=int, default=10,
        help='log every N iterations (default 10)')
    parser.add_argument(
        '--num-pictures', type=int, default=4,
        help='held-out images to draw predictions on (default 4)')
    args = parser.parse_args(argv)
    for name in ('epochs', 'num_train', 'num_val', 'log_interval',
                 'num_pictures'):
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
    os.environ['SHAPES_ROOT'] = data_root + '/'
    cfg = Config.fromfile(CONFIG)
    e = args.epochs
    cfg.train_cfg.max_epochs = e
    cfg.train_cfg.val_interval = e
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

    from mmge.utils import allow_mmengine_checkpoints
    allow_mmengine_checkpoints()
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
    sys.path.insert(0, ROOT)
    from mmge.datasets import make_shapes_dataset

    work_dir = osp.abspath(args.work_dir)
    data_root = osp.abspath(args.data_root)
    os.makedirs(work_dir, exist_ok=True)
    print(f'=== data: {args.num_train} train / {args.num_val} held-out images '
          f'in {data_root} (seed {args.seed})', flush=True)
    anns = make_shapes_dataset(data_root, num_train=args.num_train,
                               num_val=args.num_val, seed=args.seed)
    config = write_config(args, work_dir, data_root)

    py = sys.executable
    run('train', [py, 'tools/train.py', config, '--work-dir', work_dir])
    checkpoint = osp.join(work_dir, f'epoch_{args.epochs}.pth')
    results = osp.join(work_dir, 'results')
    run('test', [
        py, 'tools/test.py', config, checkpoint, '--work-dir', work_dir,
        '--json-prefix', results
    ])
    metrics_file = osp.join(work_dir, 'metrics.json')
    run('score', [
        py, 'tools/coco_eval.py', results + '.bbox.json', anns['val'],
        '--per-class', '--out', metrics_file
    ])
    picture = osp.join(work_dir, 'predictions.png')
    draw_predictions(config, checkpoint, anns['val'],
                     osp.join(data_root, 'val'), picture, args.num_pictures)

    with open(metrics_file) as f:
        metrics = json.load(f)
    # this run's logs: training's first, then testing's
    logs = sorted(p for p in glob.glob(osp.join(work_dir, '*', '*.log'))
                  if osp.getmtime(p) >= start)
    ap50 = metrics['bbox_mAP_50']
    print(f'\n=== done in {time.time() - start:.0f}s: bbox mAP '
          f'{metrics["bbox_mAP"]:.3f}, mAP@0.5 {ap50:.3f} '
          f'(goal >= 0.5: {"met" if ap50 >= 0.5 else "NOT met"})')
    print(f'checkpoint  {checkpoint}\nlog         {logs[0] if logs else "-"}'
          f'\nmetrics     {metrics_file}\nresults     {results}.bbox.json'
          f'\npredictions {picture}')


if __name__ == '__main__':
    main()
