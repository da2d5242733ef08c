"""What the training and testing entry points set up before MMEngine's Runner.

One gap of the stack is closed here, so that ``tools/train.py``,
``tools/test.py`` and ``tools/dist_train.sh`` behave the same on a GPU
cluster and on a machine without a GPU:

- Distributed runs without CUDA. MMEngine's ``pytorch``/``slurm`` launchers
  call ``torch.cuda.set_device`` and its Runner wraps the model in DDP with
  ``device_ids=[LOCAL_RANK]``; both fail without a GPU. Here the process
  group is started with gloo from the launcher's environment and DDP gets
  ``device_ids=None``; the Runner then finds the group already initialised.
  With CUDA nothing changes (NCCL, MMEngine's own code path).

Checkpoints stay weights-only; ``import mmge`` allows the few MMEngine objects
they hold (see :mod:`mmge.utils.checkpoint`).
"""
import os
import subprocess
import torch
import torch.distributed as dist
from mmengine.config import Config

from .cli import LAUNCHERS


def _slurm_env() -> None:
    """Fill torch.distributed's variables from Slurm's (as MMEngine does)."""
    os.environ.setdefault('RANK', os.environ['SLURM_PROCID'])
    os.environ.setdefault('WORLD_SIZE', os.environ['SLURM_NTASKS'])
    os.environ.setdefault('LOCAL_RANK', os.environ.get('SLURM_LOCALID', '0'))
    if 'MASTER_ADDR' not in os.environ:
        nodes = os.environ['SLURM_NODELIST']
        os.environ['MASTER_ADDR'] = subprocess.getoutput(
            f'scontrol show hostname {nodes} | head -n1')
    os.environ.setdefault('MASTER_PORT', '29500')


def init_cpu_distributed(launcher: str) -> None:
    """Start a gloo process group for ``launcher`` on a machine without CUDA.

    Args:
        launcher (str): ``'pytorch'`` (torchrun's environment) or
            ``'slurm'``.
    """
    if dist.is_initialized():
        return
    if launcher == 'slurm':
        _slurm_env()
    elif launcher != 'pytorch':
        raise ValueError(f'--launcher {launcher} needs CUDA here; without a '
                         f"GPU use 'pytorch' (torchrun) or 'slurm'")
    missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
               if k not in os.environ]
    if missing:
        raise RuntimeError(
            f'--launcher {launcher}: environment variables {missing} are not '
            f'set; start through tools/dist_train.sh (torchrun) or srun')
    dist.init_process_group(backend='gloo')


def setup_runtime(cfg: Config, launcher: str) -> Config:
    """Prepare ``cfg`` and the process for MMEngine's Runner.

    Args:
        cfg (Config): The experiment config; changed in place.
        launcher (str): One of ``'none'``, ``'pytorch'``, ``'slurm'``,
            ``'mpi'``.

    Returns:
        Config: ``cfg``, with ``launcher`` set.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(
            f'--launcher must be one of {LAUNCHERS}, got {launcher!r}')
    cfg.launcher = launcher
    if launcher != 'none' and not torch.cuda.is_available():
        init_cpu_distributed(launcher)
        env_cfg = dict(cfg.get('env_cfg') or {})
        env_cfg['dist_cfg'] = dict(env_cfg.get('dist_cfg') or {},
                                   backend='gloo')
        cfg.env_cfg = env_cfg
        wrapper = dict(cfg.get('model_wrapper_cfg') or {})
        wrapper.setdefault('type', 'MMDistributedDataParallel')
        wrapper['device_ids'] = None
        wrapper.setdefault('broadcast_buffers', False)
        wrapper.setdefault('find_unused_parameters',
                           cfg.get('find_unused_parameters', False))
        cfg.model_wrapper_cfg = wrapper
    return cfg

