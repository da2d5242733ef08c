"""Excite operators of Gather-Excite (Hu et al., NeurIPS 2018, Sec. 2).

The excite operator ``xi_E(x, g) = x * f(g)`` rescales the features ``x`` by a
gate ``f(g)`` in [0, 1] computed from the gathered context ``g`` and brought
back to the size of ``x`` by nearest-neighbour interpolation.
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule


def check_reduction(reduction: int) -> int:
    """Validate a channel reduction ratio.

    Args:
        reduction (int): Ratio >= 1.

    Returns:
        int: ``reduction`` unchanged.

    Raises:
        TypeError: If ``reduction`` is not an int.
        ValueError: If ``reduction`` < 1.
    """
    if isinstance(reduction, bool) or not isinstance(reduction, int):
        raise TypeError(f'reduction must be an int >= 1 (the paper uses 16), '
                        f'got {reduction!r}')
    if reduction < 1:
        raise ValueError(f'reduction must be an int >= 1 (the paper uses 16), '
                         f'got {reduction}')
    return reduction


def check_channels(channels: int, name: str = 'in_channels') -> int:
    """Validate a channel count.

    Args:
        channels (int): Number of channels, >= 1.
        name (str): The argument's name, for the error message.

    Returns:
        int: ``channels`` unchanged.

    Raises:
        ValueError: If ``channels`` is not a positive int.
    """
    if isinstance(channels, bool) or not isinstance(channels,
                                                    int) or channels < 1:
        raise ValueError(f'{name} must be a positive int, got {channels!r}')
    return channels


@functools.lru_cache(maxsize=256)
def block_factor(out_size: int, in_size: int, double: bool = False) -> int:
    """How PyTorch's nearest resize maps ``in_size`` cells to ``out_size``.

    Args:
        out_size (int): Output length.
        in_size (int): Input length.
        double (bool): For float64 tensors, whose resize computes its
            indices in double precision (others use float32).

    Returns:
        int: ``s`` when output cell ``j`` takes input cell ``j // s`` (every
        input cell repeated ``s`` times, so the resize is a broadcast over a
        reshaped tensor), else 0. Decided by running ``F.interpolate``
        itself on an index ramp, so it agrees with it bit for bit
        (memoised: a pure function of its arguments).
    """
    if out_size == in_size:
        return 1
    if out_size % in_size:
        return 0
    s = out_size // in_size
    return s if torch.equal(
        nearest_index(out_size, in_size, double=double),
        torch.arange(out_size) // s) else 0


def nearest_index(out_size: int,
                  in_size: int,
                  device: Optional[torch.device] = None,
                  double: bool = False) -> torch.Tensor:
    """Input cell of each output cell of PyTorch's nearest resize.

    Args:
        out_size (int): Output length.
        in_size (int): Input length.
        device (torch.device, optional): Device of the result.
        double (bool): For float64 tensors (see :func:`block_factor`).

    Returns:
        Tensor: int64 indices of shape (out_size, ), exactly those
        ``F.interpolate(mode='nearest')`` uses, made on ``device`` (no copy
        from the host: on a GPU that would wait for the stream).
    """
    if device is None or torch.device(device).type == 'cpu':
        return _nearest_index_cpu(out_size, in_size, double)
    return _resize_ramp(out_size, in_size, double, device)


def _resize_ramp(out_size: int, in_size: int, double: bool,
                 device: Optional[torch.device]) -> torch.Tensor:
    """``F.interpolate`` of the ramp 0..in_size-1 to ``out_size``."""
    dtype = torch.float64 if double else torch.float32
    ramp = torch.arange(in_size, dtype=dtype, device=device).view(1, 1, 1, -1)
    index = F.interpolate(ramp, size=(1, out_size), mode='nearest')
    return index.view(-1).long()


@functools.lru_cache(maxsize=256)
def _nearest_index_cpu(out_size: int, in_size: int,
                       double: bool) -> torch.Tensor:
    """:func:`nearest_index` on the CPU, memoised (a pure function of its
    arguments; callers only read the result)."""
    return _resize_ramp(out_size, in_size, double, None)


def _widen(gate: torch.Tensor, width: int) -> torch.Tensor:
    """Nearest-resize the last dim of a small gate to ``width``."""
    w = gate.shape[-1]
    double = gate.dtype == torch.float64
    s = block_factor(width, w, double)
    if s == 1:
        return gate
    if s:
        return gate.repeat_interleave(s, dim=-1)
    return gate.index_select(
        -1, nearest_index(width, w, gate.device, double))


def _product_dtype(x: torch.Tensor, gate: torch.Tensor,
                   identity: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype of ``x * gate (+ identity)``."""
    dtype = torch.result_type(x, gate)
    if identity is not None:
        dtype = torch.promote_types(dtype, identity.dtype)
    return dtype


def resize_multiply(x: torch.Tensor,
                    gate: torch.Tensor,
                    identity: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x * F.interpolate(gate, size=x.shape[-2:], mode='nearest')``, plus
    ``identity`` when given, without building the full-size gate when the
    sizes allow.

    Where every gate cell covers the same number of rows and columns of a
    channels-last ``x``, the product is a broadcast of the gate over ``x``
    viewed as (N, C, h, H / h, w, W / w). Otherwise the gate is widened to
    ``x``'s width (a tensor ``H / h`` times smaller than ``x``); when every
    gate row covers the same number of rows of ``x`` the product is a
    broadcast over ``x`` viewed as (N, C, h, H / h, W), else the gate is
    also resized in height. The residual add, when given, happens in the
    same pass (``addcmul``).

    Args:
        x (Tensor): Features (N, C, H, W).
        gate (Tensor): Gate (N, C, h, w), h <= H and w <= W.
        identity (Tensor, optional): Tensor of ``x``'s shape to add.

    Returns:
        Tensor: Shape (N, C, H, W).
    """
    n, c, height, width = x.shape
    h, w = gate.shape[-2:]
    if (h, w) == (1, 1):
        return x * gate if identity is None else torch.addcmul(
            identity, x, gate)
    double = gate.dtype == torch.float64
    sh, sw = block_factor(height, h, double), block_factor(width, w, double)
    if sh and sw and channels_last(x):
        # x as (N, C, h, sh, w, sw) is a view of channels-last memory, and
        # a channels-last gate broadcasts over it with the channels
        # innermost in both: a vectorised pass, where the widened gate's
        # other layout makes ATen's broadcast several times slower
        shape = (n, c, h, sh, w, sw)
        gate = gate.contiguous(
            memory_format=torch.channels_last)[:, :, :, None, :, None]
        out = torch.empty_like(x, dtype=_product_dtype(x, gate, identity))
        if identity is None:
            torch.mul(x.view(shape), gate, out=out.view(shape))
        else:
            torch.addcmul(identity.reshape(shape), x.view(shape), gate,
                          out=out.view(shape))
        return out
    gate = _widen(gate, width)
    if not sh:
        gate = gate.index_select(
            -2, nearest_index(height, h, gate.device, double))
        return x * gate if identity is None else torch.addcmul(
            identity, x, gate)
    if not (x.is_contiguous()
            or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    # written through a 5-d view of a fresh 4-d tensor, which is returned
    out = torch.empty_like(x, dtype=_product_dtype(x, gate, identity))
    shape = (n, c, h, sh, width)
    if identity is None:
        torch.mul(x.view(shape), gate.unsqueeze(3), out=out.view(shape))
    else:
        torch.addcmul(identity.reshape(shape), x.view(shape),
                      gate.unsqueeze(3), out=out.view(shape))
    return out


def resize_multiply_grad(grad: torch.Tensor, x: torch.Tensor,
                         gate: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`resize_multiply` with respect to the gate.

    The adjoint of the nearest resize applied to ``grad * x``: every gate
    cell sums the cells of ``x`` that took its value.

    Args:
        grad (Tensor): Gradient of the output, (N, C, H, W).
        x (Tensor): The features that were gated, (N, C, H, W).
        gate (Tensor): The gate, (N, C, h, w) (only its size and dtype are
            used).

    Returns:
        Tensor: Shape (N, C, h, w).
    """
    n, c, height, width = x.shape
    h, w = gate.shape[-2:]
    prod = grad * x
    if (h, w) == (1, 1):
        return prod.sum((2, 3), keepdim=True)
    double = gate.dtype == torch.float64
    sh, sw = block_factor(height, h, double), block_factor(width, w, double)
    if sh and sw:
        # each cell's window summed by a pooling (a divisor of 1): many
        # times faster than a reduction over a 6-d view, which is strided
        # in channels-last memory, and exact in value (the same sum)
        return F.avg_pool2d(prod, (sh, sw), divisor_override=1)
    return torch.ops.aten.upsample_nearest2d_backward(
        prod, [height, width], [n, c, h, w], None, None)


def channels_last(t: torch.Tensor) -> bool:
    """Whether a 4-d tensor is channels-last in memory and not also
    contiguous (maps of one cell are both).

    Args:
        t (Tensor): (N, C, H, W).

    Returns:
        bool: True for ``(N, H, W, C)`` memory.
    """
    return not t.is_contiguous() and t.is_contiguous(
        memory_format=torch.channels_last)


def _as_context(t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``t``, a channels-last (N, C, h, w) view, in ``context``'s layout:
    as it is for a channels-last context, else contiguous."""
    return t if channels_last(context) else t.contiguous()


class Excite(nn.Module):
    """Gate ``x`` with the sigmoid of the (optionally transformed) context.

    Without ``reduction`` the excite is parameter-free (GE-theta-minus,
    GE-theta): ``x * sigmoid(resize(g))``. With it, the context first passes
    a bottleneck MLP of two 1x1 convolutions with bias,
    ``channels -> channels // reduction -> channels`` with an activation in
    between (GE-theta-plus, SE). The sigmoid runs at the context's
    resolution, before the nearest resize (the two commute), and the resize
    is a broadcast wherever the sizes allow (:func:`resize_multiply`).

    Args:
        channels (int, optional): Number of channels; required with
            ``reduction``.
        reduction (int, optional): Channel reduction of the MLP; None for
            the parameter-free excite. The hidden width is
            ``max(1, channels // reduction)``.
        act_cfg (dict): Activation between the two MLP convolutions.
            Defaults to ``dict(type='ReLU')``.
    """

    def __init__(self,
                 channels: Optional[int] = None,
                 reduction: Optional[int] = None,
                 act_cfg: dict = dict(type='ReLU')) -> None:
        super().__init__()
        self.mlp = None
        if reduction is not None:
            hidden = max(1, check_channels(channels, 'channels') //
                         check_reduction(reduction))
            self.mlp = nn.Sequential(
                ConvModule(channels, hidden, 1, bias=True, act_cfg=act_cfg),
                ConvModule(hidden, channels, 1, bias=True, act_cfg=None))

    def gate(self, context: torch.Tensor) -> torch.Tensor:
        """The gate ``sigmoid(mlp(context))`` at the context's resolution.

        Args:
            context (Tensor): Gathered context (N, C, h, w).

        Returns:
            Tensor: Gate in [0, 1], shape (N, C, h, w).
        """
        if self.mlp is not None:
            context = self._mlp(context)
        return context.sigmoid()

    def plain_mlp(self) -> bool:
        """Whether the MLP has the layout this class builds: two 1x1
        ``nn.Conv2d`` with bias, no norm, a ReLU or nothing after the
        first and nothing after the second."""
        first, second = self.mlp
        return all(
            tuple(m.order) == ('conv', 'norm', 'act') and not m.with_norm
            and type(m.conv) is nn.Conv2d and m.conv.kernel_size == (1, 1)
            and m.conv.groups == 1 and m.conv.bias is not None
            for m in self.mlp) and not second.with_activation and (
                not first.with_activation
                or type(first.activate) is nn.ReLU)

    def gate_backward(self, context: torch.Tensor,
                      grad_gate: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The gate and the gradients of the context and the MLP's
        parameters for the gate's gradient ``grad_gate``.

        Args:
            context (Tensor): Gathered context (N, C, h, w).
            grad_gate (Tensor): Gradient of :meth:`gate`'s output.

        Returns:
            tuple: ``gate``, ``grad_context`` and, per parameter of the MLP
            that requires grad (in ``parameters()`` order), its gradient.
            For the plain layout the products are written out by hand (no
            autograd graph: the context is small and the graph's overhead
            is not); else autograd runs :meth:`gate`.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        if self.mlp is None or not self.plain_mlp() or context.dim() != 4:
            with torch.enable_grad():
                leaf = context.detach().requires_grad_(True)
                gate = self.gate(leaf)
            grads = torch.autograd.grad(gate, [leaf] + params, grad_gate)
            return (gate.detach(), ) + tuple(grads)
        first, second = (m.conv for m in self.mlp)
        n, c, h, w = context.shape
        rows = context.permute(0, 2, 3, 1).reshape(-1, c)
        hidden = F.linear(rows, first.weight.flatten(1), first.bias)
        if self.mlp[0].with_activation:
            hidden = hidden.clamp_min_(0)
        gate = F.linear(hidden, second.weight.flatten(1),
                        second.bias).sigmoid_()
        d_out = grad_gate.permute(0, 2, 3, 1).reshape(-1, c) * gate * (
            1 - gate)
        d_hidden = d_out @ second.weight.flatten(1)
        if self.mlp[0].with_activation:
            d_hidden = d_hidden * (hidden > 0)
        by_param = {
            id(second.weight): (d_out.t() @ hidden).view_as(second.weight),
            id(second.bias): d_out.sum(0),
            id(first.weight): (d_hidden.t() @ rows).view_as(first.weight),
            id(first.bias): d_hidden.sum(0)
        }
        d_context = d_hidden @ first.weight.flatten(1)

        def nchw(t):
            # in the context's layout (a channels-last context: no copy)
            return _as_context(t.view(n, h, w, -1).permute(0, 3, 1, 2),
                               context)

        return (nchw(gate), nchw(d_context),
                *[by_param[id(p)] for p in params])

    def _mlp(self, context: torch.Tensor) -> torch.Tensor:
        """The MLP; its 1x1 convolutions as matrix products over the
        context's cells when it has the plain layout this class builds
        (a convolution dispatch costs more than the small product)."""
        first, second = self.mlp
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or \
                context.dim() != 4 or not self.plain_mlp():
            return self.mlp(context)
        n, c, h, w = context.shape
        # rows of channels: a view of a channels-last context, else a copy
        t = F.linear(context.permute(0, 2, 3, 1).reshape(-1, c),
                     first.conv.weight.flatten(1), first.conv.bias)
        if first.with_activation:
            t = first.activate(t)
        t = F.linear(t, second.conv.weight.flatten(1), second.conv.bias)
        if second.with_activation:
            t = second.activate(t)
        return _as_context(t.view(n, h, w, -1).permute(0, 3, 1, 2), context)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Excite.

        Args:
            x (Tensor): Features of shape (N, C, H, W).
            context (Tensor): Gathered context of shape (N, C, h, w).

        Returns:
            Tensor: ``x`` gated, shape (N, C, H, W).
        """
        gate = self.gate(context)
        if torch.compiler.is_compiling() or torch.is_grad_enabled() and (
                x.requires_grad or gate.requires_grad):
            # plain differentiable ops: for the compiler, and for autograd
            # (resize_multiply writes into its output)
            if all(type(s) is int and s == 1 for s in gate.shape[-2:]):
                # a 1x1 gate (a global extent, or a map of at most the
                # extent) resizes to itself everywhere: a broadcast, the
                # same values; Inductor's CPU code for the backward of a
                # nearest resize from 1x1 fails to build (torch 2.13). Only
                # sizes known as plain ints: no guard on a symbolic one
                return x * gate
            # one traceable formula, valid for symbolic sizes too
            return x * F.interpolate(gate, size=x.shape[-2:], mode='nearest')
        return resize_multiply(x, gate)
