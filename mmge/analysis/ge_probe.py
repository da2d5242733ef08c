"""Look into GE layers while a model runs: their gates, and pruning by them.

- :func:`ge_layers`: the model's GE layers by name;
- :class:`GateRecorder`: records the excite gates of chosen GE layers
  (GE paper, Sec. 4; the gate-maps command);
- :class:`GatePruner`: per image, zeroes a ratio of a GE layer's gated
  channels ranked by their gates (GE paper, Fig. 5);
- :class:`ResidualBranchOff`: zeroes a plain residual block's branch (the
  baseline's prune ratio 1).

They are context managers that add forward hooks and remove them on exit;
the model itself is not changed. They work on GE's inference path (use them
under ``torch.no_grad()``), where the gather is called as a module on the
gated features, and whether or not the block passes its shortcut to GE.
"""
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from mmge.ops.resize import resize_multiply
from mmge.models.layers.gather_excite import GatherExcite
from .studies import gate_prune_mask


def ge_layers(module: nn.Module) -> Dict[str, GatherExcite]:
    """Every GE layer in ``module``, by its name in ``module``."""
    return {n: m for n, m in module.named_modules()
            if isinstance(m, GatherExcite)}


def block_ge(block: nn.Module, name: str = 'block') -> GatherExcite:
    """The one GE layer of a residual block.

    Raises:
        ValueError: If the block has no GE layer, or several.
    """
    layers = list(ge_layers(block).values())
    if len(layers) != 1:
        raise ValueError(f'{name} has {len(layers)} GE layers; pick a '
                         'residual block with exactly one')
    return layers[0]


class _Hooks:
    """Hook handles removed on exit."""

    def __init__(self) -> None:
        self._handles: List = []

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class GateRecorder(_Hooks):
    """Record the excite gates of GE layers, at the gather's resolution.

    After a forward pass inside the context, ``gates[name]`` holds the
    layer's last gate, ``sigmoid(excite(gather(x)))`` of shape
    (N, C, h, w): (N, C, 1, 1) for a global extent, about ``H / e`` by
    ``W / e`` for extent ``e``. GE multiplies its features by this gate
    resized to theirs (nearest).

    Args:
        layers (dict[str, GatherExcite]): The layers to record, by name.

    Example:
        >>> with GateRecorder(ge_layers(model.backbone)) as rec, \\
        ...         torch.no_grad():
        ...     model.extract_feat(inputs)
        >>> rec.gates['layer4.0.gather_excite'].shape
    """

    def __init__(self, layers: Dict[str, GatherExcite]) -> None:
        super().__init__()
        self.layers = layers
        self.gates: Dict[str, torch.Tensor] = {}

    def __enter__(self) -> 'GateRecorder':
        for name, layer in self.layers.items():
            self._handles.append(layer.gather.register_forward_hook(
                lambda m, i, out, name=name, layer=layer: self.gates.
                __setitem__(name, layer.excite.gate(out).detach())))
        return self


class GatePruner(_Hooks):
    """Per image, zero a ratio of a GE layer's channels ranked by gate.

    A channel's importance in an image is its gate averaged over the gate's
    positions (the gate itself for a global extent). The pruned channels of
    the gated features are set to zero before the shortcut is added: ratio
    0 changes nothing, ratio 1 removes the residual branch, so the block
    passes on its shortcut alone (GE paper, Fig. 5).

    Args:
        layer (GatherExcite): The block's GE layer.
        ratio (float): Fraction of channels to zero, in [0, 1].
        order (str): ``'ascending'`` (least important first) or
            ``'descending'`` (most important first).
    """

    def __init__(self, layer: GatherExcite, ratio: float,
                 order: str = 'ascending') -> None:
        super().__init__()
        gate_prune_mask(torch.zeros(1, 1), ratio, order)  # checks both
        self.layer, self.ratio, self.order = layer, ratio, order
        self._features: Optional[torch.Tensor] = None
        self._context: Optional[torch.Tensor] = None

    def __enter__(self) -> 'GatePruner':
        if self.ratio > 0:
            self._handles.append(self.layer.gather.register_forward_hook(
                self._keep_gather_io))
            self._handles.append(self.layer.register_forward_hook(
                self._prune))
        return self

    def _keep_gather_io(self, module, inputs, output) -> None:
        self._features, self._context = inputs[0], output

    def _prune(self, module, args, output) -> torch.Tensor:
        if self._features is None:
            raise RuntimeError('GatePruner saw GE without its gather; run '
                               'the model under torch.no_grad()')
        gate = self.layer.excite.gate(self._context)
        mask = gate_prune_mask(gate.mean((2, 3)), self.ratio, self.order)
        features = self._features * mask.to(gate.dtype)[..., None, None]
        self._features = self._context = None
        return resize_multiply(features, gate)


def last_norm(block: nn.Module) -> nn.Module:
    """The norm layer that ends a ResNet block's residual branch."""
    for name in ('norm3', 'norm2'):
        norm = getattr(block, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise ValueError(f'{type(block).__name__} is not a ResNet block with '
                     'norm2 (basic) or norm3 (bottleneck)')


class ResidualBranchOff(_Hooks):
    """Zero a plain ResNet block's residual branch (prune ratio 1).

    The output of the branch's last norm layer is replaced by zeros, so the
    block passes on ``relu(shortcut)``, as a GE block does under
    :class:`GatePruner` with ratio 1.

    Args:
        block (nn.Module): A ResNet basic or bottleneck block without GE.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        if ge_layers(block):
            raise ValueError('the block has a GE layer: prune it with '
                             'GatePruner(layer, ratio=1)')
        self.norm = last_norm(block)

    def __enter__(self) -> 'ResidualBranchOff':
        self._handles.append(self.norm.register_forward_hook(
            lambda m, i, out: torch.zeros_like(out)))
        return self
