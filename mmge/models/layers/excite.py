"""Excite operators of Gather-Excite (Hu et al., NeurIPS 2018, Sec. 2).

The excite operator ``xi_E(x, g) = x * f(g)`` rescales the features ``x`` by a
gate ``f(g)`` in [0, 1] computed from the gathered context ``g`` and brought
back to the size of ``x`` by nearest-neighbour interpolation.
"""
from typing import Optional

import torch
import torch.nn as nn
from mmcv.cnn import ConvModule

from ... import ops
from .args import check_channels, check_reduction


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
