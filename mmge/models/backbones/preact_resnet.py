"""Pre-activation ResNets for CIFAR (He et al., ECCV 2016), with a GE slot."""
import copy
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import build_conv_layer, build_norm_layer, build_plugin_layer
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from ..init_report import report_layer_loading
from ..layers.args import to_size2d
from ..layers.gather_excite import needs_feat_size


class PreActBlock(BaseModule):
    """Pre-activation residual unit, basic (two 3x3) or bottleneck (1-3-1).

    ``out = x' + layer(branch(x))``: the branch runs BN-ReLU-conv units; the
    shortcut ``x'`` is ``x``, or a strided 1x1 projection of the
    pre-activated input when the shape changes. The optional layer (GE, SE)
    gates the branch output before the add, as in a post-activation ResNet.

    Args:
        in_channels (int): Input channels.
        planes (int): Width of the branch (bottleneck: of its 3x3 conv).
        stride (int): Stride of the 3x3 conv and the projection.
        bottleneck (bool): 1x1-3x3-1x1 with expansion 4 instead of 3x3-3x3.
        drop_rate (float): Dropout between the two convs of a basic unit
            (wide ResNets). Defaults to 0.
        ge_cfg (dict, optional): The gating layer, built with the branch's
            output channels.
        norm_cfg (dict): Norm layer config. Defaults to BN.
    """

    def __init__(self,
                 in_channels: int,
                 planes: int,
                 stride: int = 1,
                 bottleneck: bool = False,
                 drop_rate: float = 0.,
                 ge_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='BN'),
                 init_cfg=None) -> None:
        super().__init__(init_cfg)
        self.out_channels = planes * (4 if bottleneck else 1)
        if bottleneck:
            shapes = [(in_channels, planes, 1, 1), (planes, planes, 3, stride),
                      (planes, self.out_channels, 1, 1)]
        else:
            shapes = [(in_channels, planes, 3, stride),
                      (planes, planes, 3, 1)]
        self.norms = nn.ModuleList(
            [build_norm_layer(norm_cfg, c_in)[1] for c_in, _, _, _ in shapes])
        self.convs = nn.ModuleList([
            build_conv_layer(None, c_in, c_out, k, stride=s, padding=k // 2,
                             bias=False) for c_in, c_out, k, s in shapes
        ])
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else None
        self.shortcut = None
        if stride != 1 or in_channels != self.out_channels:
            self.shortcut = build_conv_layer(
                None, in_channels, self.out_channels, 1, stride=stride,
                bias=False)
        self.ge_name = None
        if ge_cfg is not None:
            self.ge_name, layer = build_plugin_layer(
                ge_cfg, in_channels=self.out_channels)
            self.add_module(self.ge_name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward function."""
        pre = self.relu(self.norms[0](x))
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.convs[0](pre)
        for i in range(1, len(self.convs)):
            out = self.relu(self.norms[i](out))
            if self.dropout is not None:
                out = self.dropout(out)
            out = self.convs[i](out)
        if self.ge_name is not None:
            out = getattr(self, self.ge_name)(out)
        return out + identity


@MODELS.register_module()
class PreActResNet(BaseModule):
    """Pre-activation ResNet for 32x32 inputs (ResNet-110, ResNet-164).

    A 3x3 conv with 16 channels, three stages of ``n`` pre-activation units
    (widths 16, 32, 64 times ``widen_factor``; strides 1, 2, 2), and a final
    BN-ReLU. Basic units: ``depth = 6n + 2`` (ResNet-110); bottleneck units:
    ``depth = 9n + 2`` (ResNet-164).

    Args:
        depth (int): Network depth.
        bottleneck (bool): Bottleneck units. Defaults to False.
        widen_factor (int): Width multiplier. Defaults to 1.
        drop_rate (float): Dropout inside basic units. Defaults to 0.
        ge_cfg (dict, optional): Gating layer of every unit (GE, SE, ...);
            ``type`` defaults to ``'GatherExcite'``. Defaults to None.
        input_size (int | tuple[int, int]): Input size, for global GE-theta.
            Defaults to 32.
        out_indices (Sequence[int]): Stages to output. Defaults to (2, ).
        norm_cfg (dict): Norm layer config. Defaults to BN.
        init_cfg (dict | list[dict], optional): Initialization config.
    """

    def __init__(self,
                 depth: int,
                 bottleneck: bool = False,
                 widen_factor: int = 1,
                 drop_rate: float = 0.,
                 ge_cfg: Optional[dict] = None,
                 input_size=32,
                 out_indices: Sequence[int] = (2, ),
                 norm_cfg: dict = dict(type='BN'),
                 init_cfg=[
                     dict(type='Kaiming', layer='Conv2d'),
                     dict(type='Constant', val=1, layer=['_BatchNorm'])
                 ]) -> None:
        super().__init__(init_cfg)
        n = self.units_per_stage(depth, bottleneck)
        self.depth, self.out_indices = depth, tuple(out_indices)
        self.ge_cfg = copy.deepcopy(ge_cfg)
        size = to_size2d(input_size, 'input_size')
        self.conv1 = build_conv_layer(None, 3, 16, 3, padding=1, bias=False)
        in_channels = 16
        self.stages = nn.ModuleList()
        for i, (width, stride) in enumerate(zip((16, 32, 64), (1, 2, 2))):
            size = tuple(-(-s // stride) for s in size)
            cfg = self._stage_ge_cfg(size)
            units = []
            for j in range(n):
                unit = PreActBlock(
                    in_channels, width * widen_factor,
                    stride=stride if j == 0 else 1, bottleneck=bottleneck,
                    drop_rate=drop_rate, ge_cfg=cfg, norm_cfg=norm_cfg)
                in_channels = unit.out_channels
                units.append(unit)
            self.stages.append(nn.Sequential(*units))
        self.norm_name, norm = build_norm_layer(norm_cfg, in_channels)
        self.add_module(self.norm_name, norm)
        self.relu = nn.ReLU(inplace=True)
        self.out_channels = in_channels
        if self.ge_cfg is not None:
            report_layer_loading(self, [self.stages[0][0].ge_name])

    @staticmethod
    def units_per_stage(depth: int, bottleneck: bool) -> int:
        """``n`` from ``depth = 6n + 2`` (basic) or ``9n + 2``."""
        per_unit = 9 if bottleneck else 6
        if not isinstance(depth, int) or depth < per_unit + 2 or (
                depth - 2) % per_unit:
            raise ValueError(
                f'depth must be {per_unit}n + 2 for '
                f'{"bottleneck" if bottleneck else "basic"} units (e.g. '
                f'{"164" if bottleneck else "110"}), got {depth!r}')
        return (depth - 2) // per_unit

    def _stage_ge_cfg(self, size: Tuple[int, int]) -> Optional[dict]:
        if self.ge_cfg is None:
            return None
        cfg = dict(self.ge_cfg)
        cfg.setdefault('type', 'GatherExcite')
        if needs_feat_size(cfg):
            cfg['feat_size'] = size
        return cfg

    @property
    def norm(self) -> nn.Module:
        """The final BN before the ReLU and pooling."""
        return getattr(self, self.norm_name)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Forward function; the last stage's output is BN-ReLU'd."""
        x = self.conv1(x)
        outs: List[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == len(self.stages) - 1:
                x = self.relu(self.norm(x))
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


@MODELS.register_module()
class WideResNet(PreActResNet):
    """Wide ResNet for 32x32 inputs (Zagoruyko and Komodakis, 2016).

    A :class:`PreActResNet` of basic units whose depth counts the projection
    shortcuts too: ``depth = 6n + 4`` (WRN-16-8: n = 2, widths 128, 256,
    512).

    Args:
        depth (int): 6n + 4. Defaults to 16.
        widen_factor (int): k. Defaults to 8.
        **kwargs: Other arguments of :class:`PreActResNet`.
    """

    def __init__(self, depth: int = 16, widen_factor: int = 8,
                 **kwargs) -> None:
        super().__init__(depth, widen_factor=widen_factor, **kwargs)

    @staticmethod
    def units_per_stage(depth: int, bottleneck: bool) -> int:
        """``n`` from ``depth = 6n + 4``."""
        if bottleneck:
            raise ValueError('WideResNet has basic units only')
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f'depth must be 6n + 4 for a wide ResNet (e.g. '
                             f'16, 28), got {depth!r}')
        return (depth - 4) // 6
