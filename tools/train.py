"""Train a detector or classifier with MMEngine's Runner (mmdet's flags).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
        [--auto-scale-lr] [--cfg-options k=v ...] [--launcher LAUNCHER]

Distributed: tools/dist_train.sh (torchrun) or tools/slurm_train.sh. On a
machine without a GPU the same commands run on the CPU with gloo.
"""
import argparse
import os.path as osp

# importing mmge registers its models and the mmge:: config prefix
from mmge.engine.cli import add_common_args, load_config, run, set_local_rank


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Train a model with MMEngine (mmge)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument(
        '--amp', action='store_true',
        help='automatic mixed precision (fp16 on GPU, bf16 on CPU)')
    parser.add_argument(
        '--auto-scale-lr', action='store_true',
        help='scale the lr by the total batch size (auto_scale_lr)')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from CKPT, or from the latest checkpoint in the work '
        'dir when no path is given')
    add_common_args(parser)
    args = parser.parse_args(argv)
    set_local_rank(args)
    return args


def build_config(args):
    """The config with the command line applied; checks data and paths."""
    from mmge.engine import check_data_paths
    cfg = load_config(args)
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise ValueError('--auto-scale-lr: the config has no '
                             'auto_scale_lr.base_batch_size')
        cfg.auto_scale_lr.enable = True
    if args.resume is not None:
        cfg.resume = True
        cfg.load_from = None if args.resume == 'auto' else args.resume
        if cfg.load_from is not None and not osp.isfile(cfg.load_from):
            raise FileNotFoundError(
                f'--resume: checkpoint {cfg.load_from!r} not found')
    check_data_paths(cfg, ('train_dataloader', 'val_dataloader'))
    return cfg


def main(argv=None):
    args = parse_args(argv)
    run(lambda: build_config(args), args.launcher, 'train')


if __name__ == '__main__':
    main()
