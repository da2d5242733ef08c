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
def _backward_cells(grad_ptr, x_ptr, y_ptr, gx_ptr, gm_ptr, n, c, r, col,
                    m, gate, sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, syn, syc,
                    syh, syw, sdn, sdc, sdh, sdw, RELU: tl.constexpr,
                    GRAD_X: tl.constexpr, MASKED: tl.constexpr):
    """The excite's backward at cells (n, c, r, col) of one gate value
    each: ``grad`` masked by the output's sign (RELU), written (MASKED);
    ``x``'s gradient, ``grad * gate``, written (GRAD_X); returns
    ``grad * x`` (the gate's gradient's terms)."""
    g = tl.load(grad_ptr + n * sgn + c * sgc + r * sgh + col * sgw, mask=m,
                other=0.0).to(tl.float32)
    if RELU:
        y = tl.load(y_ptr + n * syn + c * syc + r * syh + col * syw, mask=m,
                    other=0.0).to(tl.float32)
        g = tl.where(y > 0.0, g, 0.0)
    dst = n * sdn + c * sdc + r * sdh + col * sdw
    if MASKED:
        tl.store(gm_ptr + dst, g.to(gm_ptr.dtype.element_ty), mask=m)
    if GRAD_X:
        tl.store(gx_ptr + dst, (g * gate).to(gx_ptr.dtype.element_ty),
                 mask=m)
    return g * tl.load(x_ptr + n * sxn + c * sxc + r * sxh + col * sxw,
                       mask=m, other=0.0).to(tl.float32)


@triton.jit
def _excite_backward_kernel(grad_ptr, x_ptr, gate_ptr, y_ptr, gx_ptr, gm_ptr,
                            out_ptr, total, C, H, W, h, w, scale_h, scale_w,
                            inv_h, inv_w, rows, cols, sgn, sgc, sgh, sgw, sxn,
                            sxc, sxh, sxw, syn, syc, syh, syw, sdn, sdc, sdh,
                            sdw, stn, stc, sth, stw, son, soc, soh, sow,
                            RELU: tl.constexpr, GRAD_X: tl.constexpr,
                            MASKED: tl.constexpr, CL: tl.constexpr,
                            BLOCK: tl.constexpr):
    # a block of gate cells (n, c, u, v): each the sum of grad * x over the
    # cells whose nearest source it is, a window of at most rows x cols
    # cells from (floor(u * H / h) - 1, floor(v * W / w) - 1); the cells'
    # own gradients are written on the way (every cell is in one window)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, u, v = _cell(offs, C, h, w, CL)
    gate = 0.0
    if GRAD_X:
        gate = tl.load(gate_ptr + n * stn + c * stc + u * sth + v * stw,
                       mask=mask, other=0.0).to(tl.float32)
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
            acc += _backward_cells(grad_ptr, x_ptr, y_ptr, gx_ptr, gm_ptr, n,
                                   c, r, col, m, gate, sgn, sgc, sgh, sgw,
                                   sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                                   sdn, sdc, sdh, sdw, RELU, GRAD_X, MASKED)
    tl.store(out_ptr + n * son + c * soc + u * soh + v * sow,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _excite_backward_sum_kernel(grad_ptr, x_ptr, gate_ptr, y_ptr, gx_ptr,
                                gm_ptr, out_ptr, C, H, W, sgn, sgc, sgh, sgw,
                                sxn, sxc, sxh, sxw, syn, syc, syh, syw, sdn,
                                sdc, sdh, sdw, RELU: tl.constexpr,
                                GRAD_X: tl.constexpr, MASKED: tl.constexpr,
                                BLOCK: tl.constexpr):
    # a 1x1 gate: one program per (n, c) over the whole map
    plane = tl.program_id(0).to(tl.int64)
    c = plane % C
    n = plane // C
    gate = 0.0
    if GRAD_X:
        gate = tl.load(gate_ptr + plane).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, H * W, BLOCK):
        k = start + tl.arange(0, BLOCK)
        acc += _backward_cells(grad_ptr, x_ptr, y_ptr, gx_ptr, gm_ptr, n, c,
                               k // W, k % W, k < H * W, gate, sgn, sgc, sgh,
                               sgw, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                               sdn, sdc, sdh, sdw, RELU, GRAD_X, MASKED)
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


def _launch_excite_backward(grad: Tensor, x: Tensor, gate: Tensor,
                            out: Optional[Tensor], grad_x: Optional[Tensor],
                            masked: Optional[Tensor]) -> Tensor:
    """The gate's gradient in one pass over ``grad`` and ``x`` (and
    ``out``, whose sign masks ``grad``), writing ``grad_x`` and the masked
    gradient where given (both in ``x``'s layout)."""
    n, c, height, width = x.shape
    h, w = gate.shape[-2:]
    grad_gate = torch.empty_like(gate,
                                 memory_format=ge_ops.memory_format(gate))
    if not grad_gate.numel():
        return grad_gate
    if not x.numel():
        return grad_gate.zero_()
    dest = grad_x if grad_x is not None else masked
    common = (*grad.stride(), *x.stride(),
              *(x.stride() if out is None else out.stride()),
              *(x.stride() if dest is None else dest.stride()))
    flags = dict(RELU=out is not None, GRAD_X=grad_x is not None,
                 MASKED=masked is not None, BLOCK=BLOCK)
    ptrs = (grad, x, gate, x if out is None else out,
            x if grad_x is None else grad_x, x if masked is None else masked,
            grad_gate)
    if (h, w) == (1, 1):
        # (N, C, 1, 1) is contiguous in either layout: cell n * C + c
        _excite_backward_sum_kernel[(n * c, )](*ptrs, c, height, width,
                                               *common, **flags)
    else:
        _excite_backward_kernel[_grid(grad_gate.numel())](
            *ptrs, grad_gate.numel(), c, height, width, h, w,
            _scale(h, height), _scale(w, width), height / h, width / w,
            -(-height // h) + 3, -(-width // w) + 3, *common,
            *gate.stride(), *grad_gate.stride(), CL=channels_last(grad_gate),
            **flags)
    return grad_gate


def excite_gate_grad(grad: Tensor, x: Tensor, gate: Tensor) -> Tensor:
    """The kernel of ``mmge::excite_gate_grad``: one pass over ``grad`` and
    ``x``."""
    if not _takes(grad, x, gate):
        return ge_ops.reference_excite_gate_grad(grad, x, gate)
    return _launch_excite_backward(grad, x, gate, None, None, None)


def excite_backward(grad: Tensor,
                    x: Tensor,
                    gate: Tensor,
                    out: Optional[Tensor] = None,
                    masked: bool = False):
    """The kernel of ``mmge::excite_backward``: one pass over ``grad``,
    ``x`` (and ``out``) writing ``x``'s gradient (and the masked
    gradient), the gate's gradient summed on the way."""
    if not _takes(grad, x, gate, out):
        return ge_ops.reference_excite_backward(grad, x, gate, out, masked)
    fmt = ge_ops.memory_format(x)
    grad_x = torch.empty_like(x, memory_format=fmt)
    grad_masked = torch.empty_like(grad, memory_format=fmt) \
        if out is not None and masked else None
    grad_gate = _launch_excite_backward(grad, x, gate, out, grad_x,
                                        grad_masked)
    return [grad_x, grad_gate,
            grad.new_empty(0) if grad_masked is None else grad_masked]


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


# ---------------------------------------------------------------------------
# conv_gather: GE-theta's gather, levels of a depthwise 3x3 convolution of
# stride 2, a batch norm and a ReLU. Each kernel works on tiles of
# BLOCK_P cells (n, i, j) by BLOCK_C channels, so that a tile's
# per-channel sums (batch statistics, their gradients, the weights'
# gradients) are reductions over the tile's first axis, written per tile
# and added up by the next launch in a fixed order.


@triton.jit
def _tile(P, C, OW, OH, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The tile's cells (n, i, j) of an (OH, OW) map, its channels and
    their masks."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = p < P
    cm = c < C
    j = p % OW
    t = p // OW
    return t // OH, t % OH, j, c, pm, cm


@triton.jit
def _at(ptr, n, i, j, c, sn, sc, sh, sw):
    """Pointers to the cells (n, i, j) x channels c of a map."""
    return ptr + (n * sn + i * sh + j * sw)[:, None] + (c * sc)[None, :]


@triton.jit
def _normed(v, scale, shift, m, dt):
    """A level's output from its convolution's values: the batch norm's
    affine, the ReLU, rounded to the map's dtype; 0 off the map (the next
    level's zero padding)."""
    v = tl.maximum(v * scale[None, :] + shift[None, :], 0.0)
    return tl.where(m, v.to(dt).to(tl.float32), 0.0)


@triton.jit
def _in_affine(scale_ptr, shift_ptr, c, cm, NORM_IN: tl.constexpr):
    """The previous level's affine (scale, shift) for channels ``c`` where
    a level's input is normalised on the fly, else zeros (unused)."""
    if NORM_IN:
        scale = tl.load(scale_ptr + c, mask=cm, other=0.0)
        shift = tl.load(shift_ptr + c, mask=cm, other=0.0)
    else:
        scale = tl.zeros(c.shape, dtype=tl.float32)
        shift = tl.zeros(c.shape, dtype=tl.float32)
    return scale, shift


@triton.jit
def _tap(in_ptr, n, oi, oj, kh, kw, c, pm, cm, H, W, sin, sic, sih, siw,
         scale, shift, dt, NORM_IN: tl.constexpr):
    """The input under tap (kh, kw) of output cells (oi, oj) of a level
    (stride 2, padding 1): x, or the previous level's convolution
    normalised (NORM_IN); 0 in the padding."""
    i = oi * 2 - 1 + kh
    j = oj * 2 - 1 + kw
    ok = pm & (i >= 0) & (i < H) & (j >= 0) & (j < W)
    m = ok[:, None] & cm[None, :]
    v = tl.load(_at(in_ptr, n, i, j, c, sin, sic, sih, siw), mask=m,
                other=0.0).to(tl.float32)
    if NORM_IN:
        v = _normed(v, scale, shift, m, dt)
    return v


@triton.jit
def _partials(r, m, count, part_ptr, row, C, c, cm):
    """A tile's per-channel sum and sum of squared deviations from its own
    mean (``count`` cells), for Chan's merge in the statistics kernel."""
    r = tl.where(m, r, 0.0)
    s = tl.sum(r, axis=0)
    d = tl.where(m, r - (s / count)[None, :], 0.0)
    tl.store(part_ptr + (2 * row) * C + c, s, mask=cm)
    tl.store(part_ptr + (2 * row + 1) * C + c, tl.sum(d * d, axis=0),
             mask=cm)


@triton.jit
def _level_kernel(in_ptr, w_ptr, scale_ptr, shift_ptr, out_ptr, part_ptr, P,
                  C, H, W, OH, OW, sin, sic, sih, siw, son, soc, soh, sow,
                  NORM_IN: tl.constexpr, STATS: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # one level's convolution; its input is x, or the previous level's
    # convolution normalised on the fly (NORM_IN)
    n, oi, oj, c, pm, cm = _tile(P, C, OW, OH, BLOCK_P, BLOCK_C)
    dt = out_ptr.dtype.element_ty
    scale, shift = _in_affine(scale_ptr, shift_ptr, c, cm, NORM_IN)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for kh in tl.static_range(3):
        for kw in tl.static_range(3):
            v = _tap(in_ptr, n, oi, oj, kh, kw, c, pm, cm, H, W, sin, sic,
                     sih, siw, scale, shift, dt, NORM_IN)
            wv = tl.load(w_ptr + c * 9 + kh * 3 + kw, mask=cm, other=0.0)
            acc += v * wv.to(dt).to(tl.float32)[None, :]
    m = pm[:, None] & cm[None, :]
    out = acc.to(dt)
    tl.store(_at(out_ptr, n, oi, oj, c, son, soc, soh, sow), out, mask=m)
    if STATS:
        count = tl.minimum(P - tl.program_id(0).to(tl.int64) * BLOCK_P,
                           BLOCK_P).to(tl.float32)
        _partials(out.to(tl.float32), m, count, part_ptr, tl.program_id(0),
                  C, c, cm)


@triton.jit
def _stats_kernel(part_ptr, tiles, P, BLOCK_P, w_ptr, b_ptr, mean_ptr,
                  var_ptr, scale_ptr, shift_ptr, C, eps,
                  TRAINING: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    # a level's statistics (Chan's merge of the tiles' partials, in tile
    # order) and its affine: scale = w / sqrt(var + eps), shift = b -
    # mean * scale. Without TRAINING, mean and var hold the running ones.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    if TRAINING:
        total = tl.zeros([BLOCK_C], dtype=tl.float32)
        for r0 in range(0, tiles, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            m = (r < tiles)[:, None] & cm[None, :]
            total += tl.sum(tl.load(part_ptr + (2 * r * C)[:, None] +
                                    c[None, :], mask=m, other=0.0), axis=0)
        mean = total / P
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for r0 in range(0, tiles, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            m = (r < tiles)[:, None] & cm[None, :]
            count = tl.minimum(P - r * BLOCK_P, BLOCK_P).to(tl.float32)
            s = tl.load(part_ptr + (2 * r * C)[:, None] + c[None, :], mask=m,
                        other=0.0)
            q = tl.load(part_ptr + ((2 * r + 1) * C)[:, None] + c[None, :],
                        mask=m, other=0.0)
            d = tl.where(m, s / count[:, None] - mean[None, :], 0.0)
            m2 += tl.sum(q + count[:, None] * d * d, axis=0)
        var = m2 / P
        tl.store(mean_ptr + c, mean, mask=cm)
        tl.store(var_ptr + c, var, mask=cm)
    else:
        mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
        var = tl.load(var_ptr + c, mask=cm, other=1.0)
    scale = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32) / tl.sqrt(
        var + eps)
    tl.store(scale_ptr + c, scale, mask=cm)
    tl.store(shift_ptr + c, tl.load(b_ptr + c, mask=cm, other=0.0).to(
        tl.float32) - mean * scale, mask=cm)


@triton.jit
def _affine_kernel(raw_ptr, scale_ptr, shift_ptr, out_ptr, P, C, OH, OW, srn,
                   src, srh, srw, son, soc, soh, sow, RELU: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # the last level's batch norm (and ReLU): the gather's output
    n, i, j, c, pm, cm = _tile(P, C, OW, OH, BLOCK_P, BLOCK_C)
    m = pm[:, None] & cm[None, :]
    v = tl.load(_at(raw_ptr, n, i, j, c, srn, src, srh, srw), mask=m,
                other=0.0).to(tl.float32)
    v = v * tl.load(scale_ptr + c, mask=cm, other=0.0)[None, :] + tl.load(
        shift_ptr + c, mask=cm, other=0.0)[None, :]
    if RELU:
        v = tl.maximum(v, 0.0)
    tl.store(_at(out_ptr, n, i, j, c, son, soc, soh, sow),
             v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _grad_sums(dyhat, raw, mean, invstd, m, part_ptr, row, C, c, cm):
    """A tile's per-channel sums of the norm's output gradient ``dyhat``
    and of ``dyhat * xhat``."""
    dyhat = tl.where(m, dyhat, 0.0)
    xhat = (raw - mean[None, :]) * invstd[None, :]
    tl.store(part_ptr + (2 * row) * C + c, tl.sum(dyhat, axis=0), mask=cm)
    tl.store(part_ptr + (2 * row + 1) * C + c, tl.sum(dyhat * xhat, axis=0),
             mask=cm)


@triton.jit
def _last_grad_kernel(grad_ptr, raw_ptr, scale_ptr, shift_ptr, mean_ptr,
                      invstd_ptr, dyhat_ptr, part_ptr, P, C, OH, OW, sgn,
                      sgc, sgh, sgw, srn, src, srh, srw, RELU: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # the last level's norm-output gradient (through its ReLU) and sums;
    # dyhat is a float32 (N, OH, OW, C) buffer
    n, i, j, c, pm, cm = _tile(P, C, OW, OH, BLOCK_P, BLOCK_C)
    m = pm[:, None] & cm[None, :]
    g = tl.load(_at(grad_ptr, n, i, j, c, sgn, sgc, sgh, sgw), mask=m,
                other=0.0).to(tl.float32)
    raw = tl.load(_at(raw_ptr, n, i, j, c, srn, src, srh, srw), mask=m,
                  other=0.0).to(tl.float32)
    if RELU:
        scale = tl.load(scale_ptr + c, mask=cm, other=0.0)
        shift = tl.load(shift_ptr + c, mask=cm, other=0.0)
        g = tl.where(raw * scale[None, :] + shift[None, :] > 0.0, g, 0.0)
    tl.store(_at(dyhat_ptr, n, i, j, c, OH * OW * C, 1, OW * C, C), g,
             mask=m)
    _grad_sums(g, raw, tl.load(mean_ptr + c, mask=cm, other=0.0),
               tl.load(invstd_ptr + c, mask=cm, other=0.0), m, part_ptr,
               tl.program_id(0), C, c, cm)


@triton.jit
def _grad_coef_kernel(part_ptr, tiles, P, w_ptr, mean_ptr, invstd_ptr,
                      coef_ptr, gw_ptr, gb_ptr, C, TRAINING: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # a level's norm backward as dc = A * dyhat + B * raw + D, and the
    # norm's weight and bias gradients (sum dyhat * xhat, sum dyhat)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, tiles, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        m = (r < tiles)[:, None] & cm[None, :]
        s1 += tl.sum(tl.load(part_ptr + (2 * r * C)[:, None] + c[None, :],
                             mask=m, other=0.0), axis=0)
        s2 += tl.sum(tl.load(part_ptr + ((2 * r + 1) * C)[:, None] +
                             c[None, :], mask=m, other=0.0), axis=0)
    tl.store(gw_ptr + c, s2, mask=cm)
    tl.store(gb_ptr + c, s1, mask=cm)
    invstd = tl.load(invstd_ptr + c, mask=cm, other=0.0)
    a = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32) * invstd
    if TRAINING:
        mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
        b = -a * invstd * s2 / P
        d = a * (mean * invstd * s2 - s1) / P
    else:
        b = tl.zeros([BLOCK_C], dtype=tl.float32)
        d = tl.zeros([BLOCK_C], dtype=tl.float32)
    tl.store(coef_ptr + c, a, mask=cm)
    tl.store(coef_ptr + C + c, b, mask=cm)
    tl.store(coef_ptr + 2 * C + c, d, mask=cm)


@triton.jit
def _dconv(dyhat_ptr, raw_ptr, coef_ptr, n, i, j, c, m, C, OH, OW, srn, src,
           srh, srw, dt):
    """The convolution's output gradient at cells (n, i, j), rounded to the
    map's dtype (as the norm's backward writes it)."""
    a = tl.load(coef_ptr + c, mask=c < C, other=0.0)
    b = tl.load(coef_ptr + C + c, mask=c < C, other=0.0)
    d = tl.load(coef_ptr + 2 * C + c, mask=c < C, other=0.0)
    g = tl.load(_at(dyhat_ptr, n, i, j, c, OH * OW * C, 1, OW * C, C),
                mask=m, other=0.0)
    raw = tl.load(_at(raw_ptr, n, i, j, c, srn, src, srh, srw), mask=m,
                  other=0.0).to(tl.float32)
    dc = a[None, :] * g + b[None, :] * raw + d[None, :]
    return tl.where(m, dc.to(dt).to(tl.float32), 0.0)


@triton.jit
def _weight_grad_kernel(dyhat_ptr, raw_ptr, coef_ptr, in_ptr, scale_ptr,
                        shift_ptr, part_ptr, P, C, H, W, OH, OW, srn, src,
                        srh, srw, sin, sic, sih, siw, NORM_IN: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # a tile's share of the level's weight gradient: per tap, the sum of
    # dc times the input under it
    n, oi, oj, c, pm, cm = _tile(P, C, OW, OH, BLOCK_P, BLOCK_C)
    dt = raw_ptr.dtype.element_ty
    dc = _dconv(dyhat_ptr, raw_ptr, coef_ptr, n, oi, oj, c,
                pm[:, None] & cm[None, :], C, OH, OW, srn, src, srh, srw, dt)
    scale, shift = _in_affine(scale_ptr, shift_ptr, c, cm, NORM_IN)
    row = tl.program_id(0).to(tl.int64) * 9
    for kh in tl.static_range(3):
        for kw in tl.static_range(3):
            v = _tap(in_ptr, n, oi, oj, kh, kw, c, pm, cm, H, W, sin, sic,
                     sih, siw, scale, shift, dt, NORM_IN)
            tl.store(part_ptr + (row + kh * 3 + kw) * C + c,
                     tl.sum(dc * v, axis=0), mask=cm)


@triton.jit
def _input_grad_kernel(dyhat_ptr, raw_ptr, coef_ptr, w_ptr, out_ptr,
                       prev_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr,
                       part_ptr, P, C, H, W, OH, OW, srn, src, srh, srw, son,
                       soc, soh, sow, spn, spc, sph, spw,
                       PREV: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    # the level's input gradient at cells (n, i, j) of its (H, W) input:
    # input row i is tap kh of output row (i + 1 - kh) / 2 when that is
    # whole and on the map. With PREV the input is the previous level's
    # output: its ReLU's mask is applied and the result, that level's
    # dyhat (float32, (N, H, W, C)), is written with its sums; else it
    # is x's gradient
    n, i, j, c, pm, cm = _tile(P, C, W, H, BLOCK_P, BLOCK_C)
    dt = raw_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for kh in tl.static_range(3):
        ti = i + 1 - kh
        oi = ti // 2
        for kw in tl.static_range(3):
            tj = j + 1 - kw
            oj = tj // 2
            ok = pm & (ti >= 0) & (ti % 2 == 0) & (oi < OH) & (tj >= 0) & (
                tj % 2 == 0) & (oj < OW)
            dc = _dconv(dyhat_ptr, raw_ptr, coef_ptr, n, oi, oj, c,
                        ok[:, None] & cm[None, :], C, OH, OW, srn, src, srh,
                        srw, dt)
            wv = tl.load(w_ptr + c * 9 + kh * 3 + kw, mask=cm, other=0.0)
            acc += dc * wv.to(dt).to(tl.float32)[None, :]
    m = pm[:, None] & cm[None, :]
    if PREV:
        g = acc.to(dt).to(tl.float32)
        raw = tl.load(_at(prev_ptr, n, i, j, c, spn, spc, sph, spw), mask=m,
                      other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + c, mask=cm, other=0.0)
        shift = tl.load(shift_ptr + c, mask=cm, other=0.0)
        g = tl.where(raw * scale[None, :] + shift[None, :] > 0.0, g, 0.0)
        tl.store(_at(out_ptr, n, i, j, c, H * W * C, 1, W * C, C), g,
                 mask=m)
        _grad_sums(g, raw, tl.load(mean_ptr + c, mask=cm, other=0.0),
                   tl.load(invstd_ptr + c, mask=cm, other=0.0), m, part_ptr,
                   tl.program_id(0), C, c, cm)
    else:
        tl.store(_at(out_ptr, n, i, j, c, son, soc, soh, sow),
                 acc.to(out_ptr.dtype.element_ty), mask=m)


def _blocks(c: int) -> Tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of the gather's tiles for ``c`` channels."""
    block_c = min(64, triton.next_power_of_2(max(c, 1)))
    return 4096 // block_c, block_c


#: rows of partials each step of the statistics kernels adds up
BLOCK_R = 32


def _takes_levels(x: Tensor, *lists) -> bool:
    return _takes(x) and x.shape[1] > 0 and all(
        t.device == x.device for ts in lists for t in ts)


def conv_gather(x: Tensor, weights, norm_weights, norm_biases, running_means,
                running_vars, training: bool, eps: float, last_relu: bool):
    """The kernel of ``mmge::conv_gather``: per level one launch for the
    convolution (the previous level's norm and ReLU applied as it reads)
    and one for the statistics and affine; one more for the last norm."""
    ge_ops.check_levels(x, weights, norm_weights, norm_biases,
                        running_means, running_vars)
    if not _takes_levels(x, weights, norm_weights, norm_biases,
                         running_means, running_vars) or not x.numel():
        return ge_ops.reference_conv_gather(x, weights, norm_weights,
                                            norm_biases, running_means,
                                            running_vars, training, eps,
                                            last_relu)
    levels, n, c = len(weights), x.shape[0], x.shape[1]
    block_p, block_c = _blocks(c)
    fmt = ge_ops.memory_format(x)
    f32 = dict(dtype=torch.float32, device=x.device)
    if training:
        mean = torch.empty(levels, c, **f32)
        var = torch.empty(levels, c, **f32)
    else:
        mean = torch.stack(running_means).float()
        var = torch.stack(running_vars).float()
    scale = torch.empty(levels, c, **f32)
    shift = torch.empty(levels, c, **f32)
    raws, inp = [], x
    for k, shape in enumerate(ge_ops.gathered_shapes(x, levels)):
        raw = torch.empty(shape, dtype=x.dtype, device=x.device,
                          memory_format=fmt)
        p = n * shape[2] * shape[3]
        tiles = triton.cdiv(p, block_p)
        part = torch.empty(tiles * 2, c, **f32) if training else scale
        _level_kernel[(tiles, triton.cdiv(c, block_c))](
            inp, weights[k].contiguous(), scale[k - 1], shift[k - 1], raw,
            part, p, c, inp.shape[2], inp.shape[3], shape[2], shape[3],
            *inp.stride(), *raw.stride(), NORM_IN=k > 0, STATS=training,
            BLOCK_P=block_p, BLOCK_C=block_c)
        _stats_kernel[(triton.cdiv(c, block_c), )](
            part, tiles, p, block_p, norm_weights[k], norm_biases[k],
            mean[k], var[k], scale[k], shift[k], c, eps, TRAINING=training,
            BLOCK_R=BLOCK_R, BLOCK_C=block_c)
        raws.append(raw)
        inp = raw
    context = torch.empty_like(raw, memory_format=fmt)
    p = n * raw.shape[2] * raw.shape[3]
    _affine_kernel[(triton.cdiv(p, block_p), triton.cdiv(c, block_c))](
        raw, scale[-1], shift[-1], context, p, c, raw.shape[2], raw.shape[3],
        *raw.stride(), *context.stride(), RELU=last_relu, BLOCK_P=block_p,
        BLOCK_C=block_c)
    return [context, mean, var] + raws


def conv_gather_backward(grad: Tensor, x: Tensor, weights, norm_weights,
                         norm_biases, mean: Tensor, var: Tensor, raws,
                         training: bool, eps: float, last_relu: bool,
                         input_grad: bool):
    """The kernel of ``mmge::conv_gather_backward``: one launch for the last
    level's norm gradient, then per level one for the norm's backward
    coefficients, one for the weight's gradient (plus its sum over tiles)
    and one for the input's gradient, which also applies the previous
    level's ReLU and sums its norm's gradients."""
    if not _takes_levels(x, weights, norm_weights, norm_biases, raws) or \
            not _takes(grad) or not x.numel() or \
            mean.dtype is not torch.float32:
        return ge_ops.reference_conv_gather_backward(
            grad, x, weights, norm_weights, norm_biases, mean, var, raws,
            training, eps, last_relu, input_grad)
    levels, n, c = len(weights), x.shape[0], x.shape[1]
    block_p, block_c = _blocks(c)
    f32 = dict(dtype=torch.float32, device=x.device)
    invstd = torch.rsqrt(var + eps)
    scale = torch.stack(norm_weights).float() * invstd
    shift = torch.stack(norm_biases).float() - mean * scale
    grad_w, grad_g, grad_b = [None] * levels, torch.empty(
        levels, c, **f32), torch.empty(levels, c, **f32)
    coef = torch.empty(3, c, **f32)
    grad_x = x.new_empty(0)
    cgrid = (triton.cdiv(c, block_c), )

    raw = raws[-1]
    p = n * raw.shape[2] * raw.shape[3]
    tiles = triton.cdiv(p, block_p)
    dyhat = torch.empty(n, raw.shape[2], raw.shape[3], c, **f32)
    part = torch.empty(tiles * 2, c, **f32)
    _last_grad_kernel[(tiles, cgrid[0])](
        grad, raw, scale[-1], shift[-1], mean[-1], invstd[-1], dyhat, part,
        p, c, raw.shape[2], raw.shape[3], *grad.stride(), *raw.stride(),
        RELU=last_relu, BLOCK_P=block_p, BLOCK_C=block_c)
    for k in reversed(range(levels)):
        raw = raws[k]
        oh, ow = raw.shape[2:]
        p = n * oh * ow
        tiles = triton.cdiv(p, block_p)
        _grad_coef_kernel[cgrid](part, tiles, p, norm_weights[k], mean[k],
                                 invstd[k], coef, grad_g[k], grad_b[k], c,
                                 TRAINING=training, BLOCK_R=BLOCK_R,
                                 BLOCK_C=block_c)
        inp = x if k == 0 else raws[k - 1]
        h, w = inp.shape[2:]
        wpart = torch.empty(tiles * 9, c, **f32)
        _weight_grad_kernel[(tiles, cgrid[0])](
            dyhat, raw, coef, inp, scale[k - 1], shift[k - 1], wpart, p, c,
            h, w, oh, ow, *raw.stride(), *inp.stride(), NORM_IN=k > 0,
            BLOCK_P=block_p, BLOCK_C=block_c)
        grad_w[k] = wpart.view(tiles, 9, c).sum(0).t().reshape(
            c, 1, 3, 3).to(weights[k].dtype)
        if k == 0 and not input_grad:
            break
        pin = n * h * w
        in_tiles = triton.cdiv(pin, block_p)
        if k > 0:
            out = torch.empty(n, h, w, c, **f32)
            part = torch.empty(in_tiles * 2, c, **f32)
            strides = (h * w * c, 1, w * c, c)
        else:
            out = grad_x = torch.empty_like(
                x, memory_format=ge_ops.memory_format(x))
            strides = out.stride()
        _input_grad_kernel[(in_tiles, cgrid[0])](
            dyhat, raw, coef, weights[k].contiguous(), out, inp,
            scale[k - 1], shift[k - 1], mean[k - 1], invstd[k - 1], part,
            pin, c, h, w, oh, ow, *raw.stride(), *strides, *inp.stride(),
            PREV=k > 0, BLOCK_P=block_p, BLOCK_C=block_c)
        dyhat = out
    return [grad_x] + grad_w + [grad_g, grad_b]


# ---------------------------------------------------------------------------
# global_gather: global-extent GE-theta's whole-map depthwise convolution


@triton.jit
def _global_kernel(x_ptr, w_ptr, out_ptr, C, HW, W, sxn, sxc, sxh, sxw,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # one sample, a block of channels: sum over the map of x * weight
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for start in range(0, HW, BLOCK_P):
        k = start + tl.arange(0, BLOCK_P)
        m = (k < HW)[:, None] & cm[None, :]
        v = tl.load(x_ptr + n * sxn + ((k // W) * sxh + (k % W) * sxw)[:, None]
                    + (c * sxc)[None, :], mask=m, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + (c * HW)[None, :] + k[:, None], mask=m,
                     other=0.0)
        acc += v * wv.to(dt).to(tl.float32)
    tl.store(out_ptr + n * C + c,
             tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _global_input_grad_kernel(grad_ptr, w_ptr, out_ptr, P, C, HW, W, sgn,
                              sgc, son, soc, soh, sow, BLOCK_P: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    # x's gradient: grad[n, c] * weight[c] at every cell
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    m = (p < P)[:, None] & cm[None, :]
    n = p // HW
    k = p % HW
    g = tl.load(grad_ptr + (n * sgn)[:, None] + (c * sgc)[None, :], mask=m,
                other=0.0).to(tl.float32)
    wv = tl.load(w_ptr + (c * HW)[None, :] + k[:, None], mask=m, other=0.0)
    tl.store(out_ptr + (n * son + (k // W) * soh + (k % W) * sow)[:, None] +
             (c * soc)[None, :],
             (g * wv.to(out_ptr.dtype.element_ty).to(tl.float32)).to(
                 out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _global_weight_grad_kernel(grad_ptr, x_ptr, out_ptr, N, C, HW, W, sgn,
                               sgc, sxn, sxc, sxh, sxw, BLOCK_P: tl.constexpr,
                               BLOCK_C: tl.constexpr):
    # the weight's gradient: sum over the batch of grad[n, c] * x[n, c]
    k = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    m = (k < HW)[:, None] & cm[None, :]
    offs = ((k // W) * sxh + (k % W) * sxw)[:, None] + (c * sxc)[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for n in range(0, N):
        g = tl.load(grad_ptr + n * sgn + c * sgc, mask=cm, other=0.0)
        v = tl.load(x_ptr + n * sxn + offs, mask=m, other=0.0)
        acc += g.to(tl.float32)[None, :] * v.to(tl.float32)
    tl.store(out_ptr + (c * HW)[None, :] + k[:, None],
             acc.to(out_ptr.dtype.element_ty), mask=m)


def global_gather(x: Tensor, weight: Tensor) -> Tensor:
    """The kernel of ``mmge::global_gather``: one launch, one read of
    ``x``."""
    ge_ops.check_global(x, weight)
    if not _takes(x) or weight.device != x.device or not x.numel():
        return ge_ops.reference_global_gather(x, weight)
    n, c, height, width = x.shape
    # (N, C, 1, 1) is contiguous in either layout
    out = torch.empty((n, c, 1, 1), dtype=x.dtype, device=x.device)
    block_p, block_c = _blocks(c)
    _global_kernel[(n, triton.cdiv(c, block_c))](
        x, weight.contiguous(), out, c, height * width, width, *x.stride(),
        BLOCK_P=block_p, BLOCK_C=block_c)
    return out


def global_gather_backward(grad: Tensor, x: Tensor, weight: Tensor,
                           input_grad: bool):
    """The kernel of ``mmge::global_gather_backward``: one launch for the
    weight's gradient (a read of ``x``), one for ``x``'s (a write)."""
    if not _takes(grad, x) or weight.device != x.device or not x.numel():
        return ge_ops.reference_global_gather_backward(grad, x, weight,
                                                       input_grad)
    n, c, height, width = x.shape
    hw = height * width
    block_p, block_c = _blocks(c)
    weight = weight.contiguous()
    grad_weight = torch.empty_like(weight)
    _global_weight_grad_kernel[(triton.cdiv(hw, block_p),
                                triton.cdiv(c, block_c))](
        grad, x, grad_weight, n, c, hw, width, grad.stride(0),
        grad.stride(1), *x.stride(), BLOCK_P=block_p, BLOCK_C=block_c)
    if not input_grad:
        return [x.new_empty(0), grad_weight]
    grad_x = torch.empty_like(x, memory_format=ge_ops.memory_format(x))
    _global_input_grad_kernel[(triton.cdiv(n * hw, block_p),
                               triton.cdiv(c, block_c))](
        grad, weight, grad_x, n * hw, c, hw, width, grad.stride(0),
        grad.stride(1), *grad_x.stride(), BLOCK_P=block_p, BLOCK_C=block_c)
    return [grad_x, grad_weight]


ge_ops.pool_gather.register_kernel('cuda')(pool_gather)
ge_ops.pool_gather_backward.register_kernel('cuda')(pool_gather_backward)
ge_ops.excite.register_kernel('cuda')(excite)
ge_ops.excite_gate_grad.register_kernel('cuda')(excite_gate_grad)
ge_ops.excite_backward.register_kernel('cuda')(excite_backward)
ge_ops.conv_gather.register_kernel('cuda')(conv_gather)
ge_ops.conv_gather_backward.register_kernel('cuda')(conv_gather_backward)
ge_ops.global_gather.register_kernel('cuda')(global_gather)
ge_ops.global_gather_backward.register_kernel('cuda')(global_gather_backward)
