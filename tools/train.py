"""Train a detector or classifier with MMEngine's Runner (mmdet's flags).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
        [--auto-scale-lr] [--cfg-options k=v ...] [--launcher LAUNCHER]

Distributed: tools/dist_train.sh (torchrun) or tools/slurm_train.sh. On a
machine without a GPU the same commands run on the CPU with gloo.
"""
import argparse
import os
import os.path as osp
import pickle
import sys

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Train a model with MMEngine (mmge)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
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
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (nested keys with dots)')
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_config(args) -> Config:
    """Read the config and apply the command line to it."""
    if not osp.isfile(args.config):
        raise FileNotFoundError(f'config file {args.config!r} not found')
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in \
                cfg.auto_scale_lr:
            raise ValueError('--auto-scale-lr: the config has no '
                             'auto_scale_lr.base_batch_size')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def main(argv=None):
    args = parse_args(argv)
    # imported here so that --help is quick; importing mmge registers its
    # models and the mmge:: config prefix
    from mmge.engine import DataPathError, check_data_paths, setup_runtime

    try:
        cfg = build_config(args)
        check_data_paths(cfg, ('train_dataloader', 'val_dataloader'))
        if args.resume not in (None, 'auto') and not osp.isfile(args.resume):
            raise FileNotFoundError(
                f'--resume: checkpoint {args.resume!r} not found')
        setup_runtime(cfg, args.launcher)
        # builds the model: bad --cfg-options show up here, as mmengine's
        # error in one line rather than a traceback
        runner = (Runner.from_cfg(cfg) if 'runner_type' not in cfg else
                  RUNNERS.build(cfg))
    except (DataPathError, FileNotFoundError, ValueError, KeyError,
            TypeError) as e:
        sys.exit(f'error: {e}')
    try:
        runner.train()
    except pickle.UnpicklingError as e:
        from mmge.utils import refusal_message
        sys.exit(f'error: refused to load checkpoint '
                 f'{cfg.get("load_from")!r}: {refusal_message(e)}')


if __name__ == '__main__':
    main()
