"""GE-ShuffleNet: mmpretrain's ShuffleNetV1 with a gating layer in every unit."""
import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import build_plugin_layer
from mmengine.registry import MODELS
from mmpretrain.models.backbones.shufflenet_v1 import ShuffleNetV1, ShuffleUnit
from mmpretrain.models.utils import channel_shuffle

from ..init_report import report_layer_loading
from ..layers.args import to_size2d
from ..layers.gather_excite import needs_feat_size
from ..layers.ge_block import fusable, fusable_relu, ge_block_tail


class GEShuffleUnit(ShuffleUnit):
    """mmpretrain's ``ShuffleUnit`` with a layer on its residual branch.

    The layer gates the branch's last norm output (after the expanding 1x1
    group conv and its BN), before the add (stride 1) or the concat with
    the pooled shortcut (stride 2), as GE and SE sit in a ResNet block.
    Parameter names are mmpretrain's plus the layer's.

    Args:
        *args: Positional arguments of ``ShuffleUnit``.
        ge_cfg (dict, optional): The layer (built with ``in_channels``, the
            branch's channels). None gives mmpretrain's unit.
        **kwargs: Keyword arguments of ``ShuffleUnit``.
    """

    def __init__(self, *args, ge_cfg: Optional[dict] = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ge_name = None
        if ge_cfg is not None:
            self.ge_name, layer = build_plugin_layer(
                ge_cfg, in_channels=self.out_channels)
            self.add_module(self.ge_name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward function."""

        def _inner_forward(x):
            out = self.depthwise_conv3x3_bn(self.g_conv_1x1_compress(x))
            if self.groups > 1:
                out = channel_shuffle(out, self.groups)
            ge = None if self.ge_name is None else getattr(self, self.ge_name)
            expand = self.g_conv_1x1_expand
            if fusable(ge) and expand.with_norm and \
                    not expand.with_activation and \
                    expand.order == ('conv', 'norm', 'act'):
                # GE adds the shortcut, may recompute the norm's output and
                # applies a plain ReLU in its last pass
                out = expand.conv(out)
                relu = fusable_relu(self.act, ge)
                out = ge_block_tail(ge, out,
                                    None if self.combine == 'concat' else x,
                                    norm=expand.norm, relu=relu)
                out = out if relu else self.act(out)
                if self.combine == 'concat':
                    return self._concat(self.avgpool(x), out)
                return out
            out = expand(out)
            if ge is not None:
                out = ge(out)
            if self.combine == 'concat':
                return self._concat(self.avgpool(x), self.act(out))
            return self.act(self._add(x, out))

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(_inner_forward, x, use_reentrant=False)
        return _inner_forward(x)


@MODELS.register_module()
class GEShuffleNetV1(ShuffleNetV1):
    """ShuffleNet v1 with Gather-Excite (or SE, GC) in every unit.

    mmpretrain's ``ShuffleNetV1`` (same arguments, same parameter names)
    whose units carry ``ge_cfg`` on their residual branch
    (:class:`GEShuffleUnit`), the paper's Table 4 models.

    Args:
        ge_cfg (dict, optional): The layer; ``type`` defaults to
            ``'GatherExcite'``. Defaults to GE-theta with extent 8; None
            gives mmpretrain's ShuffleNetV1.
        input_size (int | tuple[int, int], optional): Network input size;
            required by global GE-theta/theta-plus. A stage's units work at
            its output size: the input divided by 8, 16, 32 (rounded up).
        **kwargs: Arguments of mmpretrain's ``ShuffleNetV1``.
    """

    def __init__(self,
                 ge_cfg: Optional[dict] = dict(
                     type='GatherExcite', variant='theta', extent=8),
                 input_size=None,
                 **kwargs) -> None:
        self.ge_cfg = copy.deepcopy(ge_cfg)
        if self.ge_cfg is not None:
            self.ge_cfg.setdefault('type', 'GatherExcite')
        self.input_size = None if input_size is None else to_size2d(
            input_size, 'input_size')
        super().__init__(**kwargs)
        if self.ge_cfg is not None:
            report_layer_loading(self, [self.layers[0][0].ge_name])

    def train(self, mode: bool = True) -> 'GEShuffleNetV1':
        """Set train/eval mode as mmpretrain does; returns ``self`` as
        ``nn.Module.train`` does."""
        super().train(mode)
        return self

    def _stage_cfg(self, stage: int) -> Optional[dict]:
        """``ge_cfg`` for stage ``stage`` (its feature size if global)."""
        if self.ge_cfg is None:
            return None
        cfg = dict(self.ge_cfg)
        if needs_feat_size(cfg):
            if self.input_size is None:
                raise ValueError(
                    "global-extent GE-theta (extent='global') needs "
                    'input_size, from which each stage\'s feature size is '
                    'derived; or use a local extent (2, 4, 8)')
            div = 8 * 2**stage
            cfg['feat_size'] = tuple(-(-s // div) for s in self.input_size)
        return cfg

    def make_layer(self, out_channels: int, num_blocks: int,
                   first_block: bool = False) -> nn.Sequential:
        """A stage of :class:`GEShuffleUnit`, the first one downsampling."""
        # mmpretrain appends each stage to self.layers after building it
        ge_cfg = self._stage_cfg(len(self.layers))
        layers = []
        for i in range(num_blocks):
            layers.append(
                GEShuffleUnit(
                    self.in_channels,
                    out_channels,
                    groups=self.groups,
                    first_block=first_block if i == 0 else False,
                    combine='concat' if i == 0 else 'add',
                    conv_cfg=self.conv_cfg,
                    norm_cfg=self.norm_cfg,
                    act_cfg=self.act_cfg,
                    with_cp=self.with_cp,
                    ge_cfg=ge_cfg))
            self.in_channels = out_channels
        return nn.Sequential(*layers)
