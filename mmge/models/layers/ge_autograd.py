"""Backward of Gather-Excite that recomputes instead of storing.

Autograd, left to itself, keeps for backward every tensor the gather and the
excite make: the layer's input, the gather's intermediate maps and the gate.
:class:`GEFunction` keeps only one tensor per layer, its input, and
recomputes the cheap rest (the gather runs at 1/2 resolution and below) in
backward. Given the norm layer that feeds GE, it keeps that layer's input
instead, which the plain network keeps anyway, so GE then stores nothing of
its own (the memory-saving mode, ``GatherExcite(memory_efficient=True)``).
Outputs and gradients are those of the plain formula; only what is stored
between forward and backward changes.

GE-theta-minus with a local extent has a second backward on contiguous
float32 CPU tensors, written out by hand on the native kernels of
:mod:`.cpu_kernels`: the pool, the gate's gradient and the input's gradient
are one memory pass each. Given a plain ``BatchNorm2d`` (in both modes) it
keeps the norm's input and makes GE's input on the fly inside those
passes, never materialised. GE-theta and GE-theta-plus use the native gate
gradient.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from . import cpu_kernels
from .excite import resize_multiply, resize_multiply_grad
from .gather import GLOBAL


def call_frozen(module: nn.Module, *args) -> torch.Tensor:
    """Run ``module`` without touching its buffers.

    A recomputation must not update running statistics a second time: the
    module runs on copies of its buffers (the batch statistics a norm layer
    uses in training do not depend on them).

    Args:
        module (nn.Module): The module to run.
        *args: Its inputs.

    Returns:
        Tensor: The module's output.
    """
    if not module.training:
        return module(*args)  # no buffer is written outside training
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    if not buffers:
        return module(*args)
    return torch.func.functional_call(module, buffers, args)


def is_plain_batch_norm(norm: Optional[nn.Module]) -> bool:
    """Whether ``norm`` is a batch norm that runs ``_BatchNorm.forward``
    (``nn.BatchNorm2d``, mmcv's ``'BN'``), whose forward
    :func:`batch_norm_forward` reproduces; SyncBN and others are not.

    Args:
        norm (nn.Module | None): The module.

    Returns:
        bool: True for such a batch norm.
    """
    return isinstance(norm, _BatchNorm) and \
        type(norm).forward is _BatchNorm.forward


def batch_norm_forward(norm: _BatchNorm, inp: torch.Tensor
                       ) -> Tuple[torch.Tensor, Dict[str, object]]:
    """``norm(inp)``, with what its backward and an on-the-fly recompute need.

    Does what ``_BatchNorm.forward`` does (running statistics and
    ``num_batches_tracked`` are updated the same way), through
    ``torch.native_batch_norm``, which also returns the batch statistics.

    Args:
        norm (_BatchNorm): A module :func:`is_plain_batch_norm` accepts.
        inp (Tensor): Its input.

    Returns:
        tuple[Tensor, dict]: ``norm(inp)`` and the saved state: ``scale``
        and ``shift`` (per channel, ``norm(inp) = scale * inp + shift``),
        ``mean``, ``invstd`` (the batch statistics), ``train``.
    """
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and \
            norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            momentum = 1.0 / float(norm.num_batches_tracked)
    train = norm.training or (norm.running_mean is None
                              and norm.running_var is None)
    track = not norm.training or norm.track_running_stats
    running_mean = norm.running_mean if track else None
    running_var = norm.running_var if track else None
    out, mean, invstd = torch.native_batch_norm(
        inp, norm.weight, norm.bias, running_mean, running_var, train,
        momentum, norm.eps)
    if not train:
        mean, invstd = running_mean, (running_var + norm.eps).rsqrt()
    scale = invstd if norm.weight is None else invstd * norm.weight.detach()
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach()
    return out, dict(scale=scale, shift=shift, mean=mean, invstd=invstd,
                     train=train)


def batch_norm_backward(norm: _BatchNorm, state: Dict[str, object],
                        grad: torch.Tensor, inp: torch.Tensor,
                        mask: List[bool]) -> Tuple[Optional[torch.Tensor],
                                                   ...]:
    """Backward of :func:`batch_norm_forward`.

    Args:
        norm (_BatchNorm): The module.
        state (dict): What :func:`batch_norm_forward` returned.
        grad (Tensor): Gradient of its output.
        inp (Tensor): Its input.
        mask (list[bool]): Which of (input, weight, bias) need a gradient.

    Returns:
        tuple: Gradients of the input, the weight and the bias (None where
        not asked for).
    """
    grads = torch.ops.aten.native_batch_norm_backward(
        grad, inp, norm.weight, norm.running_mean, norm.running_var,
        state['mean'], state['invstd'], state['train'], norm.eps, mask)
    return tuple(g if m else None for g, m in zip(grads, mask))


def native_theta_minus(layer: nn.Module, norm: Optional[nn.Module],
                       inp: torch.Tensor,
                       identity: Optional[torch.Tensor]) -> bool:
    """Whether :class:`GEFunction` takes the native GE-theta-minus path.

    Args:
        layer (nn.Module): The GE layer.
        norm (nn.Module | None): The norm layer feeding it, if any.
        inp (Tensor): The input.
        identity (Tensor | None): The shortcut.

    Returns:
        bool: True for GE-theta-minus with a local extent on contiguous
        float32 CPU tensors, fed by nothing or by a plain batch norm.
    """
    return (getattr(layer, 'variant', None) == 'theta_minus'
            and layer.extent != GLOBAL and inp.dim() == 4
            and (norm is None or is_plain_batch_norm(norm))
            and cpu_kernels.usable(inp, identity))


class GEFunction(torch.autograd.Function):
    """``out = x * resize(gate(x)) (+ identity)``, ``x = norm(inp)`` or
    ``inp``, storing only ``inp`` for backward.

    ``apply(layer, norm, inp, identity, *params)``: ``layer`` has a
    ``gather`` module and an ``excite`` with ``gate(context)`` (a
    :class:`GatherExcite`);
    ``norm`` is the module feeding GE, or None when ``inp`` is ``x``
    itself; ``params`` are the parameters of both that require grad, passed
    so that autograd hands their gradients on (DDP's hooks included).
    """

    @staticmethod
    def forward(ctx, layer: nn.Module, norm: Optional[nn.Module],
                inp: torch.Tensor, identity: Optional[torch.Tensor],
                *params: torch.Tensor) -> torch.Tensor:
        ctx.layer, ctx.norm = layer, norm
        ctx.with_identity = identity is not None
        ctx.native = native_theta_minus(layer, norm, inp, identity)
        if ctx.native:
            x, ctx.norm_state = (inp, None) if norm is None else \
                batch_norm_forward(norm, inp)
            gate = cpu_kernels.pool_gather(x, layer.extent).sigmoid_()
        else:
            x = inp if norm is None else norm(inp)
            gate = layer.excite.gate(layer.gather(x))
        out = resize_multiply(x, gate, identity)
        ctx.save_for_backward(inp, *params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        if ctx.native:  # grad has the output's dtype and device
            return GEFunction.native_backward(ctx, grad)
        inp, *params = ctx.saved_tensors
        layer, norm = ctx.layer, ctx.norm
        with torch.enable_grad():
            leaf = inp.detach().requires_grad_(ctx.needs_input_grad[2])
            x = leaf if norm is None else call_frozen(norm, leaf)
            gate = layer.excite.gate(call_frozen(layer.gather, x))
        gate_value = gate.detach()
        x_value = x.detach()
        if cpu_kernels.usable(grad, x_value):
            grad_gate = cpu_kernels.gate_grad(grad, x_value,
                                              gate_value.shape[-2:])
        else:
            grad_gate = resize_multiply_grad(grad, x_value, gate_value)
        outputs: List[torch.Tensor] = [gate]
        grad_outputs: List[torch.Tensor] = [grad_gate.to(gate.dtype)]
        if norm is not None:
            # the direct path joins the gather's inside the norm's backward
            outputs.append(x)
            grad_outputs.append(resize_multiply(grad, gate_value))
        inputs = [t for t in [leaf] + params if t.requires_grad]
        grads = torch.autograd.grad(
            outputs, inputs, grad_outputs, allow_unused=True) \
            if inputs else ()
        grads = dict(zip(map(id, inputs), grads))
        grad_inp = grads.get(id(leaf))
        if norm is None and ctx.needs_input_grad[2]:
            # gather path + direct path in one pass
            grad_inp = resize_multiply(grad, gate_value, grad_inp).to(
                inp.dtype)
        grad_identity = grad if ctx.with_identity else None
        return (None, None, grad_inp, grad_identity,
                *[grads.get(id(p)) for p in params])

    @staticmethod
    def native_backward(ctx, grad: torch.Tensor) -> tuple:
        """Backward of GE-theta-minus on the native kernels.

        With ``y = norm(inp)`` (or ``inp``), ``g = sigmoid(pool(y))`` and
        ``out = y * resize(g) + identity``:
        ``dg = resize^T(grad * y)``,
        ``dy = grad * resize(g) + pool^T(dg * g * (1 - g))``, and ``dy``
        goes through the norm's backward. ``y`` is made on the fly from
        ``inp`` (a per-channel affine) inside the kernels.

        Args:
            ctx: The autograd context.
            grad (Tensor): Gradient of the output.

        Returns:
            tuple: Gradients of :meth:`forward`'s inputs.
        """
        inp, *params = ctx.saved_tensors
        layer, norm, state = ctx.layer, ctx.norm, ctx.norm_state
        grad = grad.contiguous()
        scale = shift = None
        if state is not None:
            scale, shift = state['scale'], state['shift']
        gate = cpu_kernels.pool_gather(inp, layer.extent, scale,
                                       shift).sigmoid_()
        grad_gate = cpu_kernels.gate_grad(grad, inp, gate.shape[-2:], scale,
                                          shift)
        grad_pool = grad_gate.mul_(gate).mul_(1 - gate)
        grad_x = cpu_kernels.input_grad(grad, gate, grad_pool, layer.extent)
        grad_inp, by_param = grad_x, {}
        if norm is not None:
            weight, bias = norm.weight, norm.bias
            mask = [ctx.needs_input_grad[2],
                    weight is not None and weight.requires_grad,
                    bias is not None and bias.requires_grad]
            grad_inp, grad_weight, grad_bias = batch_norm_backward(
                norm, state, grad_x, inp, mask)
            if mask[1]:
                by_param[id(weight)] = grad_weight
            if mask[2]:
                by_param[id(bias)] = grad_bias
        if not ctx.needs_input_grad[2]:
            grad_inp = None
        grad_identity = grad if ctx.with_identity else None
        return (None, None, grad_inp, grad_identity,
                *[by_param.get(id(p)) for p in params])
