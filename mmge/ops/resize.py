"""PyTorch's nearest resize of a small gate to a feature map, and the
product ``x * resize(gate)`` written without building the full-size gate:
the reference implementation of the ``mmge::excite`` op and its backward.
"""
import functools
from typing import Optional

import torch
import torch.nn.functional as F


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
