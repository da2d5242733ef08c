"""GE's operations as ``mmge::`` ops of PyTorch's dispatcher.

Each op is defined here by its reference implementation in plain PyTorch,
which is also the kernel of every device without one of its own, with a
fake kernel (output shapes, for ``torch.compile`` and ``torch.export``) and
an autograd formula. The devices' kernels are registered by
:mod:`mmge.ops.cpu` (the native C kernels) and :mod:`mmge.ops.cuda`
(CUDA, Triton).

====================  ==========================================  ===========
op                    computes                                    backward
====================  ==========================================  ===========
pool_gather           ``avg_pool2d(x, 2e-1, e, e-1)``, padding    pool_gather
                      not counted (GE-theta-minus's gather)       _backward
excite                ``x * resize(gate) (+ identity)``, then a   excite,
                      ReLU when asked (the nearest resize of      excite
                      the small gate to x's size)                 _gate_grad
====================  ==========================================  ===========

The backward ops have no autograd formula of their own: a double backward
through GE raises an error that names them (``mmge.excite_gate_grad``,
``mmge.pool_gather_backward``).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .resize import channels_last, resize_multiply, resize_multiply_grad

__all__ = [
    'pool_gather', 'pool_gather_backward', 'excite', 'excite_gate_grad',
    'reference_pool_gather', 'reference_pool_gather_backward',
    'reference_excite', 'reference_excite_gate_grad', 'check_maps',
    'memory_format', 'pooled_size', 'product_dtype'
]


def memory_format(t: Tensor) -> torch.memory_format:
    """The layout of every op's output made for an operand ``t``:
    channels-last when ``t`` is (:func:`channels_last`), else contiguous."""
    return torch.channels_last if channels_last(t) else \
        torch.contiguous_format


def pooled_size(size: int, extent: int) -> int:
    """Cells of :func:`pool_gather`'s output along a side of ``size``."""
    return (size + extent - 1) // extent


def check_maps(x: Tensor, gate: Tensor,
               identity: Optional[Tensor] = None) -> None:
    """Refuse operands :func:`excite` does not define."""
    if x.dim() != 4 or gate.dim() != 4 or x.shape[:2] != gate.shape[:2] \
            or gate.shape[2] > x.shape[2] or gate.shape[3] > x.shape[3]:
        raise ValueError(
            f'mmge::excite takes x (N, C, H, W) and a gate (N, C, h, w) '
            f'with h <= H and w <= W, got {tuple(x.shape)} and '
            f'{tuple(gate.shape)}')
    if identity is not None and identity.shape != x.shape:
        raise ValueError(f'mmge::excite: identity must have the shape of x '
                         f'{tuple(x.shape)}, got {tuple(identity.shape)}')


# ---------------------------------------------------------------------------
# pool_gather


def reference_pool_gather(x: Tensor, extent: int) -> Tensor:
    """GE-theta-minus's gather: average pooling with kernel ``2e-1``,
    stride ``e`` and padding ``e-1``, padded cells not counted.

    Args:
        x (Tensor): (N, C, H, W).
        extent (int): The extent ratio ``e`` >= 2.

    Returns:
        Tensor: (N, C, ceil(H / e), ceil(W / e)), in ``x``'s layout.
    """
    return F.avg_pool2d(x, 2 * extent - 1, extent, extent - 1,
                        count_include_pad=False).contiguous(
                            memory_format=memory_format(x))


pool_gather = torch.library.custom_op(
    'mmge::pool_gather', reference_pool_gather, mutates_args=())


@pool_gather.register_fake
def _(x: Tensor, extent: int) -> Tensor:
    n, c, h, w = x.shape
    return x.new_empty(n, c, pooled_size(h, extent),
                       pooled_size(w, extent)).contiguous(
                           memory_format=memory_format(x))


def reference_pool_gather_backward(grad: Tensor, x: Tensor,
                                   extent: int) -> Tensor:
    """The gradient of :func:`pool_gather`'s input.

    Args:
        grad (Tensor): Gradient of the output.
        x (Tensor): The input (its shape and layout are used).
        extent (int): The extent ratio.

    Returns:
        Tensor: Shape, dtype and layout of ``x``.
    """
    k, p = 2 * extent - 1, extent - 1
    return torch.ops.aten.avg_pool2d_backward(
        grad, x, [k, k], [extent, extent], [p, p], False, False,
        None).to(x.dtype).contiguous(memory_format=memory_format(x))


pool_gather_backward = torch.library.custom_op(
    'mmge::pool_gather_backward', reference_pool_gather_backward,
    mutates_args=())


@pool_gather_backward.register_fake
def _(grad: Tensor, x: Tensor, extent: int) -> Tensor:
    return torch.empty_like(x, memory_format=memory_format(x))


def _pool_setup(ctx, inputs, output) -> None:
    x, ctx.extent = inputs
    ctx.save_for_backward(x)


def _pool_backward(ctx, grad: Tensor):
    x, = ctx.saved_tensors
    return pool_gather_backward(grad, x, ctx.extent), None


pool_gather.register_autograd(_pool_backward, setup_context=_pool_setup)

# ---------------------------------------------------------------------------
# excite


def product_dtype(x: Tensor, gate: Tensor,
                  identity: Optional[Tensor] = None) -> torch.dtype:
    """The dtype of :func:`excite`'s output: ``x``, ``gate`` (and
    ``identity``) promoted, as ``x * gate + identity`` would be."""
    dtype = torch.promote_types(x.dtype, gate.dtype)
    return dtype if identity is None else torch.promote_types(
        dtype, identity.dtype)


def reference_excite(x: Tensor,
                     gate: Tensor,
                     identity: Optional[Tensor] = None,
                     relu: bool = False) -> Tensor:
    """``x * F.interpolate(gate, size=x.shape[-2:], mode='nearest')``, plus
    ``identity`` when given, then ``relu`` when asked.

    Args:
        x (Tensor): Features, (N, C, H, W).
        gate (Tensor): Gate, (N, C, h, w), h <= H, w <= W.
        identity (Tensor, optional): Tensor of ``x``'s shape to add (a
            residual block's shortcut).
        relu (bool): Apply a ReLU to the result (the block's activation).

    Returns:
        Tensor: (N, C, H, W) in ``x``'s layout, of :func:`product_dtype`.
    """
    check_maps(x, gate, identity)
    if not (x.is_contiguous()
            or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    out = resize_multiply(x, gate, identity).contiguous(
        memory_format=memory_format(x))
    return out.relu_() if relu else out


excite = torch.library.custom_op('mmge::excite', reference_excite,
                                 mutates_args=())


@excite.register_fake
def _(x: Tensor, gate: Tensor, identity: Optional[Tensor] = None,
      relu: bool = False) -> Tensor:
    check_maps(x, gate, identity)
    return torch.empty_like(x, dtype=product_dtype(x, gate, identity),
                            memory_format=memory_format(x))


def reference_excite_gate_grad(grad: Tensor, x: Tensor,
                               gate: Tensor) -> Tensor:
    """The gradient of :func:`excite`'s gate (without its ReLU: ``grad``
    is then already masked by the output's sign): the nearest resize's
    adjoint of ``grad * x``, each gate cell the sum over the cells that
    took its value. (The gradient of ``x`` is ``excite(grad, gate)``.)

    Args:
        grad (Tensor): Gradient of the output, (N, C, H, W).
        x (Tensor): The features, (N, C, H, W).
        gate (Tensor): The gate, (N, C, h, w).

    Returns:
        Tensor: (N, C, h, w) in ``gate``'s dtype and layout.
    """
    return resize_multiply_grad(grad, x, gate).to(gate.dtype).contiguous(
        memory_format=memory_format(gate))


excite_gate_grad = torch.library.custom_op(
    'mmge::excite_gate_grad', reference_excite_gate_grad, mutates_args=())


@excite_gate_grad.register_fake
def _(grad: Tensor, x: Tensor, gate: Tensor) -> Tensor:
    return torch.empty_like(gate, memory_format=memory_format(gate))


def _excite_setup(ctx, inputs, output) -> None:
    x, gate, identity, relu = inputs
    ctx.relu = relu
    ctx.identity_dtype = None if identity is None else identity.dtype
    # with the ReLU, its mask is read from the output (which the next
    # layer keeps anyway)
    ctx.save_for_backward(x, gate, output if relu else None)


def _excite_backward(ctx, grad: Tensor):
    x, gate, out = ctx.saved_tensors
    if ctx.relu:
        grad = torch.where(out > 0, grad, 0)
    grad_x = excite(grad, gate).to(x.dtype)
    grad_gate = excite_gate_grad(grad, x, gate)
    grad_identity = None if ctx.identity_dtype is None else grad.to(
        ctx.identity_dtype)
    return grad_x, grad_gate, grad_identity, None


excite.register_autograd(_excite_backward, setup_context=_excite_setup)
