"""The CPU kernels of the ``mmge::`` ops: mmge's native C kernels
(:mod:`mmge.ops.cpu_kernels`) on float32 tensors in either layout, the
reference implementation on anything else (another dtype, strided views,
a build without the native library)."""
from typing import Optional

import torch
from torch import Tensor

from . import cpu_kernels, ge_ops


def _native(x: Tensor, *others: Optional[Tensor]) -> bool:
    """Whether the C kernels take ``x`` and ``others``: float32, ``x``
    contiguous or channels-last, ``others`` of ``x``'s shape in its
    layout (None entries skipped)."""
    if not cpu_kernels.available() or x.dtype is not torch.float32 or \
            x.dim() != 4 or not (x.is_contiguous() or x.is_contiguous(
                memory_format=torch.channels_last)):
        return False
    return all(t is None or (t.dtype is torch.float32
                             and t.shape == x.shape
                             and t.stride() == x.stride()) for t in others)


@ge_ops.pool_gather.register_kernel('cpu')
def pool_gather(x: Tensor, extent: int) -> Tensor:
    if not _native(x):
        return ge_ops.reference_pool_gather(x, extent)
    return cpu_kernels.pool_gather(x, extent)


@ge_ops.excite.register_kernel('cpu')
def excite(x: Tensor,
           gate: Tensor,
           identity: Optional[Tensor] = None,
           relu: bool = False) -> Tensor:
    ge_ops.check_maps(x, gate, identity)
    if identity is not None and identity.stride() != x.stride():
        identity = identity.contiguous(memory_format=ge_ops.memory_format(x))
    if not (_native(x, identity) and gate.dtype is torch.float32):
        return ge_ops.reference_excite(x, gate, identity, relu)
    return cpu_kernels.excite(x, gate, identity, relu=relu)


@ge_ops.excite_gate_grad.register_kernel('cpu')
def excite_gate_grad(grad: Tensor, x: Tensor, gate: Tensor) -> Tensor:
    if grad.stride() != x.stride():
        grad = grad.contiguous(memory_format=ge_ops.memory_format(x))
    if not (_native(x, grad) and gate.dtype is torch.float32):
        return ge_ops.reference_excite_gate_grad(grad, x, gate)
    return cpu_kernels.gate_grad(grad, x, tuple(gate.shape[-2:])).contiguous(
        memory_format=ge_ops.memory_format(gate))
