"""What tools/train.py and tools/test.py share: arguments, config, runner."""
import argparse
import os
import os.path as osp
import pickle
import sys
from typing import Callable

from mmengine.config import Config, DictAction

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--work-dir``, ``--cfg-options``, ``--launcher``, ``--local-rank``."""
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (nested keys with dots)')
    parser.add_argument(
        '--launcher', choices=LAUNCHERS, default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def set_local_rank(args: argparse.Namespace) -> None:
    """Export ``--local-rank`` for launchers that pass it as an argument."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))


def load_config(args: argparse.Namespace) -> Config:
    """Read ``args.config``, apply ``--cfg-options`` and ``--work-dir``.

    Raises:
        FileNotFoundError: If the config file does not exist.
    """
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
    return cfg


def run(prepare: Callable[[], Config], launcher: str, action: str):
    """Build MMEngine's Runner from ``prepare()`` and run ``action``.

    Errors of the user's input (config, paths, ``--cfg-options`` that the
    model rejects, checkpoints that weights-only loading refuses) end the
    program with one line; anything else raises as usual.

    Args:
        prepare (callable): Returns the finished config; may raise.
        launcher (str): The ``--launcher`` value.
        action (str): ``'train'`` or ``'test'``.

    Returns:
        The runner's return value (metrics for ``'test'``).
    """
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from ..utils import refusal_message
    from .checks import DataPathError
    from .launch import setup_runtime
    try:
        cfg = prepare()
        setup_runtime(cfg, launcher)
        # builds the model: options it rejects show up here
        runner = (Runner.from_cfg(cfg) if 'runner_type' not in cfg else
                  RUNNERS.build(cfg))
    except (DataPathError, FileNotFoundError, ValueError, KeyError,
            TypeError) as e:
        sys.exit(f'error: {e}')
    try:
        result = getattr(runner, action)()
    except pickle.UnpicklingError as e:
        sys.exit(f'error: refused to load checkpoint '
                 f'{cfg.get("load_from")!r}: {refusal_message(e)}')
    # MMEngine leaves the process group up; gloo torn down at interpreter
    # exit can abort ("terminate called without an active exception"), so
    # end it here, once every rank is done
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result
