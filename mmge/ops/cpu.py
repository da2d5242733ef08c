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


def _mlp(mlp: List[Tensor],
         mlp_relu: bool) -> Optional[cpu_kernels.MLPParams]:
    """GE-theta-plus's MLP as the C kernel takes it (None without one)."""
    return cpu_kernels.MLPParams(*mlp, mlp_relu) if mlp else None


def _block_native(x: Tensor, identity: Optional[Tensor], extent: int,
                  params: Optional[cpu_kernels.ConvGatherParams],
                  vectors: List[Optional[Tensor]],
                  mlp: List[Tensor]) -> bool:
    """Whether the C kernels take a block tail: float32 maps in one layout
    (:func:`_native`), the levels :func:`_levels` accepts (or a pool of a
    local extent the C pool takes), contiguous float32 parameters, and an
    MLP only after levels (the C kernels run it in the gather's call)."""
    if not _native(x, identity) or (params is None and (mlp or extent < 2)):
        return False
    return all(t is None or (t.dtype is torch.float32 and t.is_contiguous())
               for t in vectors + list(mlp))


@ge_ops.block_tail.register_kernel('cpu')
def block_tail(x: Tensor, identity: Optional[Tensor], norm_weight: Tensor,
               norm_bias: Tensor, norm_mean: Optional[Tensor],
               norm_var: Optional[Tensor], norm_training: bool,
               norm_eps: float, extent: int, weights: List[Tensor],
               norm_weights: List[Tensor], norm_biases: List[Tensor],
               running_means: List[Tensor], running_vars: List[Tensor],
               training: bool, eps: float, last_relu: bool,
               mlp: List[Tensor], mlp_relu: bool,
               relu: bool) -> List[Tensor]:
    ge_ops.check_block(x, identity, norm_weight, norm_bias, norm_mean,
                       norm_var, norm_training, extent, weights, norm_weights,
                       norm_biases, running_means, running_vars, mlp)
    if identity is not None and identity.stride() != x.stride():
        identity = identity.contiguous(memory_format=ge_ops.memory_format(x))
    params = _levels(weights, norm_weights, norm_biases, running_means,
                     running_vars, training, eps, last_relu) \
        if weights else None
    running = (None, None) if norm_training else (norm_mean, norm_var)
    if (weights and params is None) or not _block_native(
            x, identity, extent, params,
            [norm_weight, norm_bias, *running], mlp):
        return ge_ops.reference_block_tail(
            x, identity, norm_weight, norm_bias, norm_mean, norm_var,
            norm_training, norm_eps, extent, weights, norm_weights,
            norm_biases, running_means, running_vars, training, eps,
            last_relu, mlp, mlp_relu, relu)
    empty = x.new_empty(0)
    if params is None:
        # GE-theta-minus: the statistics in one pass, then the pool and the
        # excite of the norm's output made on the fly
        if norm_training:
            mean, var = cpu_kernels.batch_stats(x)
        else:
            mean, var = norm_mean.clone(), norm_var.clone()
        scale = norm_weight * (var + norm_eps).rsqrt()
        shift = norm_bias - mean * scale
        gate = cpu_kernels.pool_gather(x, extent, scale, shift).sigmoid_()
        out = cpu_kernels.excite(x, gate, identity, scale=scale, shift=shift,
                                 relu=relu)
        return [out, mean, var, empty, empty.clone(), empty.clone()]
    # GE-theta(-plus): the norm, the gather, the MLP and the excite in one
    # call, the norm's output never materialised
    result = cpu_kernels.conv_gather(
        x, params, norm=cpu_kernels.FusedNorm(norm_weight, norm_bias,
                                              norm_eps, *running),
        excite=cpu_kernels.Excitation(identity, relu, _mlp(mlp, mlp_relu)),
        keep_context=bool(mlp))
    if norm_training:
        mean, var = result.norm_mean, result.norm_var
    else:
        mean, var = norm_mean.clone(), norm_var.clone()
    if training:
        level_mean, level_var = result.mean, result.var
    else:
        level_mean, level_var = torch.stack(running_means), torch.stack(
            running_vars)
    return [result.out, mean, var, level_mean, level_var,
            result.context if mlp else empty]


@ge_ops.block_tail_backward.register_kernel('cpu')
def block_tail_backward(grad: Tensor, x: Tensor, out: Optional[Tensor],
                        norm_weight: Tensor, norm_bias: Tensor, mean: Tensor,
                        var: Tensor, norm_training: bool, norm_eps: float,
                        extent: int, weights: List[Tensor],
                        norm_weights: List[Tensor], norm_biases: List[Tensor],
                        level_mean: Tensor, level_var: Tensor, training: bool,
                        eps: float, last_relu: bool, mlp: List[Tensor],
                        mlp_relu: bool, context: Tensor) -> List[Tensor]:
    fmt = ge_ops.memory_format(x)
    if grad.stride() != x.stride():
        grad = grad.contiguous(memory_format=fmt)
    if out is not None and out.stride() != x.stride():
        out = out.contiguous(memory_format=fmt)
    params = _levels(weights, norm_weights, norm_biases, list(level_mean),
                     list(level_var), training, eps, last_relu) \
        if weights else None
    if (weights and params is None) or grad.dtype is not torch.float32 or \
            not _native(x, grad, out) or not _block_native(
                x, None, extent, params, [norm_weight, norm_bias, mean, var],
                mlp):
        return ge_ops.reference_block_tail_backward(
            grad, x, out, norm_weight, norm_bias, mean, var, norm_training,
            norm_eps, extent, weights, norm_weights, norm_biases, level_mean,
            level_var, training, eps, last_relu, mlp, mlp_relu, context)
    masked = x.new_empty(0)
    if out is not None:
        grad = masked = torch.ops.aten.threshold_backward(grad, out, 0)
    invstd = (var + norm_eps).rsqrt()
    scale = norm_weight * invstd
    shift = norm_bias - mean * scale
    if params is None:
        gate = cpu_kernels.pool_gather(x, extent, scale, shift).sigmoid_()
        grad_gate = cpu_kernels.gate_grad(grad, x, gate.shape[-2:], scale,
                                          shift)
        grad_y = cpu_kernels.input_grad(grad, gate,
                                        grad_gate.mul_(gate).mul_(1 - gate),
                                        extent)
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, norm_weight, mean, var, mean, invstd, norm_training,
            norm_eps, [True, True, True])
        return [grad_x, masked, grad_w, grad_b]
    g = cpu_kernels.conv_gather_backward(
        x, params, grad, scale, shift,
        stats=cpu_kernels.NormStats(mean, invstd, norm_training),
        mlp=_mlp(mlp, mlp_relu), context=context if mlp else None)
    c, levels = x.shape[1], len(weights)
    grad_mlp = [getattr(g, k).view_as(t) for k, t in zip(
        cpu_kernels.MLP_GRADS, mlp)] if mlp else []
    return [g.dx, masked, g.norm_dweight, g.norm_dbias] + [
        d.view(c, 1, 3, 3).clone() for d in g.dweight] + [
            g.dgamma[k].clone() for k in range(levels)] + [
                g.dbeta[k].clone() for k in range(levels)] + grad_mlp
