"""The functions GE's modules call: the ``mmge::`` ops, or, while a model is
traced for export (``torch.jit.trace``, ``torch.export``, ONNX), the same
formulas in ATen operations, which exporters and deployment runtimes know.
Tracing for export is the only thing decided here; each device's kernel is
chosen by the dispatcher."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ge_ops


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def pool_gather(x: Tensor, extent: int) -> Tensor:
    """GE-theta-minus's gather (``mmge::pool_gather``).

    Args:
        x (Tensor): (N, C, H, W).
        extent (int): The extent ratio ``e`` >= 2.

    Returns:
        Tensor: ``avg_pool2d(x, 2e-1, e, e-1)`` without the padded cells,
        (N, C, ceil(H / e), ceil(W / e)).
    """
    if _exporting():
        return F.avg_pool2d(x, 2 * extent - 1, extent, extent - 1,
                            count_include_pad=False)
    return ge_ops.pool_gather(x, extent)


def excite(x: Tensor,
           gate: Tensor,
           identity: Optional[Tensor] = None,
           relu: bool = False) -> Tensor:
    """``x * resize(gate)``, plus ``identity``, then a ReLU when asked
    (``mmge::excite``).

    Args:
        x (Tensor): Features, (N, C, H, W).
        gate (Tensor): Gate, (N, C, h, w), h <= H, w <= W; nearest-resized
            to (H, W).
        identity (Tensor, optional): Tensor of ``x``'s shape to add.
        relu (bool): Apply a ReLU to the result. Defaults to False.

    Returns:
        Tensor: (N, C, H, W).
    """
    if _exporting():
        if not all(type(s) is int and s == 1 for s in gate.shape[-2:]):
            # symbolic sizes: a resize to x's own size, not a constant one
            gate = F.interpolate(gate, size=x.shape[-2:], mode='nearest')
        out = x * gate if identity is None else x * gate + identity
        return out.relu() if relu else out
    return ge_ops.excite(x, gate, identity, relu)
