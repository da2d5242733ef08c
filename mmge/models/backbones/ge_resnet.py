"""GE-ResNet: mmdet's ResNet with a Gather-Excite layer in its residual blocks."""
import copy
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import build_plugin_layer
from mmcv.cnn.bricks.plugin import infer_abbr
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from mmengine.registry import MODELS

from ..init_report import report_layer_loading
from ..layers.args import Size2d, to_size2d
from ..layers.gather_excite import GatherExcite, needs_feat_size
from ..layers.ge_block import fusable, fusable_relu, ge_block_tail


def fused_ge(block: nn.Module, names: List[str]) -> Optional[GatherExcite]:
    """The block's GE layer, when it is the only plugin at its position and
    no hook watches the layer's own call.

    The block then ends with :func:`ge_block_tail` of the last norm
    layer's input, the norm layer and the shortcut, so that GE adds the
    shortcut in its own pass and, in its memory-saving mode, recomputes
    the norm's output in backward.

    Args:
        block (nn.Module): A residual block.
        names (list[str]): Plugin names at the position after the last norm.

    Returns:
        GatherExcite | None: The layer, or None (then the block runs as
        mmdet's).
    """
    if len(names) != 1:
        return None
    layer = getattr(block, names[0])
    return layer if fusable(layer) else None


class GEBasicBlock(BasicBlock):
    """mmdet's ``BasicBlock`` that accepts plugins after its last norm layer.

    mmdet's ``BasicBlock`` refuses plugins. This one takes them at position
    ``'after_conv2'``: on the output of ``conv2``/``norm2``, before the
    shortcut is added, which is where GE and SE sit. Parameter names are
    those of mmdet's ``BasicBlock`` plus the plugins'.

    Args:
        *args: Positional arguments of mmdet's ``BasicBlock``.
        plugins (list[dict], optional): Plugins as produced by
            ``ResNet.make_stage_plugins``: dicts with ``cfg`` and
            ``position='after_conv2'``.
        **kwargs: Keyword arguments of mmdet's ``BasicBlock``.
    """

    # Reuse mmdet's plugin builder and runner; they only need ``self``.
    make_block_plugins = Bottleneck.make_block_plugins
    forward_plugin = Bottleneck.forward_plugin

    def __init__(self, *args, plugins: Optional[List[dict]] = None,
                 **kwargs) -> None:
        super().__init__(*args, plugins=None, **kwargs)
        plugins = plugins or []
        for plugin in plugins:
            if plugin.get('position') != 'after_conv2':
                raise ValueError(
                    f"a basic block (ResNet-18/34) takes plugins only at "
                    f"position 'after_conv2' (after its last norm layer), "
                    f"got position={plugin.get('position')!r}")
        self.after_conv2_plugin_names = self.make_block_plugins(
            self.conv2.out_channels, [p['cfg'] for p in plugins])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward function."""

        ge = fused_ge(self, self.after_conv2_plugin_names)
        if 'before_block' in self._modules:  # GEResNet's before_last_block
            x = self.before_block(x)
        relu = ge is not None and fusable_relu(self.relu, ge)

        def _inner_forward(x):
            identity = x
            out = self.relu(self.norm1(self.conv1(x)))
            if self.downsample is not None:
                identity = self.downsample(x)
            if ge is not None:
                return ge_block_tail(ge, self.conv2(out), identity,
                                     norm=self.norm2, relu=relu)
            out = self.norm2(self.conv2(out))
            out = self.forward_plugin(out, self.after_conv2_plugin_names)
            return out + identity

        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(_inner_forward, x, use_reentrant=False)
        else:
            out = _inner_forward(x)
        return out if relu else self.relu(out)


class GEBottleneck(Bottleneck):
    """mmdet's ``Bottleneck`` whose GE layer adds the shortcut itself.

    Same parameters, names and results as mmdet's ``Bottleneck`` with the
    plugins; when the only ``'after_conv3'`` plugin is a
    :class:`GatherExcite`, it is given ``conv3``'s output, ``norm3`` and
    the shortcut (see :func:`fused_ge`). Otherwise mmdet's forward runs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward function."""
        if 'before_block' in self._modules:  # GEResNet's before_last_block
            x = self.before_block(x)
        ge = fused_ge(self, self.after_conv3_plugin_names) \
            if self.with_plugins else None
        if ge is None:
            return super().forward(x)
        relu = fusable_relu(self.relu, ge)

        def _inner_forward(x):
            identity = x
            out = self.relu(self.norm1(self.conv1(x)))
            out = self.forward_plugin(out, self.after_conv1_plugin_names)
            out = self.relu(self.norm2(self.conv2(out)))
            out = self.forward_plugin(out, self.after_conv2_plugin_names)
            if self.downsample is not None:
                identity = self.downsample(x)
            return ge_block_tail(ge, self.conv3(out), identity,
                                 norm=self.norm3, relu=relu)

        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(_inner_forward, x, use_reentrant=False)
        else:
            out = _inner_forward(x)
        return out if relu else self.relu(out)


@MODELS.register_module()
class GEResNet(ResNet):
    """ResNet with Gather-Excite (or another gating layer) in its blocks.

    mmdet's ``ResNet`` (every argument of it works the same here:
    ``style``, ``frozen_stages``, ``norm_eval``, ``out_indices``,
    ``with_cp``, ``init_cfg``, ...) with the layer ``ge_cfg`` on the
    residual branch of every block of the stages ``ge_stages``, after the
    last norm layer and before the shortcut is added (Hu et al., 2018).
    Bottleneck models (50/101/152) are exactly mmdet's ``ResNet`` with the
    plugin at ``'after_conv3'``, parameter names included, so checkpoints
    move between the two (:class:`GEBottleneck` only lets the GE layer add
    the shortcut in its own pass). ResNet-18/34 use :class:`GEBasicBlock`.
    ``ge_cfg=dict(..., memory_efficient=True)`` switches on GE's
    memory-saving mode (see :class:`GatherExcite`).

    ``ge_cfg`` takes any layer built with ``in_channels``: ``GatherExcite``
    (the default type), ``SqueezeExcite`` (SE), or mmcv's ``ContextBlock``
    (GC), so ResNet, SE, GE and GC differ by that one argument; ``None``
    gives the plain ResNet.

    Args:
        depth (int): 18, 34, 50, 101 or 152.
        ge_cfg (dict, optional): Config of the layer; ``type`` defaults to
            ``'GatherExcite'``. Defaults to GE-theta with extent 8.
        ge_stages (Sequence[bool], optional): Which stages get the layer,
            one flag per stage. Defaults to all.
        input_size (int | tuple[int, int], optional): Network input size
            ``(h, w)``. Required by global-extent GE-theta/theta-plus, whose
            per-stage feature sizes are derived from it.
        num_stages (int): Number of stages. Defaults to 4.
        strides (Sequence[int]): Stride of each stage's first block.
            Defaults to (1, 2, 2, 2).
        plugins (list[dict], optional): Further mmdet plugins.
        before_last_block (dict, optional): A layer between the last two
            blocks of one stage, as GCNet places its non-local block ("before
            the last residual block of c4"): ``dict(cfg=..., stage=2)``,
            ``cfg`` built with ``in_channels`` (e.g. mmcv's ``NonLocal2d``
            or ``SimplifiedNonLocal2d``), ``stage`` 0-based. Its parameters
            are named ``layer{stage+1}.{last}.before_block.*``, so plain
            ResNet weights still load. Defaults to None.
        **kwargs: Other arguments of mmdet's ``ResNet``.

    Example:
        >>> import torch
        >>> model = GEResNet(50, ge_cfg=dict(variant='theta', extent=8))
        >>> [o.shape[1] for o in model(torch.rand(2, 3, 64, 64))]
        [256, 512, 1024, 2048]
    """

    arch_settings = {
        18: (GEBasicBlock, (2, 2, 2, 2)),
        34: (GEBasicBlock, (3, 4, 6, 3)),
        50: (GEBottleneck, (3, 4, 6, 3)),
        101: (GEBottleneck, (3, 4, 23, 3)),
        152: (GEBottleneck, (3, 8, 36, 3)),
    }

    def __init__(self,
                 depth: int,
                 ge_cfg: Optional[dict] = dict(
                     type='GatherExcite', variant='theta', extent=8),
                 ge_stages: Optional[Sequence[bool]] = None,
                 input_size: Optional[Union[int, Size2d]] = None,
                 num_stages: int = 4,
                 strides: Sequence[int] = (1, 2, 2, 2),
                 plugins: Optional[List[dict]] = None,
                 before_last_block: Optional[dict] = None,
                 **kwargs) -> None:
        if depth not in self.arch_settings:
            raise ValueError(f'depth must be one of '
                             f'{sorted(self.arch_settings)}, got {depth!r}')
        if ge_stages is None:
            ge_stages = (True, ) * num_stages
        if (not isinstance(ge_stages, (tuple, list))
                or len(ge_stages) != num_stages):
            raise ValueError(
                f'ge_stages must be a tuple of {num_stages} bools (one per '
                f'stage, num_stages={num_stages}), got {ge_stages!r}')
        for plugin in plugins or []:
            stages = plugin.get('stages')
            if stages is not None and len(stages) != num_stages:
                raise ValueError(
                    f"plugin {plugin.get('cfg')}: 'stages' must have one "
                    f'flag per stage ({num_stages}), got {stages!r}')
        self.ge_cfg = copy.deepcopy(ge_cfg)
        self.ge_stages = tuple(bool(s) for s in ge_stages)
        self.input_size = None if input_size is None else to_size2d(
            input_size, 'input_size')

        block = self.arch_settings[depth][0]
        position = 'after_conv2' if block is GEBasicBlock else 'after_conv3'
        ge_plugins = self._make_ge_plugins(position, num_stages, strides)
        plugins = list(plugins or []) + ge_plugins
        super().__init__(
            depth,
            num_stages=num_stages,
            strides=strides,
            plugins=plugins or None,
            **kwargs)
        # mmdet zero-initialises the last norm of its own BasicBlock only.
        if (block is GEBasicBlock and self.zero_init_residual
                and kwargs.get('init_cfg') is None
                and kwargs.get('pretrained') is None):
            for name in self.res_layers:
                for m in getattr(self, name):
                    m.init_cfg = dict(
                        type='Constant', val=0, override=dict(name='norm2'))
        self.before_last_block = copy.deepcopy(before_last_block)
        if before_last_block is not None:
            self._insert_before_last_block(before_last_block, num_stages)
        if ge_plugins:
            report_layer_loading(self, [
                infer_abbr(self._ge_layer_type()) +
                str(self.ge_cfg.get('postfix', ''))
            ])

    def _insert_before_last_block(self, spec: dict, num_stages: int) -> None:
        """Build ``before_last_block`` into its stage's last block."""
        if not isinstance(spec, dict) or set(spec) != {'cfg', 'stage'}:
            raise ValueError(
                "before_last_block must be dict(cfg=<layer config>, "
                f"stage=<0..{num_stages - 1}>), got {spec!r}")
        stage = spec['stage']
        if not isinstance(stage, int) or not 0 <= stage < num_stages:
            raise ValueError(f'before_last_block stage must be an int in '
                             f'0..{num_stages - 1}, got {stage!r}')
        blocks = getattr(self, self.res_layers[stage])
        if len(blocks) < 2:
            raise ValueError(f'before_last_block: stage {stage} has only '
                             f'{len(blocks)} block')
        last = blocks[-1]
        channels = last.conv1.in_channels
        _, layer = build_plugin_layer(
            copy.deepcopy(spec['cfg']), in_channels=channels)
        last.add_module('before_block', layer)

    def train(self, mode: bool = True) -> 'GEResNet':
        """Set train/eval mode, keeping mmdet's frozen stages and
        ``norm_eval``; returns ``self`` as ``nn.Module.train`` does."""
        super().train(mode)
        return self

    def _ge_layer_type(self) -> Optional[type]:
        """The class ``ge_cfg`` names (None if the registry has no such)."""
        layer = self.ge_cfg.get('type', 'GatherExcite')
        return MODELS.get(layer) if isinstance(layer, str) else layer

    def stage_sizes(self, num_stages: int,
                    strides: Sequence[int]) -> List[Size2d]:
        """Feature size after each stage for ``self.input_size``.

        The stem halves the size twice (stride-2 conv, then max pool) and
        every stride-s stage divides it by s, each time rounding up.

        Args:
            num_stages (int): Number of stages.
            strides (Sequence[int]): Stride of each stage.

        Returns:
            list[tuple[int, int]]: ``(h, w)`` per stage.
        """
        h, w = self.input_size
        h, w = -(-h // 4), -(-w // 4)
        sizes = []
        for s in strides[:num_stages]:
            h, w = -(-h // s), -(-w // s)
            sizes.append((h, w))
        return sizes

    def _make_ge_plugins(self, position: str, num_stages: int,
                         strides: Sequence[int]) -> List[dict]:
        """One mmdet plugin dict per stage that gets the layer."""
        if self.ge_cfg is None or not any(self.ge_stages):
            return []
        cfg = dict(self.ge_cfg)
        cfg.setdefault('type', 'GatherExcite')
        sizes = [None] * num_stages
        if needs_feat_size(self.ge_cfg):
            if self.input_size is None:
                raise ValueError(
                    "global-extent GE-theta (extent='global') needs "
                    'input_size: its depthwise kernel equals each stage\'s '
                    'feature size, derived from the input size. Give '
                    'input_size (e.g. 224), or use a local extent (2, 4, 8) '
                    'for inputs of varying size such as detection.')
            sizes = self.stage_sizes(num_stages, strides)
        plugins = []
        for i, on in enumerate(self.ge_stages):
            if not on:
                continue
            stage_cfg = dict(cfg)
            if sizes[i] is not None:
                stage_cfg['feat_size'] = sizes[i]
            plugins.append(
                dict(
                    cfg=stage_cfg,
                    stages=tuple(j == i for j in range(num_stages)),
                    position=position))
        return plugins
