"""GE's operations as ``mmge::`` ops of PyTorch's dispatcher.

Each op is defined here by its reference implementation in plain PyTorch,
which is also the kernel of every device without one of its own, with a
fake kernel (output shapes, for ``torch.compile`` and ``torch.export``) and
an autograd formula. The devices' kernels are registered by
:mod:`mmge.ops.cpu` (the native C kernels) and :mod:`mmge.ops.cuda`
(CUDA, Triton).

=====================  =========================================  ============
op                     computes                                   backward
=====================  =========================================  ============
pool_gather            ``avg_pool2d(x, 2e-1, e, e-1)``, padding   pool_gather
                       not counted (GE-theta-minus's gather)      _backward
excite                 ``x * resize(gate) (+ identity)``, then a  excite
                       ReLU when asked (the nearest resize of     _backward
                       the small gate to x's size)
conv_gather            GE-theta's local gather: levels of a       conv_gather
                       depthwise 3x3 stride-2 convolution, batch  _backward
                       norm and ReLU
=====================  =========================================  ============

``excite_backward`` gives both of the excite's gradients in one call;
``excite_gate_grad`` is the gate's alone. The backward ops have no autograd
formula of their own: a double backward through them raises an error that
names them (``mmge.excite_gate_grad``, ``mmge.pool_gather_backward``,
``mmge.conv_gather_backward``). A double backward through the excite's
input works: with ``create_graph`` its gradient is itself an excite.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .resize import channels_last, resize_multiply, resize_multiply_grad

__all__ = [
    'pool_gather', 'pool_gather_backward', 'excite', 'excite_gate_grad',
    'excite_backward', 'conv_gather', 'conv_gather_backward',
    'reference_excite_backward', 'reference_conv_gather',
    'reference_conv_gather_backward',
    'reference_pool_gather', 'reference_pool_gather_backward',
    'reference_excite', 'reference_excite_gate_grad', 'check_maps',
    'memory_format', 'pooled_size', 'product_dtype', 'block_tail',
    'block_tail_backward', 'reference_block_tail',
    'reference_block_tail_backward'
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


def reference_excite_backward(grad: Tensor,
                              x: Tensor,
                              gate: Tensor,
                              out: Optional[Tensor] = None,
                              masked: bool = False) -> List[Tensor]:
    """:func:`excite`'s gradients in one call.

    Args:
        grad (Tensor): Gradient of the output, (N, C, H, W).
        x (Tensor): The features, (N, C, H, W).
        gate (Tensor): The gate, (N, C, h, w).
        out (Tensor, optional): The output of an excite with its ReLU: its
            sign masks ``grad``.
        masked (bool): Also return the masked ``grad`` (the shortcut's
            gradient), with ``out``.

    Returns:
        list[Tensor]: ``[grad_x, grad_gate, grad_masked]``: ``excite(g,
        gate)`` in ``x``'s dtype and layout, :func:`excite_gate_grad` of
        ``g``, and ``g`` itself where asked (else an empty tensor), ``g``
        being ``grad`` masked by ``out > 0``, or ``grad``.
    """
    if out is not None:
        grad = torch.where(out > 0, grad, 0)
    grad_x = excite(grad, gate).to(x.dtype).contiguous(
        memory_format=memory_format(x))
    return [
        grad_x,
        excite_gate_grad(grad, x, gate),
        grad.contiguous(memory_format=memory_format(x))
        if out is not None and masked else grad.new_empty(0)
    ]


excite_backward = torch.library.custom_op(
    'mmge::excite_backward', reference_excite_backward, mutates_args=())


@excite_backward.register_fake
def _(grad: Tensor, x: Tensor, gate: Tensor, out: Optional[Tensor] = None,
      masked: bool = False) -> List[Tensor]:
    fmt = memory_format(x)
    return [
        torch.empty_like(x, memory_format=fmt),
        torch.empty_like(gate, memory_format=memory_format(gate)),
        torch.empty_like(grad, memory_format=fmt)
        if out is not None and masked else grad.new_empty(0)
    ]


def _excite_setup(ctx, inputs, output) -> None:
    x, gate, identity, relu = inputs
    ctx.relu = relu
    ctx.identity_dtype = None if identity is None else identity.dtype
    # with the ReLU, its mask is read from the output (which the next
    # layer keeps anyway)
    ctx.save_for_backward(x, gate, output if relu else None)


def _excite_backward(ctx, grad: Tensor):
    x, gate, out = ctx.saved_tensors
    with_identity = ctx.identity_dtype is not None
    # with create_graph, the reference: x's gradient is then an excite,
    # which has a backward
    backward = reference_excite_backward if torch.is_grad_enabled() \
        else excite_backward
    grad_x, grad_gate, masked = backward(grad, x, gate,
                                         out if ctx.relu else None,
                                         with_identity)
    grad = masked if ctx.relu else grad
    grad_identity = grad.to(ctx.identity_dtype) if with_identity else None
    return grad_x, grad_gate, grad_identity, None


excite.register_autograd(_excite_backward, setup_context=_excite_setup)

# ---------------------------------------------------------------------------
# conv_gather


def _wide(t: Tensor) -> torch.dtype:
    """The dtype of :func:`conv_gather`'s statistics and arithmetic for an
    operand ``t``: float32, or float64 for float64."""
    return torch.promote_types(t.dtype, torch.float32)


def _level_norm(c: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                var: Tensor, eps: float, relu: bool) -> Tensor:
    """A gather level's batch norm (and ReLU) of its convolution ``c``,
    with float32 (float64) statistics, in ``c``'s dtype."""
    shape = (1, -1, 1, 1)
    scale = weight.to(_wide(c)) * torch.rsqrt(var + eps)
    y = (c.to(_wide(c)) - mean.view(shape)) * scale.view(shape) + \
        bias.to(_wide(c)).view(shape)
    y = y.to(c.dtype)
    return y.relu() if relu else y


def _gather_chain(x: Tensor, weights: List[Tensor], norm_weights: List[Tensor],
                  norm_biases: List[Tensor], running_means: List[Tensor],
                  running_vars: List[Tensor], training: bool, eps: float,
                  last_relu: bool) -> List[Tensor]:
    """:func:`conv_gather`'s formula in ATen operations (differentiable)."""
    y, means, variances, raws = x, [], [], []
    levels = len(weights)
    for i in range(levels):
        c = F.conv2d(y, weights[i].to(y.dtype), None, 2, 1, 1, y.shape[1])
        if training:
            var, mean = torch.var_mean(c.to(_wide(x)), dim=(0, 2, 3),
                                       correction=0)
        else:
            mean = running_means[i].to(_wide(x))
            var = running_vars[i].to(_wide(x))
        y = _level_norm(c, norm_weights[i], norm_biases[i], mean, var, eps,
                        i < levels - 1 or last_relu)
        means.append(mean)
        variances.append(var)
        raws.append(c)
    return [
        y.contiguous(memory_format=memory_format(x)),
        torch.stack(means),
        torch.stack(variances)
    ] + [c.contiguous(memory_format=memory_format(x)) for c in raws]


def check_levels(x: Tensor, weights: List[Tensor], norm_weights: List[Tensor],
                 norm_biases: List[Tensor], running_means: List[Tensor],
                 running_vars: List[Tensor]) -> None:
    """Refuse operands :func:`conv_gather` does not define."""
    c = x.shape[1] if x.dim() == 4 else -1
    lists = (weights, norm_weights, norm_biases, running_means, running_vars)
    if c < 0 or not weights or len({len(t) for t in lists}) != 1 or any(
            tuple(w.shape) != (c, 1, 3, 3) for w in weights) or any(
                tuple(t.shape) != (c, ) for ts in lists[1:] for t in ts):
        raise ValueError(
            f'mmge::conv_gather takes x (N, C, H, W) and, per level, a '
            f'depthwise weight (C, 1, 3, 3) and norm weight, bias, running '
            f'mean and running variance of shape (C,); got x '
            f'{tuple(x.shape)} and weights '
            f'{[tuple(w.shape) for w in weights]}')


def reference_conv_gather(x: Tensor, weights: List[Tensor],
                          norm_weights: List[Tensor],
                          norm_biases: List[Tensor],
                          running_means: List[Tensor],
                          running_vars: List[Tensor], training: bool,
                          eps: float, last_relu: bool) -> List[Tensor]:
    """GE-theta's local gather: levels of a depthwise 3x3 convolution of
    stride 2 and padding 1 (no bias), a batch norm and (on every level but
    the last, unless ``last_relu``) a ReLU.

    The batch norms use the batch's statistics when ``training`` (biased
    variance, as ``nn.BatchNorm2d`` normalises), else the running ones;
    the running statistics are not updated here (the caller does it from
    the returned statistics). The convolutions run in ``x``'s dtype with
    their weights rounded to it, as under autocast; the norms' arithmetic
    is float32, their outputs in ``x``'s dtype.

    Args:
        x (Tensor): (N, C, H, W).
        weights (list[Tensor]): Per level, the depthwise weight (C, 1, 3, 3).
        norm_weights (list[Tensor]): Per level, the norm's weight (C,).
        norm_biases (list[Tensor]): Per level, the norm's bias (C,).
        running_means (list[Tensor]): Per level, the running mean (C,).
        running_vars (list[Tensor]): Per level, the running variance (C,).
        training (bool): Normalise with the batch's statistics.
        eps (float): The norms' epsilon.
        last_relu (bool): A ReLU after the last level too.

    Returns:
        list[Tensor]: ``[context, mean, var, raw_1, ..., raw_L]``: the
        gather's output (N, C, ceil(H / 2^L), ceil(W / 2^L)) in ``x``'s
        layout; the statistics each level normalised with, float32 of shape
        (L, C); each level's convolution output, before its norm.
    """
    check_levels(x, weights, norm_weights, norm_biases, running_means,
                 running_vars)
    return _gather_chain(x, weights, norm_weights, norm_biases,
                         running_means, running_vars, training, eps,
                         last_relu)


conv_gather = torch.library.custom_op(
    'mmge::conv_gather', reference_conv_gather, mutates_args=())


def gathered_shapes(x: Tensor, levels: int) -> List[Tuple[int, ...]]:
    """The shapes of :func:`conv_gather`'s levels' outputs for ``x``."""
    n, c, h, w = x.shape
    shapes = []
    for _ in range(levels):
        h, w = pooled_size(h, 2), pooled_size(w, 2)
        shapes.append((n, c, h, w))
    return shapes


@conv_gather.register_fake
def _(x, weights, norm_weights, norm_biases, running_means, running_vars,
      training, eps, last_relu):
    check_levels(x, weights, norm_weights, norm_biases, running_means,
                 running_vars)
    fmt = memory_format(x)
    maps = [
        x.new_empty(s).contiguous(memory_format=fmt)
        for s in gathered_shapes(x, len(weights))
    ]
    stats = x.new_empty(len(weights), x.shape[1], dtype=_wide(x))
    return [maps[-1].clone(), stats, stats.clone()] + maps


def reference_conv_gather_backward(grad: Tensor, x: Tensor,
                                   weights: List[Tensor],
                                   norm_weights: List[Tensor],
                                   norm_biases: List[Tensor], mean: Tensor,
                                   var: Tensor, raws: List[Tensor],
                                   training: bool, eps: float,
                                   last_relu: bool,
                                   input_grad: bool) -> List[Tensor]:
    """The gradients of :func:`conv_gather`.

    Args:
        grad (Tensor): The context's gradient.
        x (Tensor): The gather's input.
        weights, norm_weights, norm_biases (list[Tensor]): As given to
            :func:`conv_gather`.
        mean, var (Tensor): The statistics it returned.
        raws (list[Tensor]): The levels' convolution outputs it returned.
        training, eps, last_relu: As given to :func:`conv_gather`.
        input_grad (bool): Compute ``x``'s gradient (else an empty tensor
            stands for it).

    Returns:
        list[Tensor]: ``[grad_x, grad_weight_1, ..., grad_weight_L,
        grad_norm_weight (L, C), grad_norm_bias (L, C)]``, the last two
        float32.
    """
    levels, dtype = len(weights), raws[0].dtype
    grad_ws, grad_gs, grad_bs = [], [], []
    dy = grad.to(_wide(x))
    for i in reversed(range(levels)):
        c = raws[i].to(_wide(x))
        shape = (1, -1, 1, 1)
        invstd = torch.rsqrt(var[i] + eps)
        xhat = (c - mean[i].view(shape)) * invstd.view(shape)
        if i < levels - 1 or last_relu:
            y = _level_norm(raws[i], norm_weights[i], norm_biases[i],
                            mean[i], var[i], eps, True)
            dy = torch.where(y > 0, dy, 0)
        s1 = dy.sum(dim=(0, 2, 3))
        s2 = (dy * xhat).sum(dim=(0, 2, 3))
        grad_gs.append(s2)
        grad_bs.append(s1)
        dc = dy
        if training:
            count = c.numel() // c.shape[1]
            dc = dy - (s1 / count).view(shape) - xhat * (s2 / count).view(
                shape)
        dc = (dc * (norm_weights[i].to(_wide(x)) * invstd).view(shape)).to(
            dtype)
        inp = x if i == 0 else _level_norm(
            raws[i - 1], norm_weights[i - 1], norm_biases[i - 1],
            mean[i - 1], var[i - 1], eps, True)
        need_input = i > 0 or input_grad
        grad_in, grad_w, _ = torch.ops.aten.convolution_backward(
            dc, inp.to(dtype), weights[i].to(dtype), None, [2, 2], [1, 1],
            [1, 1], False, [0, 0], inp.shape[1], [need_input, True, False])
        grad_ws.append(grad_w.to(weights[i].dtype))
        dy = grad_in.to(_wide(x)) if i > 0 else grad_in
    grad_x = dy.to(x.dtype).contiguous(memory_format=memory_format(x)) \
        if input_grad else x.new_empty(0)
    return [grad_x] + grad_ws[::-1] + [
        torch.stack(grad_gs[::-1]), torch.stack(grad_bs[::-1])
    ]


conv_gather_backward = torch.library.custom_op(
    'mmge::conv_gather_backward', reference_conv_gather_backward,
    mutates_args=())


@conv_gather_backward.register_fake
def _(grad, x, weights, norm_weights, norm_biases, mean, var, raws, training,
      eps, last_relu, input_grad):
    grad_x = torch.empty_like(x, memory_format=memory_format(x)) \
        if input_grad else x.new_empty(0)
    return [grad_x] + [torch.empty_like(w) for w in weights] + [
        torch.empty_like(mean), torch.empty_like(mean)]


def _conv_gather_setup(ctx, inputs, output) -> None:
    (x, weights, norm_weights, norm_biases, _, _, ctx.training, ctx.eps,
     ctx.last_relu) = inputs
    ctx.levels = len(weights)
    ctx.dtypes = [t.dtype for t in norm_weights], [
        t.dtype for t in norm_biases]
    ctx.save_for_backward(x, output[1], output[2], *weights, *norm_weights,
                          *norm_biases, *output[3:])


def _conv_gather_backward(ctx, grads):
    levels = ctx.levels
    x, mean, var, *rest = ctx.saved_tensors
    weights, norm_weights, norm_biases, raws = (
        rest[:levels], rest[levels:2 * levels], rest[2 * levels:3 * levels],
        rest[3 * levels:])
    out = conv_gather_backward(grads[0], x, weights, norm_weights,
                               norm_biases, mean, var, raws, ctx.training,
                               ctx.eps, ctx.last_relu,
                               ctx.needs_input_grad[0])
    grad_x = out[0] if ctx.needs_input_grad[0] else None
    g_dtypes, b_dtypes = ctx.dtypes
    return (grad_x, out[1:1 + levels],
            [g.to(d) for g, d in zip(out[1 + levels].unbind(), g_dtypes)],
            [g.to(d) for g, d in zip(out[2 + levels].unbind(), b_dtypes)],
            [None] * levels, [None] * levels, None, None, None)


conv_gather.register_autograd(_conv_gather_backward,
                              setup_context=_conv_gather_setup)

# ---------------------------------------------------------------------------
# global_gather


def check_global(x: Tensor, weight: Tensor) -> None:
    """Refuse operands :func:`global_gather` does not define."""
    if x.dim() != 4 or tuple(weight.shape) != (x.shape[1], 1,
                                               *x.shape[2:]):
        raise ValueError(
            f'mmge::global_gather takes x (N, C, H, W) and a depthwise '
            f'weight (C, 1, H, W) of the map\'s size; got x '
            f'{tuple(x.shape)} and weight {tuple(weight.shape)}')


def reference_global_gather(x: Tensor, weight: Tensor) -> Tensor:
    """The convolution of global-extent GE-theta's gather: a depthwise
    convolution whose kernel is the whole map (no padding, one output cell),
    in ``x``'s dtype with the weight rounded to it, as under autocast.

    Args:
        x (Tensor): (N, C, H, W).
        weight (Tensor): (C, 1, H, W).

    Returns:
        Tensor: (N, C, 1, 1), ``sum(x[n, c] * weight[c])``.
    """
    check_global(x, weight)
    return F.conv2d(x, weight.to(x.dtype), None, 1, 0, 1,
                    x.shape[1]).contiguous(memory_format=memory_format(x))


global_gather = torch.library.custom_op(
    'mmge::global_gather', reference_global_gather, mutates_args=())


@global_gather.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    check_global(x, weight)
    return x.new_empty(x.shape[0], x.shape[1], 1, 1).contiguous(
        memory_format=memory_format(x))


def reference_global_gather_backward(grad: Tensor, x: Tensor, weight: Tensor,
                                     input_grad: bool) -> List[Tensor]:
    """The gradients of :func:`global_gather`.

    Args:
        grad (Tensor): The output's gradient, (N, C, 1, 1).
        x (Tensor): The input.
        weight (Tensor): The weight.
        input_grad (bool): Compute ``x``'s gradient (else an empty tensor
            stands for it).

    Returns:
        list[Tensor]: ``[grad_x, grad_weight]``: ``grad[n, c] *
        weight[c]`` in ``x``'s dtype and layout, and ``sum_n grad[n, c] *
        x[n, c]`` in ``weight``'s dtype.
    """
    wide = torch.promote_types(x.dtype, torch.float32)
    g = grad.to(wide).reshape(grad.shape[0], grad.shape[1], 1, 1)
    grad_weight = (g * x.to(wide)).sum(0).to(weight.dtype).contiguous(
    ).view(weight.shape)
    if not input_grad:
        return [x.new_empty(0), grad_weight]
    grad_x = (g * weight.to(x.dtype).to(wide).transpose(0, 1)).to(
        x.dtype).contiguous(memory_format=memory_format(x))
    return [grad_x, grad_weight]


global_gather_backward = torch.library.custom_op(
    'mmge::global_gather_backward', reference_global_gather_backward,
    mutates_args=())


@global_gather_backward.register_fake
def _(grad, x, weight, input_grad):
    grad_x = torch.empty_like(x, memory_format=memory_format(x)) \
        if input_grad else x.new_empty(0)
    return [grad_x, torch.empty_like(weight)]


def _global_setup(ctx, inputs, output) -> None:
    x, weight = inputs
    ctx.save_for_backward(x, weight)


def _global_backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight = global_gather_backward(grad, x, weight,
                                                 ctx.needs_input_grad[0])
    return grad_x if ctx.needs_input_grad[0] else None, grad_weight


global_gather.register_autograd(_global_backward,
                                setup_context=_global_setup)

# ---------------------------------------------------------------------------
# block_tail


def check_block(x: Tensor, identity: Optional[Tensor], norm_weight: Tensor,
                norm_bias: Tensor, norm_mean: Optional[Tensor],
                norm_var: Optional[Tensor], norm_training: bool, extent: int,
                weights: List[Tensor], norm_weights: List[Tensor],
                norm_biases: List[Tensor], running_means: List[Tensor],
                running_vars: List[Tensor], mlp: List[Tensor]) -> None:
    """Refuse operands :func:`block_tail` does not define."""
    c = x.shape[1] if x.dim() == 4 else -1
    norm = [norm_weight, norm_bias] + ([] if norm_training else
                                       [norm_mean, norm_var])
    if c < 0 or any(t is None or tuple(t.shape) != (c, ) for t in norm):
        raise ValueError(
            f'mmge::block_tail takes x (N, C, H, W) and its batch norm\'s '
            f'weight and bias (and, without batch statistics, running mean '
            f'and variance) of shape (C,); got x {tuple(x.shape)} and '
            f'{[None if t is None else tuple(t.shape) for t in norm]}')
    if identity is not None and identity.shape != x.shape:
        raise ValueError(f'mmge::block_tail: identity must have the shape '
                         f'of x {tuple(x.shape)}, got '
                         f'{tuple(identity.shape)}')
    if weights:
        check_levels(x, weights, norm_weights, norm_biases, running_means,
                     running_vars)
    elif extent < 2:
        raise ValueError(f'mmge::block_tail without gather levels pools: '
                         f'extent must be >= 2, got {extent}')
    if len(mlp) not in (0, 4):
        raise ValueError(f'mmge::block_tail takes the MLP as [weight1, '
                         f'bias1, weight2, bias2] or [], got {len(mlp)} '
                         f'tensors')


def _block_forward(x, identity, norm_weight, norm_bias, norm_mean, norm_var,
                   norm_training, norm_eps, extent, weights, norm_weights,
                   norm_biases, running_means, running_vars, training, eps,
                   last_relu, mlp, mlp_relu, relu) -> List[Tensor]:
    """:func:`block_tail`'s formula in ATen operations (differentiable)."""
    wide = _wide(x)
    if norm_training:
        var, mean = torch.var_mean(x.to(wide), dim=(0, 2, 3), correction=0)
    else:
        mean, var = norm_mean.to(wide), norm_var.to(wide)
    y = _level_norm(x, norm_weight, norm_bias, mean, var, norm_eps, False)
    if weights:
        context, level_mean, level_var = _gather_chain(
            y, weights, norm_weights, norm_biases, running_means,
            running_vars, training, eps, last_relu)[:3]
    else:
        context = reference_pool_gather(y, extent)
        level_mean = level_var = x.new_empty(0, dtype=wide)
    gate = context
    if mlp:
        gate = F.conv2d(context, mlp[0], mlp[1])
        gate = F.conv2d(gate.relu() if mlp_relu else gate, mlp[2], mlp[3])
    # the op: differentiable (its reference writes into a new tensor)
    out = excite(y, gate.sigmoid(), identity, relu)
    return [out, mean, var, level_mean, level_var,
            context if mlp else x.new_empty(0)]


def reference_block_tail(x: Tensor, identity: Optional[Tensor],
                         norm_weight: Tensor, norm_bias: Tensor,
                         norm_mean: Optional[Tensor],
                         norm_var: Optional[Tensor], norm_training: bool,
                         norm_eps: float, extent: int, weights: List[Tensor],
                         norm_weights: List[Tensor],
                         norm_biases: List[Tensor],
                         running_means: List[Tensor],
                         running_vars: List[Tensor], training: bool,
                         eps: float, last_relu: bool, mlp: List[Tensor],
                         mlp_relu: bool, relu: bool) -> List[Tensor]:
    """The end of a residual block with GE: ``relu(y * resize(gate(y)) +
    identity)`` with ``y = batch_norm(x)``.

    The gate is ``sigmoid(context)``, or with ``mlp`` ``sigmoid(mlp(
    context))`` (GE-theta-plus); the context is :func:`conv_gather` of
    ``y`` given levels (GE-theta), else :func:`pool_gather` of ``y`` with
    ``extent`` (GE-theta-minus). The batch norms use the batch's statistics
    where told (``norm_training``, ``training``), else the running ones;
    no running statistic is updated here (the caller does it from the
    returned statistics).

    Args:
        x (Tensor): The block norm's input, (N, C, H, W).
        identity (Tensor, optional): The shortcut, of ``x``'s shape.
        norm_weight, norm_bias (Tensor): The block norm's affine, (C,).
        norm_mean, norm_var (Tensor, optional): Its running statistics,
            (C,); read only without ``norm_training``.
        norm_training (bool): The block norm uses the batch's statistics.
        norm_eps (float): Its epsilon.
        extent (int): The pool's extent ratio, without levels.
        weights, norm_weights, norm_biases, running_means, running_vars,
        training, eps, last_relu: The gather's levels, as
            :func:`conv_gather` takes them (all empty for a pool).
        mlp (list[Tensor]): ``[weight1, bias1, weight2, bias2]`` of the
            excite's two 1x1 convolutions, or empty.
        mlp_relu (bool): A ReLU between them.
        relu (bool): The block's ReLU after the sum.

    Returns:
        list[Tensor]: ``[out, mean, var, level_mean, level_var, context]``:
        the block's output in ``x``'s layout; the block norm's statistics
        (C,) and the levels' (L, C), float32 (empty for a pool); the
        context where there is an MLP (its backward reads it), else empty.
    """
    check_block(x, identity, norm_weight, norm_bias, norm_mean, norm_var,
                norm_training, extent, weights, norm_weights, norm_biases,
                running_means, running_vars, mlp)
    out = _block_forward(x, identity, norm_weight, norm_bias, norm_mean,
                         norm_var, norm_training, norm_eps, extent, weights,
                         norm_weights, norm_biases, running_means,
                         running_vars, training, eps, last_relu, mlp,
                         mlp_relu, relu)
    if not norm_training:  # an op's outputs do not alias its inputs
        out[1], out[2] = out[1].clone(), out[2].clone()
    return out


#: the compiler may hand the block ops their maps in either layout (the
#: kernels take both): its convolutions' layout, with no copies between
FLEXIBLE = (torch.Tag.flexible_layout, )

block_tail = torch.library.custom_op(
    'mmge::block_tail', reference_block_tail, mutates_args=(),
    tags=FLEXIBLE)


@block_tail.register_fake
def _(x, identity, norm_weight, norm_bias, norm_mean, norm_var,
      norm_training, norm_eps, extent, weights, norm_weights, norm_biases,
      running_means, running_vars, training, eps, last_relu, mlp, mlp_relu,
      relu):
    check_block(x, identity, norm_weight, norm_bias, norm_mean, norm_var,
                norm_training, extent, weights, norm_weights, norm_biases,
                running_means, running_vars, mlp)
    n, c = x.shape[:2]
    wide = _wide(x)
    if weights:
        small = gathered_shapes(x, len(weights))[-1]
        stats = x.new_empty(len(weights), c, dtype=wide)
    else:
        small = (n, c, pooled_size(x.shape[2], extent),
                 pooled_size(x.shape[3], extent))
        stats = x.new_empty(0, dtype=wide)
    context = x.new_empty(small).contiguous(
        memory_format=torch.channels_last) if mlp else x.new_empty(0)
    return [torch.empty_like(x, memory_format=memory_format(x)),
            x.new_empty(c, dtype=wide), x.new_empty(c, dtype=wide), stats,
            stats.clone(), context]


def reference_block_tail_backward(
        grad: Tensor, x: Tensor, out: Optional[Tensor], norm_weight: Tensor,
        norm_bias: Tensor, mean: Tensor, var: Tensor, norm_training: bool,
        norm_eps: float, extent: int, weights: List[Tensor],
        norm_weights: List[Tensor], norm_biases: List[Tensor],
        level_mean: Tensor, level_var: Tensor, training: bool, eps: float,
        last_relu: bool, mlp: List[Tensor], mlp_relu: bool,
        context: Tensor) -> List[Tensor]:
    """The gradients of :func:`block_tail`: its formula run again from
    ``x`` (with the same statistics) and differentiated.

    Args:
        grad (Tensor): The output's gradient.
        x (Tensor): The block norm's input.
        out (Tensor, optional): The output, where the block's ReLU ran: its
            sign masks ``grad``.
        norm_weight, norm_bias: As given to :func:`block_tail`.
        mean, var (Tensor): The block norm's statistics it returned.
        norm_training, norm_eps, extent, weights, norm_weights,
        norm_biases: As given to :func:`block_tail`.
        level_mean, level_var (Tensor): The levels' statistics it returned.
        training, eps, last_relu, mlp, mlp_relu: As given to
            :func:`block_tail`.
        context (Tensor): The context it returned (read by the CPU kernel).

    Returns:
        list[Tensor]: ``[grad_x, grad_identity, grad_norm_weight,
        grad_norm_bias, *grad_weights, *grad_norm_weights,
        *grad_norm_biases, *grad_mlp]``; ``grad_identity`` is ``grad``
        masked by the ReLU, or empty without ``out`` (it is ``grad``).
    """
    if out is not None:
        grad = torch.where(out > 0, grad, 0)
    inputs = [x, norm_weight, norm_bias, *weights, *norm_weights,
              *norm_biases, *mlp]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        lx, lw, lb = leaves[:3]
        levels = len(weights)
        lws, lgs, lbs = (leaves[3:3 + levels],
                         leaves[3 + levels:3 + 2 * levels],
                         leaves[3 + 2 * levels:3 + 3 * levels])
        product = _block_forward(
            lx, None, lw, lb, mean, var, norm_training, norm_eps, extent,
            lws, lgs, lbs, list(level_mean), list(level_var), training, eps,
            last_relu, leaves[3 + 3 * levels:], mlp_relu, False)[0]
    grads = torch.autograd.grad(product, leaves, grad, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g.to(t.dtype)
             for g, t in zip(grads, inputs)]
    fmt = memory_format(x)
    masked = grad.contiguous(memory_format=fmt) if out is not None else \
        x.new_empty(0)
    return [grads[0].contiguous(memory_format=fmt), masked] + grads[1:]


block_tail_backward = torch.library.custom_op(
    'mmge::block_tail_backward', reference_block_tail_backward,
    mutates_args=(), tags=FLEXIBLE)


@block_tail_backward.register_fake
def _(grad, x, out, norm_weight, norm_bias, mean, var, norm_training,
      norm_eps, extent, weights, norm_weights, norm_biases, level_mean,
      level_var, training, eps, last_relu, mlp, mlp_relu, context):
    fmt = memory_format(x)
    masked = torch.empty_like(x, memory_format=fmt) if out is not None \
        else x.new_empty(0)
    return [torch.empty_like(x, memory_format=fmt), masked] + [
                torch.empty_like(t) for t in (norm_weight, norm_bias,
                                              *weights, *norm_weights,
                                              *norm_biases, *mlp)]


def _block_setup(ctx, inputs, output) -> None:
    (x, identity, norm_weight, norm_bias, _, _, ctx.norm_training,
     ctx.norm_eps, ctx.extent, weights, norm_weights, norm_biases, _, _,
     ctx.training, ctx.eps, ctx.last_relu, mlp, ctx.mlp_relu,
     ctx.relu) = inputs
    ctx.counts = len(weights), len(mlp)
    ctx.identity_dtype = None if identity is None else identity.dtype
    ctx.save_for_backward(x, output[0] if ctx.relu else None, norm_weight,
                          norm_bias, *output[1:], *weights, *norm_weights,
                          *norm_biases, *mlp)


def _block_backward(ctx, grads):
    levels, hidden = ctx.counts
    (x, out, norm_weight, norm_bias, mean, var, level_mean, level_var,
     context, *rest) = ctx.saved_tensors
    weights, norm_weights, norm_biases, mlp = (
        rest[:levels], rest[levels:2 * levels], rest[2 * levels:3 * levels],
        rest[3 * levels:])
    g = block_tail_backward(
        grads[0], x, out, norm_weight, norm_bias, mean, var,
        ctx.norm_training, ctx.norm_eps, ctx.extent, weights, norm_weights,
        norm_biases, level_mean, level_var, ctx.training, ctx.eps,
        ctx.last_relu, mlp, ctx.mlp_relu, context)
    grad_identity = None if ctx.identity_dtype is None else (
        g[1] if ctx.relu else grads[0]).to(ctx.identity_dtype)
    k = 4 + 3 * levels
    return (g[0], grad_identity, g[2], g[3], None, None, None, None, None,
            g[4:4 + levels], g[4 + levels:4 + 2 * levels],
            g[4 + 2 * levels:k], [None] * levels, [None] * levels, None,
            None, None, g[k:], None, None)


block_tail.register_autograd(_block_backward, setup_context=_block_setup)
