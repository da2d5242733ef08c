"""The CUDA kernels of the ``mmge::`` ops, written in Triton.

Each launcher takes float32, bfloat16 and float16 tensors of any strides
(NCHW and channels-last run in memory order) and any map size; other
dtypes run the reference implementation. Arithmetic is in float32, results
are rounded once to the output's dtype. The nearest resize is computed in
the kernels as PyTorch computes it (``min(floor(i * in / out), in - 1)`` in
float32), so no index tensor is made or copied.

Full-resolution memory traffic per GE layer (N*C*H*W elements each):

=====================  ===========================  ======================
kernel                 reads                        writes
=====================  ===========================  ======================
pool_gather            x (once per window, cached)  1 / e^2
excite                 x (+ identity)               out
excite_gate_grad       grad, x                      1 / e^2
pool_gather_backward   1 / e^2                      grad_x
=====================  ===========================  ======================

The input's gradient is ``excite(grad, gate)`` (one read, one write).

With ``TRITON_INTERPRET=1`` set before mmge is imported, Triton's
interpreter runs these kernels on CPU tensors; mmge's tests check them
that way against the reference implementations.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import ge_ops
from .resize import channels_last

#: the dtypes the kernels take
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: elements per program of the element-wise kernels
BLOCK = 1024


@triton.jit
def _nearest(i, scale, size):
    """PyTorch's nearest source index of output cell ``i``."""
    return tl.minimum(
        tl.floor(i.to(tl.float32) * scale).to(tl.int64), size - 1)


@triton.jit
def _cell(offs, C, H, W, CL: tl.constexpr):
    """(n, c, i, j) of flat offsets in memory order: (N, H, W, C) when
    channels-last, else (N, C, H, W)."""
    if CL:
        c = offs % C
        t = offs // C
        j = t % W
        t = t // W
        i = t % H
        n = t // H
    else:
        j = offs % W
        t = offs // W
        i = t % H
        t = t // H
        c = t % C
        n = t // C
    return n, c, i, j


@triton.jit
def _excite_kernel(x_ptr, gate_ptr, id_ptr, out_ptr, total, C, H, W, h, w,
                   scale_h, scale_w, sxn, sxc, sxh, sxw, sgn, sgc, sgh,
                   sgw, sin, sic, sih, siw, son, soc, soh, sow,
                   HAS_ID: tl.constexpr, RELU: tl.constexpr,
                   CL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, i, j = _cell(offs, C, H, W, CL)
    u = _nearest(i, scale_h, h)
    v = _nearest(j, scale_w, w)
    y = tl.load(x_ptr + n * sxn + c * sxc + i * sxh + j * sxw, mask=mask,
                other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + n * sgn + c * sgc + u * sgh + v * sgw, mask=mask,
                other=0.0).to(tl.float32)
    y = y * g
    if HAS_ID:
        y += tl.load(id_ptr + n * sin + c * sic + i * sih + j * siw,
                     mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(out_ptr + n * son + c * soc + i * soh + j * sow,
             y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_grad_kernel(grad_ptr, x_ptr, out_ptr, total, C, H, W, h, w,
                      scale_h, scale_w, inv_h, inv_w, rows, cols, sgn, sgc,
                      sgh, sgw, sxn, sxc, sxh, sxw, son, soc, soh, sow,
                      CL: tl.constexpr, BLOCK: tl.constexpr):
    # a block of gate cells (n, c, u, v), each the sum of grad * x over the
    # cells whose nearest source it is: a window of at most rows x cols
    # cells from (floor(u * H / h) - 1, floor(v * W / w) - 1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, u, v = _cell(offs, C, h, w, CL)
    row0 = tl.maximum(tl.floor(u.to(tl.float32) * inv_h).to(tl.int64) - 1,
                      0)
    col0 = tl.maximum(tl.floor(v.to(tl.float32) * inv_w).to(tl.int64) - 1,
                      0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for ky in range(0, rows):
        r = row0 + ky
        row_ok = mask & (r < H) & (_nearest(r, scale_h, h) == u)
        for kx in range(0, cols):
            col = col0 + kx
            m = row_ok & (col < W) & (_nearest(col, scale_w, w) == v)
            g = tl.load(grad_ptr + n * sgn + c * sgc + r * sgh + col * sgw,
                        mask=m, other=0.0).to(tl.float32)
            y = tl.load(x_ptr + n * sxn + c * sxc + r * sxh + col * sxw,
                        mask=m, other=0.0).to(tl.float32)
            acc += g * y
    tl.store(out_ptr + n * son + c * soc + u * soh + v * sow,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_sum_kernel(grad_ptr, x_ptr, out_ptr, C, H, W, sgn, sgc, sgh, sgw,
                     sxn, sxc, sxh, sxw, BLOCK: tl.constexpr):
    # a 1x1 gate: one program per (n, c) sums grad * x over the whole map
    plane = tl.program_id(0).to(tl.int64)
    c = plane % C
    n = plane // C
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, H * W, BLOCK):
        k = start + tl.arange(0, BLOCK)
        m = k < H * W
        i = k // W
        j = k % W
        g = tl.load(grad_ptr + n * sgn + c * sgc + i * sgh + j * sgw, mask=m,
                    other=0.0).to(tl.float32)
        y = tl.load(x_ptr + n * sxn + c * sxc + i * sxh + j * sxw, mask=m,
                    other=0.0).to(tl.float32)
        acc += g * y
    tl.store(out_ptr + plane, tl.sum(acc, axis=0).to(
        out_ptr.dtype.element_ty))


@triton.jit
def _pool_kernel(x_ptr, out_ptr, total, C, H, W, h, w, E, sxn, sxc, sxh, sxw,
                 son, soc, soh, sow, CL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, u, v = _cell(offs, C, h, w, CL)
    r0 = u * E - (E - 1)
    c0 = v * E - (E - 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for dy in range(0, 2 * E - 1):
        r = r0 + dy
        row_ok = mask & (r >= 0) & (r < H)
        for dx in range(0, 2 * E - 1):
            col = c0 + dx
            m = row_ok & (col >= 0) & (col < W)
            acc += tl.load(x_ptr + n * sxn + c * sxc + r * sxh + col * sxw,
                           mask=m, other=0.0).to(tl.float32)
    count = (tl.minimum(r0 + 2 * E - 1, H) - tl.maximum(r0, 0)) * \
        (tl.minimum(c0 + 2 * E - 1, W) - tl.maximum(c0, 0))
    tl.store(out_ptr + n * son + c * soc + u * soh + v * sow,
             (acc / count.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _pool_term(grad_ptr, n, c, u, v, ok, H, W, E, sgn, sgc, sgh, sgw):
    """grad[u, v] over its window's cell count, where ``ok``."""
    r0 = u * E - (E - 1)
    c0 = v * E - (E - 1)
    count = (tl.minimum(r0 + 2 * E - 1, H) - tl.maximum(r0, 0)) * \
        (tl.minimum(c0 + 2 * E - 1, W) - tl.maximum(c0, 0))
    g = tl.load(grad_ptr + n * sgn + c * sgc + u * sgh + v * sgw, mask=ok,
                other=0.0).to(tl.float32)
    return tl.where(ok, g / tl.maximum(count, 1).to(tl.float32), 0.0)


@triton.jit
def _pool_backward_kernel(grad_ptr, out_ptr, total, C, H, W, h, w, E, sgn,
                          sgc, sgh, sgw, son, soc, soh, sow,
                          CL: tl.constexpr, BLOCK: tl.constexpr):
    # every input cell lies in the windows of at most two output cells per
    # side: u_hi = ceil(i / E) (when < h) and u_hi - 1 (when i < E * u_hi)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, i, j = _cell(offs, C, H, W, CL)
    u1 = (i + E - 1) // E
    u0 = u1 - 1
    v1 = (j + E - 1) // E
    v0 = v1 - 1
    ok_u1 = u1 < h
    ok_u0 = (u0 >= 0) & (i < u1 * E)
    ok_v1 = v1 < w
    ok_v0 = (v0 >= 0) & (j < v1 * E)
    acc = _pool_term(grad_ptr, n, c, u1, v1, mask & ok_u1 & ok_v1, H, W, E,
                     sgn, sgc, sgh, sgw)
    acc += _pool_term(grad_ptr, n, c, u1, v0, mask & ok_u1 & ok_v0, H, W, E,
                      sgn, sgc, sgh, sgw)
    acc += _pool_term(grad_ptr, n, c, u0, v1, mask & ok_u0 & ok_v1, H, W, E,
                      sgn, sgc, sgh, sgw)
    acc += _pool_term(grad_ptr, n, c, u0, v0, mask & ok_u0 & ok_v0, H, W, E,
                      sgn, sgc, sgh, sgw)
    tl.store(out_ptr + n * son + c * soc + i * soh + j * sow,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _takes(*tensors: Optional[Tensor]) -> bool:
    """Whether the kernels take these operands (None entries skipped)."""
    return all(t is None or (t.dtype in DTYPES and t.dim() == 4)
               for t in tensors)


def _grid(total: int) -> Tuple[int]:
    return (triton.cdiv(total, BLOCK), )


def _scale(in_size: int, out_size: int) -> float:
    """PyTorch's float32 scale of a nearest resize from ``in_size`` to
    ``out_size`` (exact in a Python float, which the launch rounds to
    float32 as PyTorch does)."""
    return in_size / out_size


def _launch_excite(x: Tensor, gate: Tensor, identity: Optional[Tensor],
                   relu: bool, out: Tensor) -> Tensor:
    """``out = x * resize(gate) (+ identity) (relu)`` in one pass."""
    n, c, height, width = x.shape
    h, w = gate.shape[-2:]
    if out.numel():
        _excite_kernel[_grid(out.numel())](
            x, gate, x if identity is None else identity, out, out.numel(), c,
            height, width, h, w, _scale(h, height), _scale(w, width),
            *x.stride(), *gate.stride(),
            *(x.stride() if identity is None else identity.stride()),
            *out.stride(), HAS_ID=identity is not None, RELU=relu,
            CL=channels_last(out), BLOCK=BLOCK)
    return out


def excite(x: Tensor,
           gate: Tensor,
           identity: Optional[Tensor] = None,
           relu: bool = False) -> Tensor:
    """The kernel of ``mmge::excite`` (see :func:`ge_ops.reference_excite`)."""
    ge_ops.check_maps(x, gate, identity)
    if not _takes(x, gate, identity):
        return ge_ops.reference_excite(x, gate, identity, relu)
    out = torch.empty_like(x, dtype=ge_ops.product_dtype(x, gate, identity),
                           memory_format=ge_ops.memory_format(x))
    return _launch_excite(x, gate, identity, relu, out)


def excite_gate_grad(grad: Tensor, x: Tensor, gate: Tensor) -> Tensor:
    """The kernel of ``mmge::excite_gate_grad``: one pass over ``grad`` and
    ``x``."""
    if not _takes(grad, x, gate):
        return ge_ops.reference_excite_gate_grad(grad, x, gate)
    n, c, height, width = x.shape
    h, w = gate.shape[-2:]
    out = torch.empty_like(gate, memory_format=ge_ops.memory_format(gate))
    if not out.numel():
        return out
    if (h, w) == (1, 1):
        # (N, C, 1, 1) is contiguous in either layout: cell n * C + c
        _gate_sum_kernel[(n * c, )](grad, x, out, c, height, width,
                                    *grad.stride(), *x.stride(), BLOCK=BLOCK)
    else:
        _gate_grad_kernel[_grid(out.numel())](
            grad, x, out, out.numel(), c, height, width, h, w,
            _scale(h, height), _scale(w, width), height / h, width / w,
            -(-height // h) + 3, -(-width // w) + 3, *grad.stride(),
            *x.stride(), *out.stride(), CL=channels_last(out), BLOCK=BLOCK)
    return out


def pool_gather(x: Tensor, extent: int) -> Tensor:
    """The kernel of ``mmge::pool_gather``."""
    if not _takes(x):
        return ge_ops.reference_pool_gather(x, extent)
    n, c, height, width = x.shape
    out = torch.empty((n, c, ge_ops.pooled_size(height, extent),
                       ge_ops.pooled_size(width, extent)),
                      dtype=x.dtype, device=x.device,
                      memory_format=ge_ops.memory_format(x))
    if out.numel():
        _pool_kernel[_grid(out.numel())](
            x, out, out.numel(), c, height, width, out.shape[2],
            out.shape[3], extent, *x.stride(), *out.stride(),
            CL=channels_last(out), BLOCK=BLOCK)
    return out


def pool_gather_backward(grad: Tensor, x: Tensor, extent: int) -> Tensor:
    """The kernel of ``mmge::pool_gather_backward``."""
    if not _takes(grad, x):
        return ge_ops.reference_pool_gather_backward(grad, x, extent)
    n, c, height, width = x.shape
    out = torch.empty_like(x, memory_format=ge_ops.memory_format(x))
    if out.numel():
        _pool_backward_kernel[_grid(out.numel())](
            grad, out, out.numel(), c, height, width, grad.shape[2],
            grad.shape[3], extent, *grad.stride(), *out.stride(),
            CL=channels_last(out), BLOCK=BLOCK)
    return out


ge_ops.pool_gather.register_kernel('cuda')(pool_gather)
ge_ops.pool_gather_backward.register_kernel('cuda')(pool_gather_backward)
ge_ops.excite.register_kernel('cuda')(excite)
ge_ops.excite_gate_grad.register_kernel('cuda')(excite_gate_grad)
