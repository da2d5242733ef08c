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
"""
from typing import List, Optional

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from .excite import resize_multiply, resize_multiply_grad


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
        x = inp if norm is None else norm(inp)
        out = resize_multiply(x, layer.excite.gate(layer.gather(x)),
                              identity)
        ctx.layer, ctx.norm = layer, norm
        ctx.with_identity = identity is not None
        ctx.save_for_backward(inp, *params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        inp, *params = ctx.saved_tensors
        layer, norm = ctx.layer, ctx.norm
        with torch.enable_grad():
            leaf = inp.detach().requires_grad_(ctx.needs_input_grad[2])
            x = leaf if norm is None else call_frozen(norm, leaf)
            gate = layer.excite.gate(call_frozen(layer.gather, x))
        gate_value = gate.detach()
        grad_gate = resize_multiply_grad(grad, x.detach(), gate_value)
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
