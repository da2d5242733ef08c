"""Smoke run: build the paper's GE-theta (E8) Faster R-CNN and run one forward.

Builds Faster R-CNN with RoIAlign on a Caffe-style ResNet-50 in the C4 setting
(mmdet's ``faster-rcnn_r50-caffe-c4`` model) whose backbone is ``GEResNet``
with GE-theta, extent 8, in every residual block of conv2-conv4 (the conv5
RoI head gets GE with the detection configs), then runs one training
step's forward (losses) and one prediction on a random image, on the CPU.
Randomly initialised: it checks that everything plugs together, not accuracy.

Usage:
    python tools/smoke_demo.py [--size H W]
"""
import argparse
import logging
import time

import torch
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--size', type=int, nargs=2, default=(320, 480), metavar=('H', 'W'),
        help='input image size (default: 320 480)')
    return parser.parse_args()


def main():
    args = parse_args()
    import mmge  # noqa: F401  (registers GEResNet and GatherExcite)
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample

    init_default_scope('mmdet')
    cfg = Config.fromstring(
        "_base_ = 'mmdet::_base_/models/faster-rcnn_r50-caffe-c4.py'", '.py')
    cfg.model.backbone.update(
        type='GEResNet', ge_cfg=dict(variant='theta', extent=8))
    # random initialisation: the ImageNet weights would need a download
    cfg.model.backbone.pop('init_cfg')
    cfg.model.roi_head.shared_head.pop('init_cfg')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    # mmengine logs every parameter's initialiser at INFO level
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    model.init_weights()
    n_ge = sum(type(m).__name__ == 'GatherExcite' for m in model.modules())
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f'built {type(model).__name__} with {type(model.backbone).__name__}'
          f': {n_ge} GatherExcite layers (theta, extent 8), '
          f'{n_params:.2f}M parameters')

    h, w = args.size
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w),
                                         scale_factor=(1., 1.)))
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor([[20., 30., 200., 250.]]),
        labels=torch.tensor([3]))

    model.train()
    start = time.perf_counter()
    data = model.data_preprocessor(
        dict(inputs=[image], data_samples=[sample]), training=True)
    losses = model(**data, mode='loss')
    total = sum(v for k, v in losses.items() if 'loss' in k
                for v in (v if isinstance(v, list) else [v]))
    total.backward()
    print(f'train forward+backward on {h}x{w}: loss {total.item():.3f} '
          f'({time.perf_counter() - start:.1f}s)')

    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        data = model.data_preprocessor(
            dict(inputs=[image], data_samples=[sample]), training=False)
        result = model(**data, mode='predict')[0]
    print(f'predict on {h}x{w}: {len(result.pred_instances)} boxes '
          f'({time.perf_counter() - start:.1f}s)')
    print('smoke run OK')


if __name__ == '__main__':
    main()
