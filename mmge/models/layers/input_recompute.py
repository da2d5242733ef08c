"""GE on autograd that keeps the gather's small maps and makes GE's input
again in backward.

The default mode's path where the native CPU kernels do not run (CUDA,
autocast, float64) after a plain batch norm: ``x = norm(inp)`` feeds GE,
and the network keeps ``inp`` anyway (the norm's autograd saves it). Of
everything autograd would keep for GE, only two tensors are full-resolution
copies of ``x``: the input of the gather's first operation (a strided
depthwise convolution, or GE-theta-minus's pooling) and the multiplicand of
the excite. Here those two operations save ``inp`` instead, and the first
of their backwards to run makes ``x`` once more from it, for both: one
pass with the norm's statistics from the forward (or, where hooks watch
the norm, a call of the norm that writes no running statistics).
Everything else is plain autograd: the gather's levels, at 1/2 resolution
and below, keep their maps (about 0.66 of ``x``'s size for three levels;
on the ``mmge::conv_gather`` op, :class:`GatherOfRecomputed`, only their
convolutions' outputs, about 0.33). So a layer costs about the operations
of the formula as written, and keeps neither ``x`` nor a resized gate.
:class:`~.ge_autograd.GEFunction` (the memory-saving mode) keeps nothing
and makes the whole gather again instead.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ...ops import cpu_kernels, ge_ops
from . import gather_op
from .batch_norm import (batch_norm_again, is_plain_batch_norm,
                         norm_with_state)
from .depthwise_conv import (convolution_backward, cpu_batch_step,
                             is_plain_conv)
from .args import GLOBAL
from .gather import ConvGather, PoolGather
from .ge_autograd import autocast_as, autocast_state, call_frozen


class RecomputedInput:
    """GE's input ``x = norm(inp)``, made again in backward.

    Shared by the operations of one layer call that read ``x`` in their
    backward: the first to ask makes it, the last (:meth:`release`) lets it
    go. Build it with :meth:`run`, which also runs the norm.

    Args:
        norm (nn.Module): The norm; without ``state`` it runs again (its
            running statistics left alone).
        dtype (torch.dtype): ``x``'s dtype.
        state (dict, optional): :func:`~.batch_norm.batch_norm_forward`'s
            state of this call, whose statistics make ``x`` again.
        device_type (str): ``inp``'s device type, for the forward's
            autocast (without ``state``).
    """

    def __init__(self,
                 norm: nn.Module,
                 dtype: torch.dtype,
                 state: Optional[dict] = None,
                 device_type: str = 'cpu') -> None:
        self.norm, self.dtype, self.state = norm, dtype, state
        # the norm's call again runs under the forward's autocast
        self.autocast = None if state is not None else (
            device_type, autocast_state(device_type))
        self.value: Optional[torch.Tensor] = None

    @classmethod
    def run(cls, norm: nn.Module,
            inp: torch.Tensor) -> Tuple[torch.Tensor, 'RecomputedInput']:
        """``x = norm(inp)`` on autograd, and how to make it again.

        Without hooks on ``norm`` it runs as
        :func:`~.batch_norm.batch_norm_forward` (what its forward does),
        whose batch statistics then make ``x`` again in one pass; with
        hooks the module is called, and the backward calls it again
        (:func:`~.batch_norm.norm_with_state`).

        Args:
            norm (nn.Module): A plain batch norm.
            inp (Tensor): Its input.

        Returns:
            tuple[Tensor, RecomputedInput]: ``x`` and its maker.
        """
        x, state = norm_with_state(norm, inp)
        return x, cls(norm, x.dtype, state, inp.device.type)

    def get(self, inp: torch.Tensor) -> torch.Tensor:
        """``norm(inp)`` as the forward made it, without writing the
        norm's running statistics (made once, then kept until
        :meth:`release`).

        Args:
            inp (Tensor): The norm's input.

        Returns:
            Tensor: ``x``.
        """
        if self.value is None:
            self.value = self.make(inp)
        return self.value

    def make(self, inp: torch.Tensor) -> torch.Tensor:
        """``x`` from ``inp``: one pass with the forward's statistics, or
        the norm run again.

        Args:
            inp (Tensor): The norm's input.

        Returns:
            Tensor: ``x``, in the forward's dtype and ``inp``'s layout.
        """
        if self.state is not None:
            return batch_norm_again(self.norm, self.state, inp, self.dtype)
        with torch.no_grad(), autocast_as(*self.autocast):
            return call_frozen(self.norm, inp)

    def release(self) -> None:
        """Let the kept ``x`` go."""
        self.value = None


class ExciteOfRecomputed(torch.autograd.Function):
    """``x * resize(gate) (+ identity)``, then a ReLU when asked, saving
    ``inp`` and the small gate (and with the ReLU its output, which the
    next layer keeps anyway).

    ``apply(x, gate, identity, inp, source, relu)``, ``source`` the layer
    call's :class:`RecomputedInput`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor,
                identity: Optional[torch.Tensor], inp: torch.Tensor,
                source: RecomputedInput, relu: bool) -> torch.Tensor:
        ctx.source, ctx.relu = source, relu
        ctx.with_identity = identity is not None
        ctx.dtypes = x.dtype, None if identity is None else identity.dtype
        out = ge_ops.excite(x, gate, identity, relu)
        ctx.save_for_backward(inp, gate, out if relu else None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        inp, gate, out = ctx.saved_tensors
        x_dtype, identity_dtype = ctx.dtypes
        # runs before the gather's first backward, which reuses x
        x = ctx.source.get(inp)
        grad_x, grad_gate, masked = ge_ops.excite_backward(
            grad, x, gate, out if ctx.relu else None, ctx.with_identity)
        grad_identity = None
        if ctx.with_identity and ctx.needs_input_grad[2]:
            grad_identity = (masked if ctx.relu else grad).to(identity_dtype)
        return grad_x.to(x_dtype), grad_gate, grad_identity, None, None, None


class ConvOfRecomputed(torch.autograd.Function):
    """The gather's first convolution of ``x``, saving ``inp``.

    ``apply(x, weight, inp, source, conv, step)``: ``conv`` is the
    ``nn.Conv2d`` (its stride, padding, dilation and groups; no bias) whose
    ``weight`` is passed so that autograd hands its gradient on; ``step``
    is :func:`~.depthwise_conv.cpu_batch_step` of ``x``, for the backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,
                inp: torch.Tensor, source: RecomputedInput, conv: nn.Conv2d,
                step: Optional[int]) -> torch.Tensor:
        ctx.source, ctx.conv, ctx.step = source, conv, step
        ctx.whole = gather_op.whole_map(conv, x)
        if ctx.whole:  # the global extent's, on its op
            out = ge_ops.global_gather(gather_op.compute_input(x), weight)
        else:
            out = F.conv2d(x, weight, None, conv.stride, conv.padding,
                           conv.dilation, conv.groups)
        # the dtype the convolution ran in (bfloat16 under autocast)
        ctx.dtype = out.dtype
        ctx.save_for_backward(inp, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        inp, weight = ctx.saved_tensors
        source, conv = ctx.source, ctx.conv
        x = source.get(inp)
        source.release()
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False]
        if ctx.whole:
            grad_x, grad_weight = ge_ops.global_gather_backward(
                grad, x.to(ctx.dtype), weight, mask[0])
            grad_x = grad_x if mask[0] else None
        else:
            grad_x, grad_weight = convolution_backward(
                grad, x.to(ctx.dtype), weight, conv, mask, ctx.step)
        return (None if grad_x is None else grad_x.to(x.dtype), grad_weight,
                None, None, None, None)


class PoolOfRecomputed(torch.autograd.Function):
    """GE-theta-minus's local pooling of ``x``, saving ``inp`` (the pool's
    backward reads only ``x``'s shape and layout, but the op takes ``x``).

    ``apply(x, inp, source, extent)``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, inp: torch.Tensor,
                source: RecomputedInput, extent: int) -> torch.Tensor:
        ctx.source, ctx.extent = source, extent
        ctx.save_for_backward(inp)
        return ge_ops.pool_gather(x, extent)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        inp, = ctx.saved_tensors
        x = ctx.source.get(inp)
        ctx.source.release()
        return ge_ops.pool_gather_backward(grad, x, ctx.extent), None, \
            None, None


class GatherOfRecomputed(torch.autograd.Function):
    """GE-theta's gather on the ``mmge::conv_gather`` op, saving ``inp``
    and the levels' maps (1/4 of ``x``'s size and below).

    ``apply(x, inp, source, args, *params)``: ``args`` is
    :func:`~.gather_op.op_args`' answer, ``params`` its weights, norm
    weights and norm biases (so that autograd hands their gradients on).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, inp: torch.Tensor,
                source: RecomputedInput, args: gather_op.OpArgs,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.source, ctx.args = source, args
        x = gather_op.compute_input(x)
        out = ge_ops.conv_gather(x, *args[:-1])
        gather_op.update(args, x, out[1], out[2])
        ctx.dtype = x.dtype
        ctx.save_for_backward(inp, *params, *out[1:])
        return out[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        args, levels = ctx.args, len(ctx.args.weights)
        inp, *saved = ctx.saved_tensors
        params, (mean, var), raws = saved[:3 * levels], saved[
            3 * levels:3 * levels + 2], saved[3 * levels + 2:]
        x = ctx.source.get(inp)
        ctx.source.release()
        out = ge_ops.conv_gather_backward(
            grad, x.to(ctx.dtype), params[:levels],
            params[levels:2 * levels], params[2 * levels:], mean, var, raws,
            args.training, args.eps, args.last_relu,
            ctx.needs_input_grad[0])
        grad_x = out[0].to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_norm = [
            g.to(p.dtype) for g, p in zip(
                [*out[1 + levels].unbind(), *out[2 + levels].unbind()],
                params[levels:])
        ]
        return (grad_x, None, None, None, *out[1:1 + levels], *grad_norm)


def first_conv(gather: nn.Module) -> Optional[nn.Module]:
    """The first level of a :class:`ConvGather` whose convolution
    :class:`ConvOfRecomputed` can run: a ``ConvModule`` in the order conv,
    norm, act with an ``nn.Conv2d`` without bias, zero padding and no
    explicit padding layer; else None."""
    m = gather.convs[0]
    conv = m._modules.get('conv')
    if tuple(m.order) == ('conv', 'norm', 'act') and \
            not m.with_explicit_padding and is_plain_conv(conv) and \
            conv.bias is None and conv.padding_mode == 'zeros' and \
            isinstance(conv.padding, tuple):
        return m
    return None


def usable(layer: nn.Module, norm: Optional[nn.Module],
           inp: torch.Tensor) -> bool:
    """Whether :func:`forward` runs this layer call: a plain batch norm
    (:func:`is_plain_batch_norm`), a 4-d input that the native CPU kernels
    do not read (:func:`cpu_kernels.maps_usable`: where
    they do, :class:`~.ge_autograd.GEFunction` runs the parts it can on
    them), a :class:`PoolGather` or a :class:`ConvGather` with a
    :func:`first_conv`, and no forward hook on the gather or the excite
    (the gather's first level and the excite are not called as modules
    here)."""
    gather = layer.gather
    return inp.dim() == 4 and is_plain_batch_norm(norm) and (
        isinstance(gather, PoolGather) or (isinstance(gather, ConvGather)
                                           and first_conv(gather) is not None)
    ) and not cpu_kernels.maps_usable(inp) and \
        not cpu_kernels.hooked(gather, layer.excite)


def forward(layer: nn.Module,
            norm: nn.Module,
            inp: torch.Tensor,
            identity: Optional[torch.Tensor],
            relu: bool = False) -> torch.Tensor:
    """``x * resize(gate(x)) (+ identity)`` with ``x = norm(inp)``, then a
    ReLU when asked (in the same pass), on autograd, keeping no
    full-resolution copy of ``x``.

    Args:
        layer (nn.Module): The GE layer (:func:`usable`).
        norm (nn.Module): The plain batch norm feeding it.
        inp (Tensor): The norm's input, (N, C, H, W).
        identity (Tensor, optional): The shortcut, of ``inp``'s shape.
        relu (bool): Then the block's ReLU. Defaults to False.

    Returns:
        Tensor: The gated features (plus ``identity``, then the ReLU).
    """
    gather = layer.gather
    x, source = RecomputedInput.run(norm, inp)
    args = gather_op.op_args(gather, x) if isinstance(
        gather, ConvGather) else None
    if isinstance(gather, PoolGather):
        if gather.extent == GLOBAL:
            context = x.mean(dim=(2, 3), keepdim=True)  # saves no input
        else:
            context = PoolOfRecomputed.apply(x, inp, source, gather.extent)
    elif args is not None:
        # the op: one pass over x, the levels' maps kept
        context = GatherOfRecomputed.apply(x, inp, source, args,
                                           *args.weights, *args.norm_weights,
                                           *args.norm_biases)
    else:
        first = first_conv(gather)
        context = ConvOfRecomputed.apply(x, first.conv.weight, inp, source,
                                         first.conv,
                                         cpu_batch_step(x))
        context = first.norm(context)
        if first.with_activation:
            context = first.activate(context)
        context = gather.convs[1:](context)
    gate = layer.excite.gate(context)
    return ExciteOfRecomputed.apply(x, gate, identity, inp, source, relu)
