"""Simplified non-local block (Cao et al., GCNet, 2019, Sec. 3.2)."""
from typing import Optional, Union

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from .args import check_channels


@MODELS.register_module()
class SimplifiedNonLocal2d(BaseModule):
    """Simplified non-local (SNL) block: one attention map for all queries.

    ``z_i = x_i + W_v sum_j softmax_j(W_k x_j) x_j``: query-independent
    attention pooling (a 1x1 convolution ``W_k: C -> 1`` and a softmax over
    the positions) gives one context vector per image, transformed by one
    1x1 convolution ``W_v: C -> C`` and added to every position. GCNet
    derives it from the non-local block (whose attention maps it finds
    nearly query-independent) and turns it into the GC block by giving
    ``W_v`` a bottleneck with LayerNorm. mmcv has ``NonLocal2d`` and
    ``ContextBlock`` but not this one. Usable as an mmdet ResNet plugin.

    Args:
        in_channels (int): Number of channels.
        zero_init (bool): Start ``W_v`` at zero, so that the block starts as
            the identity (as GCNet initialises its transforms). Defaults to
            True.
        init_cfg (dict | list[dict], optional): Initialization config.
    """

    _abbr_ = 'simplified_non_local'

    def __init__(self,
                 in_channels: int,
                 zero_init: bool = True,
                 init_cfg: Optional[Union[dict, list]] = None) -> None:
        super().__init__(init_cfg)
        self.in_channels = check_channels(in_channels)
        self.zero_init = zero_init
        self.conv_key = nn.Conv2d(in_channels, 1, 1)
        self.conv_value = nn.Conv2d(in_channels, in_channels, 1)

    def init_weights(self) -> None:
        """Zero ``W_v`` when ``zero_init``, after the usual init."""
        super().init_weights()
        if self.zero_init:
            nn.init.zeros_(self.conv_value.weight)
            nn.init.zeros_(self.conv_value.bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map, shared by every query position.

        Args:
            x (Tensor): Features (N, C, H, W).

        Returns:
            Tensor: (N, H * W), each row a distribution over positions.
        """
        return self.conv_key(x).flatten(1).softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the transformed attention-pooled context to every position.

        Args:
            x (Tensor): Features (N, C, H, W).

        Returns:
            Tensor: Same shape as ``x``.
        """
        context = torch.einsum('ncp,np->nc', x.flatten(2), self.attention(x))
        return x + self.conv_value(context[..., None, None])

    def extra_repr(self) -> str:
        return f'{self.in_channels}'
