"""Parameters and FLOPs of a classification config's model (mmengine.analysis)."""
import os.path as osp
from typing import Dict

import torch.nn as nn
from mmengine.analysis import FlopAnalyzer
from mmengine.config import Config
from mmengine.registry import DefaultScope

import torch


class _Logits(nn.Module):
    """The classifier as images -> logits, for the FLOP counter."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, mode='tensor')


def classifier_complexity(config: str) -> Dict[str, float]:
    """Count a classification config's model.

    FLOPs follow MMEngine's counter: one multiply-add is one FLOP, and
    normalisation, activations and element-wise products are not counted
    (the paper's absolute GFLOPs differ from it by about 1%).

    Args:
        config (str): Path of an mmpretrain-style classification config.

    Returns:
        dict: ``params`` (all parameters, fc included) and ``flops`` for one
        image at the backbone's ``input_size`` (224 if unset).
    """
    import mmge  # noqa: F401
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(config)
    size = cfg.model.backbone.get('input_size') or 224
    h, w = (size, size) if isinstance(size, int) else size
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg.model).eval()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        analyzer = FlopAnalyzer(_Logits(model), (torch.zeros(1, 3, h, w), ))
        # GE's gate is resized to the map for export and tracing: a copy,
        # not arithmetic (MMEngine's counter counts it per output element)
        analyzer.set_op_handle(
            **{'aten::upsample_nearest2d': lambda inputs, outputs: 0})
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        flops = analyzer.total()
    return dict(name=osp.splitext(osp.basename(config))[0], params=params,
                flops=flops)
