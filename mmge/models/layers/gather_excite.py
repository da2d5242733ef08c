"""The Gather-Excite layer, registered as ``GatherExcite``."""
from typing import Optional, Tuple, Union

import torch
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from .args import (GLOBAL, Extent, check_channels, check_extent,
                   check_reduction)
from .excite import Excite
from .ge_block import ge_block_tail
from .gather import ConvGather, PoolGather
from .prepared_inference import PreparedInference

VARIANTS = ('theta_minus', 'theta', 'theta_plus')


def needs_feat_size(cfg: dict) -> bool:
    """Whether a layer config is global GE-theta/theta-plus without a size.

    Backbones use it to decide when to give each stage's ``feat_size``.

    Args:
        cfg (dict): A layer config; ``type`` (a name or a class) defaults to
            ``'GatherExcite'``.

    Returns:
        bool: True for a ``GatherExcite`` (or subclass) with the global
        extent, a parametric variant and no ``feat_size``.
    """
    layer = cfg.get('type', 'GatherExcite')
    if isinstance(layer, str):
        layer = MODELS.get(layer)
    return (isinstance(layer, type) and issubclass(layer, GatherExcite)
            and cfg.get('extent', 8) == GLOBAL
            and cfg.get('variant', 'theta') != 'theta_minus'
            and 'feat_size' not in cfg)


@MODELS.register_module()
class GatherExcite(BaseModule):
    """Gather-Excite (Hu et al., NeurIPS 2018) on one feature map.

    ``y = x * sigmoid(resize(f(gather(x))))``, in one of the paper's three
    variants:

    ============  =============================  ================================
    variant       gather                         excite
    ============  =============================  ================================
    theta_minus   average pooling (no params)    sigmoid of the nearest resize
    theta         depthwise convs + norm         sigmoid of the nearest resize
    theta_plus    depthwise convs + norm + act   1x1 MLP, resize, sigmoid
    ============  =============================  ================================

    In a ResNet it sits on the output of the residual branch's last norm
    layer, before the shortcut is added (mmdet plugin position
    ``'after_conv3'``, or ``'after_conv2'`` in ``GEResNet``'s basic block).

    Args:
        in_channels (int): Number of channels.
        variant (str): ``'theta_minus'``, ``'theta'`` or ``'theta_plus'``.
            Defaults to ``'theta'``.
        extent (int | str): Extent ratio: a power of two >= 2 (the paper
            uses 2, 4, 8) or ``'global'``. Defaults to 8.
        reduction (int): Channel reduction of the theta-plus MLP.
            Defaults to 16.
        feat_size (int | tuple[int, int], optional): Feature size; required
            by global GE-theta and GE-theta-plus, whose depthwise kernel
            equals it. Defaults to None.
        norm_cfg (dict): Norm layer of the parametric gather. Defaults to
            ``dict(type='BN')``.
        act_cfg (dict): Activation of the parametric gather and the MLP.
            Defaults to ``dict(type='ReLU')``.
        memory_efficient (bool): The memory-saving mode: in training, GE
            keeps for backward only the input of the norm layer before it
            (which the network keeps anyway) and makes everything else
            again in backward, whatever that norm is. It needs that norm
            layer, so it works where the blocks end with
            :func:`~.ge_block.ge_block_tail` (``GEResNet``, ``GEResLayer``,
            ``GEShuffleNetV1``), not as a plugin of mmdet's ResNet.
            Defaults to False.
        init_cfg (dict | list[dict], optional): Initialization config.

    Example:
        >>> import torch
        >>> layer = GatherExcite(64, variant='theta', extent=8)
        >>> layer(torch.rand(2, 64, 13, 9)).shape
        torch.Size([2, 64, 13, 9])
    """

    _abbr_ = 'gather_excite'

    def __init__(self,
                 in_channels: int,
                 variant: str = 'theta',
                 extent: Extent = 8,
                 reduction: int = 16,
                 feat_size: Optional[Union[int, Tuple[int, int]]] = None,
                 norm_cfg: dict = dict(type='BN'),
                 act_cfg: dict = dict(type='ReLU'),
                 memory_efficient: bool = False,
                 init_cfg: Optional[Union[dict, list]] = None) -> None:
        super().__init__(init_cfg)
        #: the native inference call, prepared by the last call that made it
        self._prepared: Optional[PreparedInference] = None
        if not isinstance(memory_efficient, bool):
            raise TypeError(f'memory_efficient must be a bool, got '
                            f'{memory_efficient!r}')
        self.memory_efficient = memory_efficient
        if variant not in VARIANTS:
            raise ValueError(
                f'variant must be one of {VARIANTS}, got {variant!r}')
        self.in_channels = check_channels(in_channels)
        self.variant = variant
        self.extent = check_extent(extent)
        self.reduction = check_reduction(reduction)

        if variant == 'theta_minus':
            self.gather = PoolGather(self.extent)
            self.excite = Excite()
        else:
            plus = variant == 'theta_plus'
            self.gather = ConvGather(
                in_channels, self.extent, feat_size, norm_cfg=norm_cfg,
                act_cfg=act_cfg, last_act=plus)
            self.excite = Excite(in_channels, reduction if plus else None,
                                 act_cfg=act_cfg)

    @property
    def feat_size(self) -> Optional[Tuple[int, int]]:
        """tuple[int, int] | None: The size global GE-theta is tied to."""
        return getattr(self.gather, 'feat_size', None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gather context and excite ``x`` with it:
        ``x * sigmoid(resize(f(gather(x))))``.

        It runs as :func:`~.ge_block.ge_block_tail` without a norm, a
        shortcut or a ReLU: on the native CPU kernels where they apply
        (one fused call, keeping only ``x`` for backward), else the
        modules and the ``mmge::`` ops. A residual block that has the norm
        layer before GE and the shortcut and the ReLU after it calls
        :func:`~.ge_block.ge_block_tail` with them instead.

        Args:
            x (Tensor): Features of shape (N, C, H, W).

        Returns:
            Tensor: Gated features, same shape as ``x``.

        Raises:
            ValueError: In the memory-saving mode, which needs the norm
                layer before GE.
        """
        return ge_block_tail(self, x)

    def _apply(self, fn, recurse: bool = True):
        # .to(), .float(), .cuda() and the like: the prepared call keeps the
        # old storages alive; let them go now
        self._prepared = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        s = f'{self.in_channels}, variant={self.variant!r}, ' \
            f'extent={self.extent!r}'
        if self.variant == 'theta_plus':
            s += f', reduction={self.reduction}'
        return s
