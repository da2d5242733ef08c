"""Batch norm by hand, for GE's native CPU path.

GE's native kernels (:mod:`.cpu_kernels`) make the output of the batch norm
that feeds GE, and the batch norms inside GE-theta's gather, themselves. These
helpers do what ``_BatchNorm.forward`` does around that: the batch
statistics, the running statistics and ``num_batches_tracked``, and the
backward.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...ops import cpu_kernels


def is_plain_batch_norm(norm: Optional[nn.Module]) -> bool:
    """Whether ``norm`` is a batch norm that runs ``_BatchNorm.forward``
    (``nn.BatchNorm2d``, mmcv's ``'BN'``), whose forward
    :func:`batch_norm_forward` reproduces; SyncBN and others are not.

    Args:
        norm (nn.Module | None): The module.

    Returns:
        bool: True for such a batch norm.
    """
    return isinstance(norm, _BatchNorm) and \
        type(norm).forward is _BatchNorm.forward


def batch_norm_forward(norm: _BatchNorm,
                       inp: torch.Tensor,
                       affine: bool = True
                       ) -> Tuple[torch.Tensor, Dict[str, object]]:
    """``norm(inp)``, with what its backward and an on-the-fly recompute need.

    Does what ``_BatchNorm.forward`` does (running statistics and
    ``num_batches_tracked`` are updated the same way), through
    ``torch.native_batch_norm``, which also returns the batch statistics.

    Args:
        norm (_BatchNorm): A module :func:`is_plain_batch_norm` accepts.
        inp (Tensor): Its input.
        affine (bool): Also give ``scale`` and ``shift`` when the batch's
            statistics are used (a few small operations; the native kernels
            read them, :func:`batch_norm_again` and
            :func:`batch_norm_backward` do not). Defaults to True.

    Returns:
        tuple[Tensor, dict]: ``norm(inp)`` and the saved state: ``scale``
        and ``shift`` (per channel, ``norm(inp) = scale * inp + shift``),
        ``mean``, ``invstd`` (the batch statistics), ``train``.
    """
    momentum = count_batch(norm)
    train = uses_batch_stats(norm)
    track = not norm.training or norm.track_running_stats
    running_mean = norm.running_mean if track else None
    running_var = norm.running_var if track else None
    out, mean, invstd = torch.native_batch_norm(
        inp, norm.weight, norm.bias, running_mean, running_var, train,
        momentum, norm.eps)
    if not train:
        return out, running_stats_state(norm)
    if not affine:
        return out, dict(mean=mean, invstd=invstd, train=True)
    return out, _state(norm, mean, invstd, train)


def count_batch(norm: _BatchNorm) -> float:
    """Count a batch as ``_BatchNorm.forward`` does (``num_batches_tracked``
    in training with running statistics) and give the factor of its
    running-statistics update.

    Args:
        norm (_BatchNorm): A module :func:`is_plain_batch_norm` accepts.

    Returns:
        float: ``momentum``, or ``1 / num_batches_tracked`` for a cumulative
        average (``momentum=None``); 0.0 where nothing is updated.
    """
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and \
            norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            momentum = 1.0 / float(norm.num_batches_tracked)
    return momentum


def norm_with_state(norm: nn.Module, inp: torch.Tensor
                    ) -> Tuple[torch.Tensor, Optional[Dict[str, object]]]:
    """``norm(inp)``, and :func:`batch_norm_forward`'s state (without
    ``scale`` and ``shift``) where that stands in for the call: a plain
    batch norm (:func:`is_plain_batch_norm`) that no forward hook watches.
    Any other norm is called as a module, with None for the state.

    Args:
        norm (nn.Module): The norm layer.
        inp (Tensor): Its input.

    Returns:
        tuple[Tensor, dict | None]: The output, and the state from which
        :func:`batch_norm_again` makes it again.
    """
    if is_plain_batch_norm(norm) and not cpu_kernels.hooked(norm):
        return batch_norm_forward(norm, inp, affine=False)
    return norm(inp), None


def batch_norm_again(norm: _BatchNorm,
                     state: Dict[str, object],
                     inp: torch.Tensor,
                     dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The output of :func:`batch_norm_forward` made again, without
    autograd and without touching the running statistics.

    One eval-mode call of the batch norm's kernel (a single pass, which
    reads a low-precision input with float statistics vectorised): with the
    running statistics where the forward used them, else with the batch's
    mean and the variance its ``invstd`` gives back.

    Args:
        norm (_BatchNorm): The module.
        state (dict): :func:`batch_norm_forward`'s state of that call.
        inp (Tensor): The norm's input.
        dtype (torch.dtype, optional): The output's dtype; defaults to
            ``inp``'s (the forward's).

    Returns:
        Tensor: The norm's output, in ``inp``'s layout.
    """
    with torch.no_grad():
        if state['train']:
            mean = state['mean']
            var = state['invstd'].pow(-2).sub_(norm.eps)
        else:
            mean, var = norm.running_mean, norm.running_var
        out = torch.batch_norm(inp, norm.weight, norm.bias, mean, var, False,
                               0.0, norm.eps, False)
    return out if dtype is None else out.to(dtype)


def _state(norm: _BatchNorm, mean: torch.Tensor, invstd: torch.Tensor,
           train: bool) -> Dict[str, object]:
    scale = invstd if norm.weight is None else invstd * norm.weight.detach()
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach()
    return dict(scale=scale, shift=shift, mean=mean, invstd=invstd,
                train=train)


def running_stats_state(norm: _BatchNorm) -> Dict[str, object]:
    """:func:`batch_norm_forward`'s state for a batch norm that normalises
    with its running statistics, without running it.

    Args:
        norm (_BatchNorm): A module :func:`is_plain_batch_norm` accepts,
            for which :func:`uses_batch_stats` is False.

    Returns:
        dict: ``scale``, ``shift``, ``mean``, ``invstd`` (detached) and
        ``train`` (False).
    """
    mean = norm.running_mean.detach()
    tensors = (norm.running_mean, norm.running_var, norm.weight, norm.bias)
    if norm.running_mean.dim() == 1 and cpu_kernels.usable(*tensors):
        # one kernel call instead of half a dozen small ATen ops
        invstd, scale, shift = cpu_kernels.norm_affine(*tensors, norm.eps)
        return dict(scale=scale, shift=shift, mean=mean, invstd=invstd,
                    train=False)
    invstd = (norm.running_var.detach() + norm.eps).rsqrt()
    return _state(norm, mean, invstd, False)


def check_batch_size(size: torch.Size) -> int:
    """Refuse what ``_BatchNorm.forward`` refuses in training: one value per
    channel.

    Args:
        size (torch.Size): The input's size, (N, C, ...).

    Returns:
        int: The values per channel.

    Raises:
        ValueError: With one value per channel (PyTorch's message).
    """
    count = size.numel() // size[1]
    if count < 2:
        raise ValueError(f'Expected more than 1 value per channel when '
                         f'training, got input size {size}')
    return count


def batch_stats_state(norm: _BatchNorm, mean: torch.Tensor,
                      var: torch.Tensor, count: int) -> Dict[str, object]:
    """:func:`batch_norm_forward`'s state for a batch norm whose batch
    statistics were computed elsewhere (GE's kernel), updating the running
    statistics as its forward would.

    Args:
        norm (_BatchNorm): A module :func:`is_plain_batch_norm` accepts,
            for which :func:`uses_batch_stats` is True.
        mean (Tensor): The batch mean per channel.
        var (Tensor): The biased batch variance per channel.
        count (int): Values per channel in the batch
            (:func:`check_batch_size`).

    Returns:
        dict: ``scale``, ``shift``, ``mean``, ``invstd`` and ``train``
        (True).
    """
    update_running_stats(norm, mean, var, count)
    return _state(norm, mean, (var + norm.eps).rsqrt(), True)


def batch_norm_backward(norm: _BatchNorm, state: Dict[str, object],
                        grad: torch.Tensor, inp: torch.Tensor,
                        mask: List[bool]) -> Tuple[Optional[torch.Tensor],
                                                   ...]:
    """Backward of :func:`batch_norm_forward`.

    Args:
        norm (_BatchNorm): The module.
        state (dict): What :func:`batch_norm_forward` returned.
        grad (Tensor): Gradient of its output.
        inp (Tensor): Its input.
        mask (list[bool]): Which of (input, weight, bias) need a gradient.

    Returns:
        tuple: Gradients of the input, the weight and the bias (None where
        not asked for).
    """
    grads = torch.ops.aten.native_batch_norm_backward(
        grad, inp, norm.weight, norm.running_mean, norm.running_var,
        state['mean'], state['invstd'], state['train'], norm.eps, mask)
    return tuple(g if m else None for g, m in zip(grads, mask))


def uses_batch_stats(norm: _BatchNorm) -> bool:
    """Whether ``norm`` normalises with the batch's statistics.

    Args:
        norm (_BatchNorm): A module :func:`is_plain_batch_norm` accepts.

    Returns:
        bool: True in training, and in eval mode without running
        statistics (as ``_BatchNorm.forward`` decides).
    """
    return norm.training or (norm.running_mean is None
                             and norm.running_var is None)


def update_running_stats(norm: _BatchNorm, mean: torch.Tensor,
                         var: torch.Tensor, count: int) -> None:
    """Update ``norm``'s running statistics with a batch's, as
    ``_BatchNorm.forward`` would have.

    Nothing happens unless ``norm`` is training and tracks running
    statistics. ``num_batches_tracked`` is incremented; the momentum is
    ``norm.momentum``, or the cumulative ``1 / num_batches_tracked`` when it
    is None; the running variance takes the unbiased batch variance.

    Args:
        norm (_BatchNorm): A module :func:`is_plain_batch_norm` accepts.
        mean (Tensor): The batch mean per channel.
        var (Tensor): The biased batch variance per channel.
        count (int): Values per channel in the batch (> 1).
    """
    if not (norm.training and norm.track_running_stats):
        return
    momentum = count_batch(norm)
    if norm.running_mean is not None:
        norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), momentum)
    if norm.running_var is not None:
        norm.running_var.lerp_(
            (var * (count / (count - 1))).to(norm.running_var.dtype),
            momentum)
