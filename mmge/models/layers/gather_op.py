""":class:`~.gather.ConvGather` on the ``mmge::conv_gather`` op (and a
global extent's convolution on ``mmge::global_gather``).

Where a device has kernels of its own for the op (:data:`KERNELS`: CUDA's
Triton kernels; the CPU's C kernel for float32 NCHW maps with autograd on),
GE-theta's local gather runs as that one op instead of its modules: every
level's depthwise convolution, batch norm and ReLU reading the input once.
The op normalises with the batch's statistics and returns them; the running
statistics are updated here, as the batch norms would
(:func:`~.batch_norm.update_running_stats`). Elsewhere (on the CPU other
dtypes, channels-last maps and inference, where the modules run ATen's
kernels and :class:`~.depthwise_conv.GatherConv2d`'s workarounds) and for
modules the op does not compute (another norm, such as SyncBN; another
activation; hooks), the modules run.
"""
from typing import List, NamedTuple, Optional

import torch
import torch.nn as nn

from ...ops import cpu_kernels, ge_ops
from .batch_norm import is_plain_batch_norm, update_running_stats
from .depthwise_conv import is_plain_conv


def _c_kernel_takes(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the CPU's C kernel is the faster gather for ``x`` run in
    ``dtype``: float32 NCHW maps with autograd on (twice as fast as the
    modules on ResNet-50's maps, forward and backward). On channels-last
    maps oneDNN's depthwise convolutions are as fast; without autograd the
    levels' maps the op returns for backward cost more than it saves
    (GE-ResNet-50 compiled: 1.24x of plain in inference, 1.19x on the
    modules); other dtypes have no C kernel."""
    return dtype is torch.float32 and x.is_contiguous() and \
        torch.is_grad_enabled() and cpu_kernels.available()


def _c_block_takes(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the CPU's C kernels take a block's tail (norm, GE, shortcut
    and ReLU as ``mmge::block_tail``) on ``x`` run in ``dtype``: float32
    maps, either layout."""
    return dtype is torch.float32 and cpu_kernels.available()


#: per op, the device types with kernels of their own for it and, where
#: they do not take every input, which inputs they take
KERNELS = {
    'conv_gather': {'cuda': None, 'cpu': _c_kernel_takes},
    'global_gather': {'cuda': None},
    'block_tail': {'cpu': _c_block_takes},
}


def has_kernels(op: str, x: torch.Tensor) -> bool:
    """Whether ``x``'s device has kernels of its own for ``mmge::<op>`` that
    take ``x`` in the dtype the op would run in (:func:`compute_input`'s),
    and the model is not traced for export (exporters get the modules' ATen
    ops)."""
    kernels = KERNELS[op]
    if torch.jit.is_tracing() or torch.compiler.is_exporting() or \
            x.device.type not in kernels:
        return False
    takes = kernels[x.device.type]
    return takes is None or takes(x, _compute_dtype(x))


class OpArgs(NamedTuple):
    """The op's arguments taken from a :class:`~.gather.ConvGather`."""
    weights: List[torch.Tensor]
    norm_weights: List[torch.Tensor]
    norm_biases: List[torch.Tensor]
    running_means: List[torch.Tensor]
    running_vars: List[torch.Tensor]
    training: bool
    eps: float
    last_relu: bool
    norms: List[nn.Module]


def _level(m: nn.Module, channels: int) -> bool:
    """Whether a level (a ``ConvModule``) is what the op computes."""
    conv, norm = m.conv, m.norm
    act = m.activate if m.with_activation else None
    return tuple(m.order) == ('conv', 'norm', 'act') and \
        not m.with_explicit_padding and is_plain_conv(conv) and \
        conv.bias is None and conv.kernel_size == (3, 3) and \
        conv.stride == (2, 2) and conv.padding == (1, 1) and \
        conv.dilation == (1, 1) and conv.groups == channels and \
        conv.padding_mode == 'zeros' and is_plain_batch_norm(norm) and \
        norm.affine and norm.running_mean is not None and \
        (act is None or type(act) is nn.ReLU)


def op_args(gather: nn.Module,
            x: torch.Tensor,
            op: str = 'conv_gather') -> Optional[OpArgs]:
    """The op's arguments for ``gather(x)``, or None where the modules run.

    Args:
        gather (ConvGather): The gather, of a local extent.
        x (Tensor): Its input, (N, C, H, W).
        op (str): The op that takes them: ``'conv_gather'``, or
            ``'block_tail'`` (then ``x`` is the block norm's input).

    Returns:
        OpArgs | None: None where :func:`has_kernels` says no,
        for levels the op does not compute, with forward hooks, or where a
        batch norm in training would see one value per channel (it
        raises then).
    """
    if x.dim() != 4 or not has_kernels(op, x) or \
            getattr(gather, 'feat_size', None) is not None or \
            cpu_kernels.hooked(gather):
        return None
    levels = list(gather.convs)
    channels = x.shape[1]
    if not all(_level(m, channels) for m in levels) or not all(
            m.with_activation for m in levels[:-1]):
        return None
    norms = [m.norm for m in levels]
    training = norms[0].training
    if any(n.training != training or n.eps != norms[0].eps for n in norms):
        return None
    n, _, h, w = ge_ops.gathered_shapes(x, len(levels))[-1]
    if training and n * h * w < 2:
        return None
    return OpArgs([m.conv.weight for m in levels],
                  [n.weight for n in norms], [n.bias for n in norms],
                  [n.running_mean for n in norms],
                  [n.running_var for n in norms], training, norms[0].eps,
                  levels[-1].with_activation, norms)


def whole_map(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``conv(x)`` is global-extent GE-theta's convolution (its
    kernel the whole map) on a device with kernels of its own for
    ``mmge::global_gather`` (:func:`has_kernels`), without hooks."""
    return x.dim() == 4 and has_kernels('global_gather', x) and \
        is_plain_conv(conv) and \
        conv.bias is None and conv.groups == x.shape[1] and \
        tuple(conv.kernel_size) == tuple(x.shape[2:]) and \
        conv.stride == (1, 1) and conv.padding == (0, 0) and \
        conv.dilation == (1, 1) and conv.padding_mode == 'zeros' and \
        not cpu_kernels.hooked(conv)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``x``'s convolutions run in: autocast's where it is on
    (``conv2d`` is on its lower-precision list; the ops are not)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


def compute_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype its convolutions run in (:func:`_compute_dtype`)."""
    return x.to(_compute_dtype(x))


def update(args: OpArgs, x: torch.Tensor, mean: torch.Tensor,
           var: torch.Tensor) -> None:
    """Update the levels' running statistics from the batch statistics
    (L, C) an op returned for the gather's input ``x``."""
    if not args.training:
        return
    mean, var = mean.detach(), var.detach()
    shapes = ge_ops.gathered_shapes(x, len(args.norms))
    for k, (norm, (n, _, h, w)) in enumerate(zip(args.norms, shapes)):
        update_running_stats(norm, mean[k], var[k], n * h * w)


def conv_gather(gather: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``gather.convs(x)``: on ``mmge::conv_gather`` (with autograd) where
    :func:`op_args` allows; for the global extent, its convolution on
    ``mmge::global_gather`` where :func:`whole_map` allows; else the
    modules.

    Args:
        gather (ConvGather): The gather.
        x (Tensor): Its input.

    Returns:
        Tensor: The context, (N, C, ceil(H / e), ceil(W / e)).
    """
    args = op_args(gather, x)
    if args is None:
        level = gather.convs[0]
        if gather.feat_size is None or len(gather.convs) != 1 or \
                tuple(level.order) != ('conv', 'norm', 'act') or \
                not whole_map(level.conv, x) or cpu_kernels.hooked(gather):
            return gather.convs(x)
        # the global extent: its convolution on the op, then the modules
        y = ge_ops.global_gather(compute_input(x), level.conv.weight)
        if level.with_norm:
            y = level.norm(y)
        return level.activate(y) if level.with_activation else y
    out = ge_ops.conv_gather(compute_input(x), *args[:-1])
    update(args, x, out[1], out[2])
    return out[0]
