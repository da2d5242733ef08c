"""Excite operators of Gather-Excite (Hu et al., NeurIPS 2018, Sec. 2).

The excite operator ``xi_E(x, g) = x * f(g)`` rescales the features ``x`` by a
gate ``f(g)`` in [0, 1] computed from the gathered context ``g`` and brought
back to the size of ``x`` by nearest-neighbour interpolation.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule


def check_reduction(reduction: int) -> int:
    """Validate a channel reduction ratio.

    Args:
        reduction (int): Ratio >= 1.

    Returns:
        int: ``reduction`` unchanged.

    Raises:
        TypeError: If ``reduction`` is not an int.
        ValueError: If ``reduction`` < 1.
    """
    if isinstance(reduction, bool) or not isinstance(reduction, int):
        raise TypeError(f'reduction must be an int >= 1 (the paper uses 16), '
                        f'got {reduction!r}')
    if reduction < 1:
        raise ValueError(f'reduction must be an int >= 1 (the paper uses 16), '
                         f'got {reduction}')
    return reduction


def check_channels(channels: int, name: str = 'in_channels') -> int:
    """Validate a channel count.

    Args:
        channels (int): Number of channels, >= 1.
        name (str): The argument's name, for the error message.

    Returns:
        int: ``channels`` unchanged.

    Raises:
        ValueError: If ``channels`` is not a positive int.
    """
    if isinstance(channels, bool) or not isinstance(channels,
                                                    int) or channels < 1:
        raise ValueError(f'{name} must be a positive int, got {channels!r}')
    return channels


class _NearestGate(torch.autograd.Function):
    """``x * resize_nearest(gate, size of x)``, keeping only ``x`` and the
    small ``gate`` for backward (not the resized gate)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, gate)
        return x * F.interpolate(gate, size=x.shape[-2:], mode='nearest')

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, gate = ctx.saved_tensors
        grad_x = grad_gate = None
        if ctx.needs_input_grad[0]:
            up = F.interpolate(gate, size=x.shape[-2:], mode='nearest')
            grad_x = (grad * up).to(x.dtype)
        if ctx.needs_input_grad[1]:
            # the exact adjoint of the forward's nearest resize
            grad_gate = torch.ops.aten.upsample_nearest2d_backward(
                grad * x, list(x.shape[-2:]), list(gate.shape), None,
                None).to(gate.dtype)
        return grad_x, grad_gate


class Excite(nn.Module):
    """Gate ``x`` with the sigmoid of the (optionally transformed) context.

    Without ``reduction`` the excite is parameter-free (GE-theta-minus,
    GE-theta): ``x * sigmoid(resize(g))``. With it, the context first passes
    a bottleneck MLP of two 1x1 convolutions with bias,
    ``channels -> channels // reduction -> channels`` with an activation in
    between (GE-theta-plus, SE). The sigmoid runs at the context's
    resolution, before the nearest resize (the two commute), and a 1x1
    context is broadcast rather than resized. In training, the resized gate
    is not kept for backward: it is resized again from the small one.

    Args:
        channels (int, optional): Number of channels; required with
            ``reduction``.
        reduction (int, optional): Channel reduction of the MLP; None for
            the parameter-free excite. The hidden width is
            ``max(1, channels // reduction)``.
        act_cfg (dict): Activation between the two MLP convolutions.
            Defaults to ``dict(type='ReLU')``.
    """

    def __init__(self,
                 channels: Optional[int] = None,
                 reduction: Optional[int] = None,
                 act_cfg: dict = dict(type='ReLU')) -> None:
        super().__init__()
        self.mlp = None
        if reduction is not None:
            hidden = max(1, check_channels(channels, 'channels') //
                         check_reduction(reduction))
            self.mlp = nn.Sequential(
                ConvModule(channels, hidden, 1, bias=True, act_cfg=act_cfg),
                ConvModule(hidden, channels, 1, bias=True, act_cfg=None))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Excite.

        Args:
            x (Tensor): Features of shape (N, C, H, W).
            context (Tensor): Gathered context of shape (N, C, h, w).

        Returns:
            Tensor: ``x`` gated, shape (N, C, H, W).
        """
        if self.mlp is not None:
            context = self.mlp(context)
        gate = context.sigmoid()
        if gate.shape[-2:] == (1, 1) or gate.shape[-2:] == x.shape[-2:]:
            return x * gate
        if torch.is_grad_enabled():
            return _NearestGate.apply(x, gate)
        return x * F.interpolate(gate, size=x.shape[-2:], mode='nearest')
