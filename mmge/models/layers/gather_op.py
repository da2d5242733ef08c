""":class:`~.gather.ConvGather` on the ``mmge::conv_gather`` op (and a
global extent's convolution on ``mmge::global_gather``).

Where a device has kernels of its own for the op (CUDA: Triton), GE-theta's
local gather runs as that one op instead of its modules: every level's
depthwise convolution, batch norm and ReLU in a few launches, reading the
input once. The op normalises with the batch's statistics and returns them;
the running statistics are updated here, as the batch norms would
(:func:`~.batch_norm.update_running_stats`). Elsewhere (the CPU, where the
modules run ATen's kernels and :class:`~.depthwise_conv.GatherConv2d`'s
workarounds) and for modules the op does not compute (another norm, such as
SyncBN; another activation; hooks), the modules run.
"""
from typing import List, NamedTuple, Optional

import torch
import torch.nn as nn

from ...ops import cpu_kernels, ge_ops
from .batch_norm import is_plain_batch_norm, update_running_stats
from .depthwise_conv import is_plain_conv

#: device types with kernels of their own for ``mmge::conv_gather``
DEVICES = ('cuda', )


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


def op_args(gather: nn.Module, x: torch.Tensor) -> Optional[OpArgs]:
    """The op's arguments for ``gather(x)``, or None where the modules run.

    Args:
        gather (ConvGather): The gather, of a local extent.
        x (Tensor): Its input, (N, C, H, W).

    Returns:
        OpArgs | None: None off the op's devices, while traced for export,
        for levels the op does not compute, with forward hooks, or where a
        batch norm in training would see one value per channel (it
        raises then).
    """
    if x.device.type not in DEVICES or x.dim() != 4 or \
            torch.jit.is_tracing() or torch.compiler.is_exporting() or \
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
    ``mmge::global_gather``, without hooks, while not traced for export."""
    return x.device.type in DEVICES and x.dim() == 4 and \
        not torch.jit.is_tracing() and \
        not torch.compiler.is_exporting() and is_plain_conv(conv) and \
        conv.bias is None and conv.groups == x.shape[1] and \
        tuple(conv.kernel_size) == tuple(x.shape[2:]) and \
        conv.stride == (1, 1) and conv.padding == (0, 0) and \
        conv.dilation == (1, 1) and conv.padding_mode == 'zeros' and \
        not cpu_kernels.hooked(conv)


def compute_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype its convolutions run in: autocast's where it is
    on (``conv2d`` is on its lower-precision list; the op is not)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(device))
    return x


def update(args: OpArgs, out: List[torch.Tensor]) -> None:
    """Update the norms' running statistics from the op's output."""
    if not args.training:
        return
    mean, var = out[1].detach(), out[2].detach()
    for k, (norm, raw) in enumerate(zip(args.norms, out[3:])):
        update_running_stats(norm, mean[k], var[k],
                             raw.numel() // max(raw.shape[1], 1))


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
    update(args, out)
    return out[0]
