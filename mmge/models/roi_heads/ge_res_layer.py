"""The C4 detector's conv5 RoI head with a Gather-Excite layer per block."""
import copy
from typing import Optional

from mmdet.models.backbones import ResNet
from mmdet.models.layers import ResLayer as _ResLayer
from mmdet.models.roi_heads.shared_heads import ResLayer
from mmengine.registry import MODELS

from ..backbones.ge_resnet import GEBottleneck
from ..init_report import report_layer_loading


@MODELS.register_module()
class GEResLayer(ResLayer):
    """mmdet's C4 shared head (``ResLayer``) whose blocks take a GE layer.

    In the He et al. C4 detector, conv5 runs per RoI as the head. mmdet's
    ``ResLayer`` shared head takes no plugins; this one puts ``ge_cfg`` in
    every block, at the same place as in ``GEResNet`` (after the last norm
    layer, before the shortcut is added). Parameter names are those of
    mmdet's ``ResLayer`` plus ``layer4.J.gather_excite.*``, so plain
    ResNet/GEResNet ImageNet weights load with the usual ``layer4.`` keys.

    Args:
        depth (int): ResNet depth (50, 101, 152).
        ge_cfg (dict, optional): The layer, ``type`` defaulting to
            ``'GatherExcite'``; ``None`` gives mmdet's ``ResLayer``.
            Defaults to GE-theta with extent 8.
        **kwargs: Arguments of mmdet's ``ResLayer`` (``stage``, ``stride``,
            ``dilation``, ``style``, ``norm_cfg``, ``norm_eval``,
            ``with_cp``, ``init_cfg``, ...).
    """

    def __init__(self,
                 depth: int,
                 ge_cfg: Optional[dict] = dict(
                     type='GatherExcite', variant='theta', extent=8),
                 stage: int = 3,
                 stride: int = 2,
                 dilation: int = 1,
                 style: str = 'pytorch',
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 with_cp: bool = False,
                 dcn: Optional[dict] = None,
                 **kwargs) -> None:
        super().__init__(
            depth, stage=stage, stride=stride, dilation=dilation,
            style=style, norm_cfg=norm_cfg, with_cp=with_cp, dcn=dcn,
            **kwargs)
        self.ge_cfg = copy.deepcopy(ge_cfg)
        if ge_cfg is None:
            return
        cfg = dict(ge_cfg)
        cfg.setdefault('type', 'GatherExcite')
        block, stage_blocks = ResNet.arch_settings[depth]
        # mmdet's ResLayer has no way to pass plugins to its blocks, so the
        # stage is built again, with them (same structure and names).
        self.add_module(
            f'layer{stage + 1}',
            _ResLayer(
                GEBottleneck,
                64 * 2**(stage - 1) * block.expansion,
                64 * 2**stage,
                stage_blocks[stage],
                stride=stride,
                dilation=dilation,
                style=style,
                with_cp=with_cp,
                norm_cfg=norm_cfg,
                dcn=dcn,
                plugins=[dict(cfg=cfg, position='after_conv3')]))
        report_layer_loading(
            self, getattr(self, f'layer{stage + 1}')[0].after_conv3_plugin_names)
