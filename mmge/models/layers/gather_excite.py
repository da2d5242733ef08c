"""The Gather-Excite layer, registered as ``GatherExcite``."""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from ...ops import cpu_kernels
from . import input_recompute
from .batch_norm import is_plain_batch_norm
from .excite import Excite, check_channels, check_reduction
from .ge_autograd import GEFunction, native_inference, native_plan
from .gather import GLOBAL, ConvGather, Extent, PoolGather, check_extent
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


def fusable_relu(act: nn.Module, layer: nn.Module) -> bool:
    """Whether a block's activation after its GE layer may run in that
    layer's last pass (``GatherExcite.forward(..., relu=True)``) instead of
    being called.

    Args:
        act (nn.Module): The block's activation module.
        layer (nn.Module): The GE layer.

    Returns:
        bool: True for a plain ``nn.ReLU`` when no forward hook would see
        the difference: none on ``act``, none on ``layer`` itself (a hook
        on it sees, or replaces, its output before the activation), no
        global one. Hooks inside ``layer`` see only its parts' values (the
        layer then leaves its kernels, and applies the ReLU itself).
    """
    # the layer's own hooks, not its submodules': this runs in every
    # block's forward (hooked() also sees global hooks)
    return type(act) is nn.ReLU and not cpu_kernels.hooked(act) and \
        not (layer._forward_hooks or layer._forward_pre_hooks)


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
        memory_efficient (bool): The memory-saving mode: in training, keep
            for backward the input of the norm layer that feeds GE (which
            the network keeps anyway) and nothing else: GE's input, the
            gather and the gate are made again in backward, whatever that
            norm is (SyncBN and GroupNorm too). Needs that norm layer in
            :meth:`forward` (``GEResNet``, ``GEResLayer`` and
            ``GEShuffleNetV1`` pass it). Outside this mode, after a plain
            ``BatchNorm2d`` (mmcv's ``'BN'``), GE keeps the norm's input
            too and makes its own input again in backward; on float32
            CPU tensors it keeps nothing else (but for GE-theta-plus's
            context on the native kernels, 1 / 4^levels of the input);
            elsewhere (CUDA, autocast, float64) it
            keeps the gather's maps, at 1/2 resolution and below, instead
            of making the gather again (fewer operations, which a GPU step
            bound by the host pays for; :mod:`.input_recompute`). After
            another norm, or none, it keeps its own input. Defaults to
            False.
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

    def forward(self,
                x: torch.Tensor,
                identity: Optional[torch.Tensor] = None,
                norm: Optional[nn.Module] = None,
                relu: bool = False) -> torch.Tensor:
        """Gather context and excite ``x`` with it.

        Args:
            x (Tensor): Features of shape (N, C, H, W); with ``norm``, the
                norm layer's input.
            identity (Tensor, optional): The block's shortcut, added to the
                gated features (in the same pass when it has ``x``'s shape;
                one that broadcasts is added after).
            norm (nn.Module, optional): The norm layer feeding GE: the
                features are ``norm(x)``. Required by ``memory_efficient``.
            relu (bool): Apply a ReLU to the result (the block's activation
                after the shortcut), in the excite's pass where the native
                kernels run without autograd, else in place after it.
                Defaults to False.

        Returns:
            Tensor: Gated features (plus ``identity``), same shape as ``x``.

        Raises:
            ValueError: In the memory-saving mode, if ``norm`` is not given.
        """
        if self.memory_efficient and norm is None:
            raise ValueError(
                'GatherExcite(memory_efficient=True) recomputes its input '
                'from the norm layer before it, so it must be called as '
                'layer(x, identity, norm=...), as GEResNet, GEResLayer and '
                'GEShuffleNetV1 do; as a plugin of mmdet\'s ResNet it only '
                'sees the norm\'s output: use memory_efficient=False there')
        if isinstance(self.gather, ConvGather):
            # a global extent's size, before a norm counts the batch
            self.gather.check_size(x)
        if identity is not None and identity.shape != x.shape:
            # the fused passes add a shortcut of x's own shape; one that
            # broadcasts is added after them
            out = self.forward(x, norm=norm) + identity
            return out.relu_() if relu else out
        replay = not torch.is_grad_enabled() and \
            not torch.compiler.is_compiling() and not torch.jit.is_tracing()
        if replay:
            prepared = self.__dict__.get('_prepared')
            if prepared is not None:
                out = prepared(self, x, identity, norm, relu)
                if out is not None:
                    return out
                self._prepared = None
        plan = native_plan(self, norm, x, identity)
        if norm is not None and not self.memory_efficient and \
                plan is None and torch.is_grad_enabled() and \
                not is_plain_batch_norm(norm):
            # another norm (SyncBN's forward communicates, GroupNorm's
            # costs more than a batch norm's affine): keep GE's own input
            # rather than run it again in backward. After a plain batch
            # norm both modes keep the norm's input, which the network
            # keeps anyway (the native path makes GE's input on the fly;
            # elsewhere it is made again from the norm's statistics)
            x, norm = norm(x), None
            plan = native_plan(self, norm, x, identity)
        if torch.compiler.is_compiling():
            # the ops: the compiler plans the memory between them
            if norm is not None:
                x = norm(x)
            return self.excite(x, self.gather(x), identity, relu)
        if torch.is_grad_enabled():
            if norm is not None and plan is None and \
                    not self.memory_efficient and \
                    input_recompute.usable(self, norm, x):
                # the default mode off the native kernels, after a plain
                # batch norm: the gather's small maps kept, GE's input made
                # again in backward (nothing asks for a gradient: autograd
                # records nothing, and the values are the same)
                return input_recompute.forward(self, norm, x, identity, relu)
            params = tuple(
                p for m in (self, norm) if m is not None
                for p in m.parameters() if p.requires_grad)
            if x.requires_grad or params or (identity is not None
                                             and identity.requires_grad):
                out = GEFunction.apply(self, norm, plan, x, identity,
                                       *params)
                return out.relu_() if relu else out
        if replay and plan is not None:
            prepared = PreparedInference.build(self, norm, plan, x, identity,
                                               relu)
            if prepared is not None:
                self._prepared = prepared
                return prepared.run(x, identity)
        out = native_inference(self, norm, plan, x, identity, relu)
        if out is not None:
            return out
        if norm is not None:
            x = norm(x)
        return self.excite(x, self.gather(x), identity, relu)

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
