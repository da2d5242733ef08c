"""The CPU kernels of the ``mmge::`` ops: mmge's native C kernels
(:mod:`mmge.ops.cpu_kernels`) on float32 tensors in either layout, the
reference implementation on anything else (another dtype, strided views,
a build without the native library)."""
from typing import List, Optional

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


@ge_ops.excite_backward.register_kernel('cpu')
def excite_backward(grad: Tensor,
                    x: Tensor,
                    gate: Tensor,
                    out: Optional[Tensor] = None,
                    masked: bool = False) -> List[Tensor]:
    ge_ops.check_maps(x, gate)
    if grad.stride() != x.stride():
        grad = grad.contiguous(memory_format=ge_ops.memory_format(x))
    if out is not None and out.stride() != x.stride():
        out = out.contiguous(memory_format=ge_ops.memory_format(x))
    if not (_native(x, grad, out) and gate.dtype is torch.float32):
        return ge_ops.reference_excite_backward(grad, x, gate, out, masked)
    grad_x, grad_gate, grad_masked = cpu_kernels.excite_backward(
        grad, x, gate, out, masked)
    return [
        grad_x,
        grad_gate.contiguous(memory_format=ge_ops.memory_format(gate)),
        grad.new_empty(0) if grad_masked is None else grad_masked
    ]


@ge_ops.excite_gate_grad.register_kernel('cpu')
def excite_gate_grad(grad: Tensor, x: Tensor, gate: Tensor) -> Tensor:
    if grad.stride() != x.stride():
        grad = grad.contiguous(memory_format=ge_ops.memory_format(x))
    if not (_native(x, grad) and gate.dtype is torch.float32):
        return ge_ops.reference_excite_gate_grad(grad, x, gate)
    return cpu_kernels.gate_grad(grad, x, tuple(gate.shape[-2:])).contiguous(
        memory_format=ge_ops.memory_format(gate))


def _levels(weights: List[Tensor], norm_weights: List[Tensor],
            norm_biases: List[Tensor], means: List[Tensor],
            variances: List[Tensor], training: bool, eps: float,
            last_relu: bool) -> Optional[cpu_kernels.ConvGatherParams]:
    """``ge_conv_gather``'s levels for the op's operands, or None where
    the C kernel does not take them (more levels than it has, or a
    parameter that is not a contiguous float32 CPU tensor)."""
    levels = len(weights)
    params = cpu_kernels.ConvGatherParams(
        tuple(weights), tuple(norm_weights), tuple(norm_biases),
        (None, ) * levels if training else tuple(means),
        (None, ) * levels if training else tuple(variances),
        (eps, ) * levels, (training, ) * levels,
        (True, ) * (levels - 1) + (last_relu, ))
    if levels > cpu_kernels.MAX_LEVELS or not all(
            t is None or (t.dtype is torch.float32 and t.is_contiguous())
            for t in params.tensors):
        return None
    return params


@ge_ops.conv_gather.register_kernel('cpu')
def conv_gather(x: Tensor, weights: List[Tensor], norm_weights: List[Tensor],
                norm_biases: List[Tensor], running_means: List[Tensor],
                running_vars: List[Tensor], training: bool, eps: float,
                last_relu: bool) -> List[Tensor]:
    ge_ops.check_levels(x, weights, norm_weights, norm_biases, running_means,
                        running_vars)
    params = _levels(weights, norm_weights, norm_biases, running_means,
                     running_vars, training, eps, last_relu)
    if params is None or not _native(x):
        return ge_ops.reference_conv_gather(x, weights, norm_weights,
                                            norm_biases, running_means,
                                            running_vars, training, eps,
                                            last_relu)
    out = cpu_kernels.conv_gather(
        x, params, channels_last=cpu_kernels.channels_last(x), keep_raw=True)
    if training:
        mean, var = out.mean, out.var
    else:
        mean, var = torch.stack(running_means), torch.stack(running_vars)
    return [out.context, mean, var, *out.raw]


@ge_ops.conv_gather_backward.register_kernel('cpu')
def conv_gather_backward(grad: Tensor, x: Tensor, weights: List[Tensor],
                         norm_weights: List[Tensor], norm_biases: List[Tensor],
                         mean: Tensor, var: Tensor, raws: List[Tensor],
                         training: bool, eps: float, last_relu: bool,
                         input_grad: bool) -> List[Tensor]:
    # the C kernel runs the levels again from x (with the same batch
    # statistics) instead of reading ``raws``
    params = _levels(weights, norm_weights, norm_biases, list(mean),
                     list(var), training, eps, last_relu)
    if params is None or not _native(x) or grad.dtype is not torch.float32:
        return ge_ops.reference_conv_gather_backward(
            grad, x, weights, norm_weights, norm_biases, mean, var, raws,
            training, eps, last_relu, input_grad)
    out = cpu_kernels.conv_gather_backward(
        x, params, None, dcontext=grad.contiguous(
            memory_format=ge_ops.memory_format(x)))
    c = x.shape[1]
    grad_x = out.dx if input_grad else x.new_empty(0)
    # one tensor per level (an op's outputs do not alias each other)
    grad_weights = [d.view(c, 1, 3, 3).clone() for d in out.dweight]
    return [grad_x] + grad_weights + [out.dgamma, out.dbeta]
