"""Gather operators of Gather-Excite (Hu et al., NeurIPS 2018, Sec. 2).

A gather operator aggregates, separately for every channel, a neighbourhood
of a feature map. Its *extent ratio* ``e`` fixes the neighbourhood: each output
cell ``u`` sees a window of about ``(2e-1) x (2e-1)`` input cells centred on
``e * u``, and the output has ``ceil(H / e) x ceil(W / e)`` cells. The extent
``'global'`` gives one cell per channel that sees the whole map.

Two gathers are defined by the paper:

- :class:`PoolGather`, the parameter-free gather of GE-theta-minus
  (average pooling);
- :class:`ConvGather`, the parametric gather of GE-theta and GE-theta-plus
  (a chain of strided depthwise convolutions).
"""
import math
from typing import Optional, Union

import torch
import torch.nn as nn
from mmcv.cnn import ConvModule

from ... import ops
from .args import GLOBAL, Extent, Size2d, check_extent, to_size2d
from .depthwise_conv import GatherConv2d
from .gather_op import conv_gather


class PoolGather(nn.Module):
    """Parameter-free gather of GE-theta-minus: average pooling.

    A local extent ``e`` pools with kernel ``2e-1``, stride ``e`` and padding
    ``e-1``, padded cells not counted; the global extent averages over the
    whole map.

    Args:
        extent (int | str): Extent ratio. Defaults to ``'global'``.
    """

    def __init__(self, extent: Extent = GLOBAL) -> None:
        super().__init__()
        self.extent = check_extent(extent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gather.

        Args:
            x (Tensor): Features of shape (N, C, H, W).

        Returns:
            Tensor: Shape (N, C, ceil(H/e), ceil(W/e)), or (N, C, 1, 1).
        """
        if self.extent == GLOBAL:
            return x.mean(dim=(2, 3), keepdim=True)
        return ops.pool_gather(x, self.extent)

    def extra_repr(self) -> str:
        return f'extent={self.extent!r}'


class ConvGather(nn.Module):
    """Parametric gather of GE-theta: strided depthwise convolutions.

    A local extent ``e`` chains ``log2(e)`` depthwise 3x3 convolutions of
    stride 2 and padding 1 (no bias), each followed by a norm layer and all
    but the last by an activation (with batch norms and ReLUs, on a GPU and
    in CPU training on float32 NCHW maps, the chain runs as one
    ``mmge::conv_gather`` op: ``gather_op.KERNELS``). The global extent
    uses one depthwise convolution whose kernel equals the feature size
    (no padding, 1x1 output), followed by a norm layer; the network is then
    tied to that feature size.

    Args:
        channels (int): Number of channels.
        extent (int | str): Extent ratio. Defaults to 8.
        feat_size (int | tuple[int, int], optional): Feature size the layer
            will see. Required for the global extent, ignored otherwise.
        norm_cfg (dict): Norm layer config. Defaults to ``dict(type='BN')``.
        act_cfg (dict): Activation config. Defaults to
            ``dict(type='ReLU')``.
        last_act (bool): Apply the activation after the last convolution too
            (GE-theta-plus does). Defaults to False.
    """

    def __init__(self,
                 channels: int,
                 extent: Extent = 8,
                 feat_size: Optional[Union[int, Size2d]] = None,
                 norm_cfg: dict = dict(type='BN'),
                 act_cfg: dict = dict(type='ReLU'),
                 last_act: bool = False) -> None:
        super().__init__()
        self.extent = check_extent(extent)
        self.feat_size: Optional[Size2d] = None
        if self.extent == GLOBAL:
            if feat_size is None:
                raise ValueError(
                    "the global-extent parametric gather (GE-theta, extent="
                    "'global') needs feat_size: its depthwise kernel equals "
                    'the feature size. Give feat_size (GEResNet derives it '
                    'from input_size), or use a local extent (2, 4, 8).')
            self.feat_size = to_size2d(feat_size, 'feat_size')
            kernels = [dict(kernel_size=self.feat_size, stride=1, padding=0)]
        else:
            kernels = [dict(kernel_size=3, stride=2, padding=1)
                       ] * int(math.log2(self.extent))
        self.convs = nn.Sequential(*[
            ConvModule(
                channels, channels, groups=channels, bias=False,
                conv_cfg=dict(type=GatherConv2d), norm_cfg=norm_cfg,
                act_cfg=act_cfg if i < len(kernels) - 1 or last_act else None,
                **k) for i, k in enumerate(kernels)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gather.

        Args:
            x (Tensor): Features of shape (N, C, H, W).

        Returns:
            Tensor: Shape (N, C, ceil(H/e), ceil(W/e)), or (N, C, 1, 1).

        Raises:
            ValueError: For the global extent, if (H, W) is not the
                ``feat_size`` the layer was built for.
        """
        self.check_size(x)
        return conv_gather(self, x)  # self.convs(x), fused where possible

    def check_size(self, x: torch.Tensor) -> None:
        """Refuse a map of another size than a global extent's.

        Args:
            x (Tensor): The gather's input, (N, C, H, W).

        Raises:
            ValueError: For the global extent, if (H, W) is not the
                ``feat_size`` the layer was built for.
        """
        if self.feat_size is not None and tuple(x.shape[-2:]) != \
                self.feat_size:
            raise ValueError(
                f'global-extent GE-theta was built for feature size '
                f'{self.feat_size} but got {tuple(x.shape[-2:])}: its '
                f'depthwise kernel equals the feature size, so the model is '
                f'tied to one input size. Build it for this size (GEResNet '
                f'input_size / GatherExcite feat_size), or use a local '
                f'extent (2, 4, 8), which works at any size.')

    def extra_repr(self) -> str:
        s = f'extent={self.extent!r}'
        if self.feat_size is not None:
            s += f', feat_size={self.feat_size}'
        return s
