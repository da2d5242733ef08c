"""Turn an MMPretrain classifier checkpoint into detection backbone weights.

    python tools/model_converters/cls_to_det_backbone.py CLS.pth OUT.pth

Keeps the classifier's ``backbone.*`` tensors without the prefix (the layout
mmdet's ResNet, GEResNet and the C4 head GEResLayer load), drops the head and
the training state. The input is loaded weights-only. Then:

    GE_PRETRAINED=OUT.pth tools/dist_train.sh configs/faster_rcnn_ge_theta_e8.py 8
"""
import argparse
import os
import os.path as osp
import pickle
import sys

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='MMPretrain classifier checkpoint -> detection backbone '
        'weights (backbone. prefix removed)')
    parser.add_argument('src', help='classifier checkpoint (.pth)')
    parser.add_argument('dst', help='output file (.pth)')
    return parser.parse_args(argv)


def convert(src: str, dst: str) -> dict:
    """Write ``dst`` from ``src``; returns the backbone state dict."""
    from mmge.utils import refusal_message
    if not osp.isfile(src):
        raise FileNotFoundError(f'checkpoint {src!r} not found')
    try:
        ckpt = torch.load(src, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f'refused to load {src!r}: {refusal_message(e)}')
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f'{src!r} holds no state dict')
    backbone = {
        k[len('backbone.'):]: v
        for k, v in state.items() if k.startswith('backbone.')
    }
    if not backbone:
        raise ValueError(f"{src!r} has no 'backbone.' entries: not an "
                         f'MMPretrain classifier checkpoint')
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    torch.save(dict(state_dict=backbone,
                    meta=dict(converted_from=osp.basename(src))), dst)
    return backbone


def main(argv=None):
    args = parse_args(argv)
    try:
        backbone = convert(args.src, args.dst)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {e}')
    n_ge = sum('.gather_excite.' in k for k in backbone)
    print(f'{args.dst}: {len(backbone)} backbone tensors, {n_ge} of them of '
          f'GE layers')


if __name__ == '__main__':
    main()
