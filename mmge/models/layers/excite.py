"""Excite operators of Gather-Excite (Hu et al., NeurIPS 2018, Sec. 2).

The excite operator ``xi_E(x, g) = x * f(g)`` rescales the features ``x`` by a
gate ``f(g)`` in [0, 1] computed from the gathered context ``g`` and brought
back to the size of ``x`` by nearest-neighbour interpolation.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule

from ... import ops
from ...ops.resize import channels_last


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


def _as_context(t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``t``, a channels-last (N, C, h, w) view, in ``context``'s layout:
    as it is for a channels-last context, else contiguous."""
    return t if channels_last(context) else t.contiguous()


class Excite(nn.Module):
    """Gate ``x`` with the sigmoid of the (optionally transformed) context.

    Without ``reduction`` the excite is parameter-free (GE-theta-minus,
    GE-theta): ``x * sigmoid(resize(g))``. With it, the context first passes
    a bottleneck MLP of two 1x1 convolutions with bias,
    ``channels -> channels // reduction -> channels`` with an activation in
    between (GE-theta-plus, SE). The sigmoid runs at the context's
    resolution, before the nearest resize (the two commute), and the resize
    is the ``mmge::excite`` op (:func:`mmge.ops.excite`).

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

    def gate(self, context: torch.Tensor) -> torch.Tensor:
        """The gate ``sigmoid(mlp(context))`` at the context's resolution.

        Args:
            context (Tensor): Gathered context (N, C, h, w).

        Returns:
            Tensor: Gate in [0, 1], shape (N, C, h, w).
        """
        if self.mlp is not None:
            context = self.mlp(context)
        return context.sigmoid()

    def plain_mlp(self) -> bool:
        """Whether the MLP has the layout this class builds: two 1x1
        ``nn.Conv2d`` with bias, no norm, a ReLU or nothing after the
        first and nothing after the second."""
        first, second = self.mlp
        return all(
            tuple(m.order) == ('conv', 'norm', 'act') and not m.with_norm
            and type(m.conv) is nn.Conv2d and m.conv.kernel_size == (1, 1)
            and m.conv.groups == 1 and m.conv.bias is not None
            for m in self.mlp) and not second.with_activation and (
                not first.with_activation
                or type(first.activate) is nn.ReLU)

    def gate_backward(self, context: torch.Tensor,
                      grad_gate: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The gate and the gradients of the context and the MLP's
        parameters for the gate's gradient ``grad_gate``.

        Args:
            context (Tensor): Gathered context (N, C, h, w).
            grad_gate (Tensor): Gradient of :meth:`gate`'s output.

        Returns:
            tuple: ``gate``, ``grad_context`` and, per parameter of the MLP
            that requires grad (in ``parameters()`` order), its gradient.
            For the plain layout the products are written out by hand (no
            autograd graph: the context is small and the graph's overhead
            is not); else autograd runs :meth:`gate`.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        if self.mlp is None or not self.plain_mlp() or context.dim() != 4:
            with torch.enable_grad():
                leaf = context.detach().requires_grad_(True)
                gate = self.gate(leaf)
            grads = torch.autograd.grad(gate, [leaf] + params, grad_gate)
            return (gate.detach(), ) + tuple(grads)
        first, second = (m.conv for m in self.mlp)
        n, c, h, w = context.shape
        rows = context.permute(0, 2, 3, 1).reshape(-1, c)
        hidden = F.linear(rows, first.weight.flatten(1), first.bias)
        if self.mlp[0].with_activation:
            hidden = hidden.clamp_min_(0)
        gate = F.linear(hidden, second.weight.flatten(1),
                        second.bias).sigmoid_()
        d_out = grad_gate.permute(0, 2, 3, 1).reshape(-1, c) * gate * (
            1 - gate)
        d_hidden = d_out @ second.weight.flatten(1)
        if self.mlp[0].with_activation:
            d_hidden = d_hidden * (hidden > 0)
        by_param = {
            id(second.weight): (d_out.t() @ hidden).view_as(second.weight),
            id(second.bias): d_out.sum(0),
            id(first.weight): (d_hidden.t() @ rows).view_as(first.weight),
            id(first.bias): d_hidden.sum(0)
        }
        d_context = d_hidden @ first.weight.flatten(1)

        def nchw(t):
            # in the context's layout (a channels-last context: no copy)
            return _as_context(t.view(n, h, w, -1).permute(0, 3, 1, 2),
                               context)

        return (nchw(gate), nchw(d_context),
                *[by_param[id(p)] for p in params])

    def forward(self,
                x: torch.Tensor,
                context: torch.Tensor,
                identity: Optional[torch.Tensor] = None,
                relu: bool = False) -> torch.Tensor:
        """Excite: ``x * resize(gate(context))`` (``mmge::excite``).

        Args:
            x (Tensor): Features of shape (N, C, H, W).
            context (Tensor): Gathered context of shape (N, C, h, w).
            identity (Tensor, optional): A tensor of ``x``'s shape added in
                the same pass (a residual block's shortcut).
            relu (bool): Then a ReLU, in the same pass. Defaults to False.

        Returns:
            Tensor: ``x`` gated, shape (N, C, H, W).
        """
        return ops.excite(x, self.gate(context), identity, relu)
