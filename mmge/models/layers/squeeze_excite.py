"""Squeeze-and-Excitation (Hu et al., CVPR 2018) as a Gather-Excite pairing."""
from typing import Optional, Union

import torch
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from .args import check_channels
from .excite import Excite
from .gather import PoolGather


@MODELS.register_module()
class SqueezeExcite(BaseModule):
    """SE block: global average gather + the theta-plus excite MLP.

    ``y = x * sigmoid(W2 act(W1 mean_hw(x) + b1) + b2)``, with 1x1
    convolutions ``W1: C -> C // reduction`` and ``W2: C // reduction -> C``.
    Usable as an mmdet ResNet plugin and as ``GEResNet(ge_cfg=...)``; unlike
    mmpretrain's ``SELayer`` it is registered and takes ``in_channels``.

    Args:
        in_channels (int): Number of channels.
        reduction (int): Channel reduction of the MLP. Defaults to 16.
        act_cfg (dict): Activation inside the MLP. Defaults to
            ``dict(type='ReLU')``.
        init_cfg (dict | list[dict], optional): Initialization config.
    """

    _abbr_ = 'squeeze_excite'

    def __init__(self,
                 in_channels: int,
                 reduction: int = 16,
                 act_cfg: dict = dict(type='ReLU'),
                 init_cfg: Optional[Union[dict, list]] = None) -> None:
        super().__init__(init_cfg)
        self.in_channels = check_channels(in_channels)
        self.reduction = reduction
        self.gather = PoolGather('global')
        self.excite = Excite(in_channels, reduction, act_cfg=act_cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate ``x`` (N, C, H, W) by its channel means; same shape out."""
        return self.excite(x, self.gather(x))
