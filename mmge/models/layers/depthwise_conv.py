"""The gather's depthwise convolution, whose CPU backward in bfloat16 or
float16 runs in float32.

ATen's CPU backward of a depthwise convolution in bfloat16 takes 8-30 times
as long as the same call in float32 (torch 2.13, ResNet-50's GE-theta maps
at batch 4), while its forward is as fast
as float32's. Under CPU autocast that backward was most of GE-theta's cost
in a training step. :class:`GatherConv2d` is the ``nn.Conv2d`` that
:class:`~.gather.ConvGather` builds: the same parameters, state dict and
forward values; on the CPU in a low-precision dtype its backward widens the
gradient, input and weight to float32, runs there, and returns the
gradients in the dtypes autograd would have given.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch.autograd.function import once_differentiable

#: dtypes whose CPU depthwise backward runs in float32 here
LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of ``x`` runs in: CPU autocast's where it is
    on (``conv2d`` is on its lower-precision list), else ``x``'s own.

    Args:
        x (Tensor): The convolution's input, on the CPU.

    Returns:
        torch.dtype: The dtype.
    """
    if torch.is_autocast_enabled('cpu') and x.is_floating_point():
        return torch.get_autocast_dtype('cpu')
    return x.dtype


def cpu_batch_step(x: torch.Tensor) -> Optional[int]:
    """How many samples of ``x`` each call of a gather convolution (forward
    or backward) takes on the CPU, or None for one call: the CPU depthwise
    convolution's input gradient slows down several times once a call
    outgrows :attr:`GatherConv2d.cpu_chunk` input elements (ResNet-50's
    first stage at batch 4).

    Args:
        x (Tensor): The convolution's input, (N, C, H, W).

    Returns:
        int | None: Samples per call; None off the CPU, for a batch of one,
        for a call within :attr:`GatherConv2d.cpu_chunk`, and while
        tracing or compiling.
    """
    if x.device.type != 'cpu' or x.dim() != 4 or x.shape[0] < 2 or \
            x.numel() <= GatherConv2d.cpu_chunk or \
            torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    return max(1, GatherConv2d.cpu_chunk // x[0].numel())


def convolution_backward(grad: torch.Tensor, x: torch.Tensor,
                         weight: torch.Tensor, conv: nn.Conv2d, mask: list,
                         step: Optional[int] = None) -> tuple:
    """The input's and the weight's gradients of ``conv``'s convolution
    (without bias) of ``x``, where ``mask`` asks for them.

    The convolution ran in ``x``'s dtype, with ``weight`` rounded to it (as
    autocast does). On the CPU in bfloat16 or float16 the gradients are
    computed in float32.

    Args:
        grad (Tensor): The output's gradient.
        x (Tensor): The input the forward convolved, in the dtype it ran in.
        weight (Tensor): The layer's weight, in its own dtype.
        conv (nn.Conv2d): The layer (its stride, padding, dilation and
            groups).
        mask (list[bool]): ``[input, weight, bias]`` gradients wanted (the
            bias's must be False).
        step (int, optional): Samples per call
            (:func:`cpu_batch_step`, as the forward ran);
            None for one call.

    Returns:
        tuple: ``(grad_x, grad_weight)`` in ``x``'s and ``weight``'s dtypes,
        None where not asked for.
    """
    x_dtype, w_dtype = x.dtype, weight.dtype
    widen = x.device.type == 'cpu' and x_dtype in LOW_PRECISION and \
        GatherConv2d.cpu_wide_backward
    # the weight as the forward rounded it
    weight = weight.to(x_dtype).to(torch.float32 if widen else x_dtype)

    def run(g, inp):
        # a part at a time: its float32 copies stay small
        g, inp = (g.float(), inp.float()) if widen else (g.to(x_dtype), inp)
        return torch.ops.aten.convolution_backward(
            g, inp, weight, None, conv.stride, conv.padding, conv.dilation,
            False, [0, 0], conv.groups, mask)[:2]

    if step is None:
        grad_x, grad_weight = run(grad, x)
        grad_x = None if grad_x is None else grad_x.to(x_dtype)
    else:
        grad_x = torch.empty_like(x) if mask[0] else None
        grad_weights = []
        for i, (g, inp) in enumerate(zip(grad.split(step), x.split(step))):
            part_x, part_weight = run(g, inp)
            if grad_x is not None:
                grad_x[i * step:(i + 1) * step].copy_(part_x)
            grad_weights.append(part_weight)
        grad_weight = torch.stack(grad_weights).sum(0) if mask[1] else None
    return grad_x, None if grad_weight is None else grad_weight.to(w_dtype)


class WideBackwardConv(torch.autograd.Function):
    """A convolution without bias in the dtype :func:`compute_dtype` gives,
    whose backward runs in float32 (:func:`convolution_backward`).

    ``apply(x, weight, conv)``: ``conv`` is the ``nn.Conv2d`` (its stride,
    padding, dilation and groups) whose ``weight`` is passed so that
    autograd hands its gradient on.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,
                conv: nn.Conv2d) -> torch.Tensor:
        dtype = compute_dtype(x)
        # autocast's casts, made here so that the tensors the convolution
        # read are the ones saved (no copy where x has the dtype already)
        ctx.conv, ctx.in_dtype = conv, x.dtype
        x = x.to(dtype)
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight.to(dtype), None, conv.stride, conv.padding,
                        conv.dilation, conv.groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False]
        grad_x, grad_weight = convolution_backward(grad, x, weight, ctx.conv,
                                                   mask)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.in_dtype)  # the input's, before the cast
        return grad_x, grad_weight, None


@MODELS.register_module()
class GatherConv2d(nn.Conv2d):
    """``nn.Conv2d`` with two CPU workarounds of ATen's depthwise
    convolution: a batch too large for the cache runs in parts, and a
    backward in low precision runs in float32.

    The gather's depthwise convolutions are built as this class. On the
    CPU a call of more than :attr:`cpu_chunk` input elements runs on parts
    of the batch (:func:`cpu_batch_step`; the backward too). Where a call
    runs on the CPU without bias and zero padding, in bfloat16 or float16
    (autocast's or the tensors' own, :func:`compute_dtype`), with autograd
    recording, it runs as :class:`WideBackwardConv`: the same forward, and
    a backward in float32. Anywhere else (the GPU, tracing,
    ``torch.compile``) it is ``nn.Conv2d``. Parameters and state dict are
    ``nn.Conv2d``'s.
    """

    #: run the CPU's low-precision backward in float32 (tools that count
    #: the GPU's operations on the CPU switch it off)
    cpu_wide_backward = True
    #: input elements per call on the CPU (:func:`cpu_batch_step`)
    cpu_chunk = 2**20

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
        step = cpu_batch_step(input)
        if step is None:
            return self._conv_call(input, weight, bias)
        return torch.cat([self._conv_call(part, weight, bias)
                          for part in input.split(step)])

    def _conv_call(self, input: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.cpu_wide_backward and input.device.type == 'cpu' and \
                bias is None and \
                self.padding_mode == 'zeros' and \
                isinstance(self.padding, tuple) and \
                torch.is_grad_enabled() and \
                (input.requires_grad or weight.requires_grad) and \
                not torch.jit.is_tracing() and \
                not torch.compiler.is_compiling() and \
                compute_dtype(input) in LOW_PRECISION and \
                (torch.is_autocast_enabled('cpu')
                 or input.dtype == weight.dtype):
            return WideBackwardConv.apply(input, weight, self)
        return super()._conv_forward(input, weight, bias)


def is_plain_conv(conv: Optional[nn.Module]) -> bool:
    """Whether ``conv`` is an ``nn.Conv2d`` or a :class:`GatherConv2d`
    (the same convolution), not another subclass.

    Args:
        conv (nn.Module, optional): The layer.

    Returns:
        bool: True for those two types.
    """
    return type(conv) in (nn.Conv2d, GatherConv2d)
