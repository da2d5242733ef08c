"""Native CPU kernels of Gather-Excite's fast path.

``mmge/csrc/ge_cpu.c``, built by ``setup.py`` into ``mmge/_ge_cpu*.so`` and
called through :mod:`ctypes`, does in one memory pass each what takes GE
several ATen calls on the CPU:

- :func:`pool_gather`: GE-theta-minus's gather (average pooling with kernel
  ``2e-1``, stride ``e``, padding ``e-1``, padded cells not counted),
  optionally of ``scale[c] * x + shift[c]`` (a norm layer's output computed on
  the fly from its input);
- :func:`excite`: ``x * resize(gate) (+ identity)``, in place if asked;
- :func:`pool_excite`: GE-theta-minus without autograd, the pool and the
  excite of each plane while it is in the cache;
- :func:`gate_grad`: the gradient of the gate, the nearest resize's adjoint
  of ``grad * x``;
- :func:`input_grad`: ``grad * resize(gate)``, plus the average pool's
  backward for GE-theta-minus;
- :func:`conv_gather` and :func:`conv_gather_backward`
  (``mmge/csrc/ge_conv_gather.c``): GE-theta's whole parametric gather
  (strided depthwise convolutions, batch norms, ReLUs) one block of channels
  at a time, in one pass over the input; the backward also writes the
  excite's direct term. Given the batch norm before the gather
  (:class:`FusedNorm` forward, :class:`NormStats` backward) they run it too:
  its batch statistics come from the same pass over its input (or its
  running statistics make an affine), and its backward from the same pass
  over the gradient, so the norm's output is never materialised. Given an
  :class:`Excitation`, :func:`conv_gather` also makes the gate (through
  GE-theta-plus's MLP, ``mmge/csrc/ge_mlp.c``, given as :class:`MLPParams`)
  and runs the excite: a GE layer's forward is one call.

:func:`pool_excite_args` and :func:`conv_gather_args` marshal a call's
arguments without making it: :mod:`.prepared_inference` keeps them to
replay a GE layer's inference call.

They take float32 CPU tensors (:func:`usable`), whose full-resolution maps
are contiguous or channels-last (:func:`maps_usable`; the ``_nhwc``
kernels and ``ge_conv_gather``'s channels-last mode read the latter without
a copy); everything else takes the ATen path, which is also what runs when
the library was not built (a source checkout that was not installed). The
results equal the ATen ops' up to float32 rounding
(tests/test_ge_fast_paths.py).
"""
import ctypes
import functools
import importlib.util
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch.nn.modules import module as torch_module

from .resize import channels_last, nearest_index

__all__ = [
    'available', 'usable', 'maps_usable', 'hooked', 'channels_last',
    'norm_affine', 'batch_stats', 'pool_gather',
    'excite', 'pool_excite', 'gate_grad',
    'input_grad', 'ConvGatherParams', 'FusedNorm', 'MLPParams',
    'Excitation', 'NormStats',
    'ConvGatherResult', 'ConvGatherGrads', 'conv_gather',
    'conv_gather_backward', 'pool_excite_args', 'conv_gather_args'
]

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


@functools.lru_cache(maxsize=1)
def _library() -> Optional[ctypes.CDLL]:
    """The built kernels, or None when ``mmge._ge_cpu`` is not installed."""
    try:
        spec = importlib.util.find_spec('mmge._ge_cpu')
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    lib.ge_pool_forward.argtypes = [_PTR] * 4 + [_I64] * 5 + [ctypes.c_int]
    lib.ge_gate_grad.argtypes = [_PTR] * 7 + [_I64] * 6 + [ctypes.c_int]
    lib.ge_input_grad.argtypes = [_PTR] * 6 + [_I64] * 6 + [ctypes.c_int]
    lib.ge_excite.argtypes = [_PTR] * 8 + [_I64] * 6 + [_PTR] + \
        [ctypes.c_int] * 2
    lib.ge_excite_nhwc.argtypes = [_PTR] * 8 + [_I64] * 6 + \
        [ctypes.c_int] * 2
    lib.ge_gate_grad_nhwc.argtypes = [_PTR] * 7 + [_I64] * 6 + \
        [ctypes.c_int]
    lib.ge_excite_backward.argtypes = [_PTR] * 9 + [_I64] * 6 + \
        [ctypes.c_int] * 2
    lib.ge_conv_gather.argtypes = [_PTR] * 11 + [ctypes.c_int] + \
        [_I64] * 4 + [_PTR] * 18 + [ctypes.c_double, ctypes.c_int] + \
        [_PTR] * 2 + [ctypes.c_int] + [_PTR] * 11 + [ctypes.c_int] * 3
    lib.ge_pool_forward_nhwc.argtypes = [_PTR] * 4 + [_I64] * 5 + \
        [ctypes.c_int]
    lib.ge_input_grad_nhwc.argtypes = [_PTR] * 6 + [_I64] * 7 + \
        [ctypes.c_int]
    lib.ge_pool_excite.argtypes = [_PTR] * 7 + [_I64] * 5 + [_PTR] * 4 + \
        [ctypes.c_double] + [ctypes.c_int] * 3
    lib.ge_norm_affine.argtypes = [_PTR] * 4 + [ctypes.c_double, _I64, _PTR]
    lib.ge_batch_stats.argtypes = [_PTR] * 3 + [_I64] * 4 + \
        [ctypes.c_int] * 2
    for fn in (lib.ge_pool_forward, lib.ge_gate_grad, lib.ge_input_grad,
               lib.ge_excite, lib.ge_excite_nhwc, lib.ge_gate_grad_nhwc,
               lib.ge_excite_backward,
               lib.ge_pool_forward_nhwc, lib.ge_input_grad_nhwc,
               lib.ge_pool_excite, lib.ge_conv_gather, lib.ge_norm_affine,
               lib.ge_batch_stats):
        fn.restype = ctypes.c_int
    return lib


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the native kernels were built and load (a constant to
    ``torch.compile``, which does not trace the loading).

    Returns:
        bool: True when ``mmge._ge_cpu`` is installed and loads.
    """
    return _library() is not None


def usable(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the kernels can run on these tensors.

    Args:
        *tensors (Tensor | None): The operands (None entries are skipped).

    Returns:
        bool: True when the kernels are available, nothing is being traced
        or compiled (exporters and compilers see ATen ops), and every tensor
        is a contiguous float32 CPU tensor.
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if not available():
        return False
    for t in tensors:
        if t is not None and not (t.is_cpu and t.dtype is torch.float32
                                  and t.is_contiguous()):
            return False
    return True


def maps_usable(x: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """:func:`usable` for full-resolution operands in either layout that
    :func:`conv_gather` and :func:`excite` read.

    Args:
        x (Tensor): The features, (N, C, H, W).
        *others (Tensor | None): Operands of ``x``'s shape (the shortcut, a
            gradient); None entries are skipped.

    Returns:
        bool: :func:`usable` of all of them when ``x`` is not channels-last;
        for channels-last ``x`` (:func:`channels_last`), True when the
        kernels are available, nothing is traced or compiled, and every
        tensor is a float32 CPU tensor with ``x``'s strides.
    """
    if not channels_last(x):
        return usable(x, *others)
    stride = x.stride()
    # usable() of no tensor: the kernels built, nothing traced or compiled
    return usable() and x.is_cpu and x.dtype is torch.float32 and all(
        t is None or (t.is_cpu and t.dtype is torch.float32
                      and t.stride() == stride) for t in others)


def hooked(*modules: torch.nn.Module) -> bool:
    """Whether forward hooks would see these modules' calls: a kernel that
    stands in for them (it does not call them) must not run then.

    Args:
        *modules (nn.Module): The modules (their submodules included).

    Returns:
        bool: True if one of them, or any module globally, has a forward
        hook or forward pre-hook (the analysis probes, for instance).
    """
    if torch_module._global_forward_hooks or \
            torch_module._global_forward_pre_hooks:
        return True
    # a plain walk: ``Module.modules()`` costs several times more, per call
    stack = list(modules)
    while stack:
        m = stack.pop()
        if m is None:  # an empty slot of ``_modules``
            continue
        if m._forward_hooks or m._forward_pre_hooks:
            return True
        stack += m._modules.values()
    return False


def _layout_of(x: torch.Tensor,
               t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t``, a full-resolution operand of ``x``'s shape, in ``x``'s
    layout (channels-last or contiguous): as it is where its strides are
    ``x``'s, else a copy."""
    if t is None or t.stride() == x.stride():
        return t
    return t.contiguous(memory_format=torch.channels_last if channels_last(x)
                        else torch.contiguous_format)


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _check(status: int, name: str) -> None:
    if status == 2:
        raise ValueError(f'mmge native kernel {name}: more levels than it '
                         f'supports ({MAX_LEVELS})')
    if status == 3:
        raise ValueError(f'mmge native kernel {name}: level1 replaces the '
                         f'input, so the gate gradient must come as '
                         f'dcontext')
    if status == 4:
        raise ValueError(f'mmge native kernel {name}: a fused norm computes '
                         f'its statistics only in a forward call without '
                         f'scale and shift, and its backward needs dx')
    if status == 5:
        raise ValueError(f'mmge native kernel {name}: a level lacks its '
                         f'kernels, or its running statistics where it does '
                         f'not train')
    if status == 7:
        raise ValueError(f'mmge native kernel {name}: running statistics '
                         f'are updated in a forward call only, for levels '
                         f'that train')
    if status == 8:
        raise ValueError(f'mmge native kernel {name}: a backward without '
                         f'grad is the gather\'s alone: it takes dcontext, '
                         f'and no gate, excite or norm; raw is a forward '
                         f'output')
    if status == 6:
        raise ValueError(f'mmge native kernel {name}: the excite runs in '
                         f'a forward call, or in a backward one as an MLP '
                         f'alone (no identity, out, relu, gate, dcontext '
                         f'or level1)')
    if status:
        raise MemoryError(f'mmge native kernel {name}: out of memory for '
                          f'its scratch buffers')


def _check_identity(x: torch.Tensor, identity: Optional[torch.Tensor],
                    name: str) -> None:
    """The kernels read a shortcut cell for each of ``x``'s: refuse any
    other shape (one that broadcasts is the caller's to add)."""
    if identity is not None and identity.shape != x.shape:
        raise ValueError(f'mmge native kernel {name}: identity must have '
                         f'the shape of x, {tuple(x.shape)}, got '
                         f'{tuple(identity.shape)}')


def _vector(t: Optional[torch.Tensor],
            channels: int) -> Optional[torch.Tensor]:
    """A per-channel parameter as the kernels read it: ``channels``
    contiguous float32 values (``expand`` refuses any other length and
    broadcasts a single value)."""
    if t is None:
        return None
    if t.dtype is torch.float32 and t.dim() == 1 and \
            t.shape[0] == channels and t.is_contiguous():
        return t  # as it is: each ATen op costs, even a view
    return t.detach().float().expand(channels).contiguous()


def _norm_vectors(norm: Optional['FusedNorm'], channels: int) -> tuple:
    """A fused norm's weight, bias, running mean and variance as the
    kernels read them (:func:`_vector`; None where absent), and its eps
    (0.0 without a norm)."""
    if norm is None:
        return None, None, None, None, 0.0
    return (*[_vector(t, channels) for t in (norm.weight, norm.bias,
                                             norm.running_mean,
                                             norm.running_var)],
            float(norm.eps))


def _affine(scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
            channels: int) -> Tuple[Optional[torch.Tensor], ...]:
    if scale is None:
        return None, None
    return _vector(scale, channels), _vector(shift, channels)


def norm_affine(mean: torch.Tensor, var: torch.Tensor,
                weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch norm with running statistics as a per-channel affine.

    Args:
        mean (Tensor): Running mean, (C, ), :func:`usable`.
        var (Tensor): Running variance, (C, ).
        weight (Tensor, optional): The norm's weight (None: ones).
        bias (Tensor, optional): Its bias (None: zeros).
        eps (float): Its eps.

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``invstd = 1 / sqrt(var + eps)``,
        ``scale = weight * invstd`` and ``shift = bias - mean * scale``,
        (C, ) each, computed in float32 as ATen's batch norm does.
    """
    c = mean.shape[0]
    out = mean.new_empty(3, c)
    _check(_library().ge_norm_affine(
        _ptr(weight), _ptr(bias), _ptr(mean), _ptr(var), float(eps), c,
        _ptr(out)), 'ge_norm_affine')
    return out.unbind(0)


def batch_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A batch norm's batch statistics of ``x``, in one pass.

    Args:
        x (Tensor): (N, C, H, W), :func:`maps_usable` (contiguous or
            channels-last), with more than one value per channel.

    Returns:
        tuple[Tensor, Tensor]: The mean and the biased variance per
        channel, (C, ) float32, the same whatever the number of threads.
    """
    n, c, height, width = x.shape
    # each channel's sums taken about one of its values
    pivot = x[0, :, 0, 0].contiguous()
    nhwc = channels_last(x)
    parts = torch.empty((n * height, 2, c) if nhwc else (n, c, 2),
                        dtype=torch.float64)
    _check(_library().ge_batch_stats(
        _ptr(x), _ptr(pivot), _ptr(parts), n, c, height, width, int(nhwc),
        torch.get_num_threads()), 'ge_batch_stats')
    sums = parts.sum(0) if nhwc else parts.sum(0).t()
    count = n * height * width
    shift = sums[0] / count
    var = (sums[1] / count - shift * shift).clamp_(min=0)
    return (pivot.double() + shift).float(), var.float()


def pool_gather(x: torch.Tensor,
                extent: int,
                scale: Optional[torch.Tensor] = None,
                shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GE-theta-minus's gather of ``scale[c] * x + shift[c]`` (or of ``x``).

    ``F.avg_pool2d(y, 2e-1, e, e-1, count_include_pad=False)`` of
    ``y = scale.view(1, -1, 1, 1) * x + shift.view(1, -1, 1, 1)``.

    Args:
        x (Tensor): (N, C, H, W), :func:`maps_usable` (contiguous or
            channels-last).
        extent (int): Extent ratio ``e`` >= 2.
        scale (Tensor, optional): Per-channel scale, (C, ).
        shift (Tensor, optional): Per-channel shift, (C, ); given with
            ``scale``.

    Returns:
        Tensor: (N, C, ceil(H / e), ceil(W / e)), float32, in ``x``'s
        layout.
    """
    n, c, height, width = x.shape
    scale, shift = _affine(scale, shift, c)
    size = (n, c, -(-height // extent), -(-width // extent))
    if channels_last(x):
        out = torch.empty(size, dtype=x.dtype,
                          memory_format=torch.channels_last)
        _check(_library().ge_pool_forward_nhwc(
            _ptr(x), _ptr(scale), _ptr(shift), _ptr(out), n, c, height,
            width, extent, torch.get_num_threads()), 'ge_pool_forward_nhwc')
        return out
    out = x.new_empty(size)
    _check(_library().ge_pool_forward(
        _ptr(x), _ptr(scale), _ptr(shift), _ptr(out), n * c, c, height,
        width, extent, torch.get_num_threads()), 'ge_pool_forward')
    return out


def excite(x: torch.Tensor,
           gate: torch.Tensor,
           identity: Optional[torch.Tensor] = None,
           out: Optional[torch.Tensor] = None,
           scale: Optional[torch.Tensor] = None,
           shift: Optional[torch.Tensor] = None,
           relu: bool = False) -> torch.Tensor:
    """``y * F.interpolate(gate, size=x.shape[-2:], mode='nearest')``, plus
    ``identity`` when given, with ``y = scale[c] * x + shift[c]`` (or
    ``x``); then a ReLU when asked, in the same pass.

    Args:
        x (Tensor): Features, (N, C, H, W), contiguous or channels-last (then
            ``identity`` and ``out`` are too, and the result is).
        gate (Tensor): Gate, (N, C, h, w), h <= H, w <= W, float32, in any
            layout (channels-last is read as it is).
        identity (Tensor, optional): Tensor of ``x``'s shape to add.
        out (Tensor, optional): Where to write: a new tensor by default;
            may be ``x`` itself.
        scale (Tensor, optional): Per-channel scale, (C, ).
        shift (Tensor, optional): Per-channel shift, (C, ); given with
            ``scale``.
        relu (bool): Apply ``torch.relu`` to the result (a residual block's
            activation after the shortcut). Defaults to False.

    Returns:
        Tensor: ``out``, (N, C, H, W).
    """
    n, c, height, width = x.shape
    _check_identity(x, identity, 'ge_excite')
    h, w = gate.shape[-2:]
    scale, shift = _affine(scale, shift, c)
    rows, cols = nearest_index(height, h), nearest_index(width, w)
    out = torch.empty_like(x) if out is None else out
    if channels_last(x):
        # channels-last: each cell's channels are contiguous in x, identity
        # and out, and the gate's once it is channels-last too (a small copy
        # where it is not)
        fmt = torch.channels_last
        identity = _layout_of(x, identity)
        if out.stride() != x.stride():
            raise ValueError(f'mmge native kernel ge_excite_nhwc: out must '
                             f'have the layout of x, strides {x.stride()}, '
                             f'got {out.stride()}')
        gate = gate.contiguous(memory_format=fmt)
        _check(_library().ge_excite_nhwc(
            _ptr(x), _ptr(scale), _ptr(shift), _ptr(gate), _ptr(identity),
            _ptr(rows), _ptr(cols), _ptr(out), n, c, height, width, h, w,
            int(relu), torch.get_num_threads()), 'ge_excite_nhwc')
        return out
    if not (gate.is_contiguous() or channels_last(gate)):
        gate = gate.contiguous()
    _check(_library().ge_excite(
        _ptr(x), _ptr(scale), _ptr(shift), _ptr(gate), _ptr(identity),
        _ptr(rows), _ptr(cols), _ptr(out), n * c, c, height, width, h, w,
        (ctypes.c_int64 * 4)(*gate.stride()), int(relu),
        torch.get_num_threads()), 'ge_excite')
    return out


def pool_excite(x: torch.Tensor,
                extent: int,
                identity: Optional[torch.Tensor] = None,
                scale: Optional[torch.Tensor] = None,
                shift: Optional[torch.Tensor] = None,
                relu: bool = False,
                norm: Optional['FusedNorm'] = None) -> torch.Tensor:
    """GE-theta-minus without autograd in one memory pass:
    ``excite(x, sigmoid(pool_gather(x, extent, scale, shift)), identity,
    scale=scale, shift=shift, relu=relu)``, plane by plane, each plane's
    gate made while the plane is in the cache.

    Channels-last ``x`` (the result is too) takes two passes: the pool of
    the whole batch, then the excite.

    Args:
        x (Tensor): (N, C, H, W), :func:`maps_usable` (contiguous or
            channels-last).
        extent (int): Extent ratio ``e`` >= 2.
        identity (Tensor, optional): Tensor of ``x``'s shape to add (copied
            to ``x``'s layout where it is not).
        scale (Tensor, optional): Per-channel scale, (C, ).
        shift (Tensor, optional): Per-channel shift, (C, ).
        relu (bool): Apply ``torch.relu`` to the result. Defaults to False.
        norm (FusedNorm, optional): Instead of ``scale`` and ``shift``, the
            batch norm with running statistics that makes ``y``, its
            affine computed in the kernel (as :func:`norm_affine`).

    Returns:
        Tensor: A new (N, C, H, W) tensor.
    """
    _check_identity(x, identity, 'ge_pool_excite')
    if norm is not None and (norm.running_var is None or scale is not None):
        raise ValueError('pool_excite takes a norm with running statistics, '
                         'instead of scale and shift')
    identity = _layout_of(x, identity)
    out = torch.empty_like(x)
    args, keep = pool_excite_args(x, extent, identity, out, scale, shift,
                                  relu, norm)
    _check(_library().ge_pool_excite(*args), 'ge_pool_excite')
    del keep
    return out


def pool_excite_args(x: torch.Tensor, extent: int,
                     identity: Optional[torch.Tensor], out: torch.Tensor,
                     scale: Optional[torch.Tensor],
                     shift: Optional[torch.Tensor], relu: bool,
                     norm: Optional['FusedNorm']) -> Tuple[list, tuple]:
    """The arguments of the ``ge_pool_excite`` call :func:`pool_excite`
    makes: ``x`` is the first, ``identity`` the fourth, ``out`` the
    seventh; ``identity`` and ``out`` in ``x``'s layout. Per-channel
    tensors go through :func:`_vector`.

    Args:
        x, extent, identity, scale, shift, relu, norm: As
            :func:`pool_excite` takes them.
        out (Tensor | None): Where the kernel writes (None: an address set
            later, as :mod:`.prepared_inference` does).

    Returns:
        tuple[list, tuple]: Addresses and sizes, as ``ctypes`` converts
        them; and what must stay alive until the call returns (some
        addresses are of copies made here).
    """
    n, c, height, width = x.shape
    scale, shift = _affine(scale, shift, c)
    weight, bias, mean, var, eps = _norm_vectors(norm, c)
    h, w = -(-height // extent), -(-width // extent)
    rows, cols = nearest_index(height, h), nearest_index(width, w)
    return [
        _ptr(x), _ptr(scale), _ptr(shift), _ptr(identity), _ptr(rows),
        _ptr(cols), _ptr(out), n * c, c, height, width, extent, _ptr(weight),
        _ptr(bias), _ptr(mean), _ptr(var), eps, int(relu),
        int(channels_last(x)), torch.get_num_threads()
    ], (x, scale, shift, identity, rows, cols, out, weight, bias, mean, var)


def gate_grad(grad: torch.Tensor,
              x: torch.Tensor,
              gate_size: Tuple[int, int],
              scale: Optional[torch.Tensor] = None,
              shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gradient of ``x * resize(gate)`` with respect to the gate.

    The adjoint of ``F.interpolate(mode='nearest')`` from ``gate_size`` to
    ``x``'s size, applied to ``grad * y`` with ``y = scale * x + shift``
    (or ``x``).

    Args:
        grad (Tensor): Gradient of the product, (N, C, H, W).
        x (Tensor): The features, (N, C, H, W), contiguous or channels-last
            (then ``grad`` is copied to that layout where it is not, and
            the result is channels-last).
        gate_size (tuple[int, int]): The gate's (h, w).
        scale (Tensor, optional): Per-channel scale, (C, ).
        shift (Tensor, optional): Per-channel shift, (C, ).

    Returns:
        Tensor: (N, C, h, w), float32.
    """
    n, c, height, width = x.shape
    h, w = gate_size
    scale, shift = _affine(scale, shift, c)
    rows, cols = nearest_index(height, h), nearest_index(width, w)
    if channels_last(x):
        grad = _layout_of(x, grad)
        out = torch.empty((n, c, h, w), dtype=x.dtype,
                          memory_format=torch.channels_last)
        _check(_library().ge_gate_grad_nhwc(
            _ptr(grad), _ptr(x), _ptr(scale), _ptr(shift), _ptr(rows),
            _ptr(cols), _ptr(out), n, c, height, width, h, w,
            torch.get_num_threads()), 'ge_gate_grad_nhwc')
        return out
    out = x.new_empty(n, c, h, w)
    _check(_library().ge_gate_grad(
        _ptr(grad), _ptr(x), _ptr(scale), _ptr(shift), _ptr(rows),
        _ptr(cols), _ptr(out), n * c, c, height, width, h, w,
        torch.get_num_threads()), 'ge_gate_grad')
    return out


def excite_backward(grad: torch.Tensor,
                    x: torch.Tensor,
                    gate: torch.Tensor,
                    out: Optional[torch.Tensor] = None,
                    masked: bool = False
                    ) -> Tuple[torch.Tensor, torch.Tensor,
                               Optional[torch.Tensor]]:
    """The gradients of ``x * resize(gate)`` (of its ReLU, given its
    output ``out``) in one pass over ``grad`` and ``x``.

    Args:
        grad (Tensor): Gradient of the output, (N, C, H, W), in ``x``'s
            layout.
        x (Tensor): The features, (N, C, H, W), contiguous or
            channels-last.
        gate (Tensor): The gate, (N, C, h, w) (copied to ``x``'s layout
            where it is not in it).
        out (Tensor, optional): The output of the excite with its ReLU, in
            ``x``'s layout: ``grad`` is masked by ``out > 0``.
        masked (bool): Also return the masked gradient (with ``out``).

    Returns:
        tuple[Tensor, Tensor, Tensor | None]: ``x``'s gradient (in its
        layout), the gate's (in ``x``'s layout) and the masked gradient.
    """
    n, c, height, width = x.shape
    h, w = gate.shape[-2:]
    cl = channels_last(x)
    fmt = torch.channels_last if cl else torch.contiguous_format
    gate = gate.contiguous(memory_format=fmt)
    rows, cols = nearest_index(height, h), nearest_index(width, w)
    grad_x = torch.empty_like(x, memory_format=fmt)
    grad_gate = torch.empty_like(gate, memory_format=fmt)
    grad_masked = torch.empty_like(x, memory_format=fmt) \
        if out is not None and masked else None
    _check(_library().ge_excite_backward(
        _ptr(grad), _ptr(x), _ptr(out), _ptr(gate), _ptr(rows), _ptr(cols),
        _ptr(grad_x), _ptr(grad_masked), _ptr(grad_gate), n, c, height,
        width, h, w, int(cl), torch.get_num_threads()), 'ge_excite_backward')
    return grad_x, grad_gate, grad_masked


def input_grad(grad: torch.Tensor,
               gate: torch.Tensor,
               pool_grad: Optional[torch.Tensor] = None,
               extent: int = 0) -> torch.Tensor:
    """``grad * resize(gate)``, plus the gather's backward for
    GE-theta-minus.

    Args:
        grad (Tensor): Gradient of the gated features, (N, C, H, W),
            contiguous or channels-last (then ``gate`` and ``pool_grad``
            are read channels-last, copied where they are not, and the
            result is channels-last).
        gate (Tensor): The gate, (N, C, h, w), nearest-resized to (H, W).
        pool_grad (Tensor, optional): Gradient of :func:`pool_gather`'s
            output, (N, C, ceil(H / e), ceil(W / e)); its backward is added.
        extent (int): The pool's extent ratio; needed with ``pool_grad``.

    Returns:
        Tensor: (N, C, H, W), float32.
    """
    n, c, height, width = grad.shape
    h, w = gate.shape[-2:]
    rows, cols = nearest_index(height, h), nearest_index(width, w)
    out = torch.empty_like(grad)
    if channels_last(grad):
        fmt = torch.channels_last
        gate = gate.contiguous(memory_format=fmt)
        if pool_grad is not None:
            pool_grad = pool_grad.contiguous(memory_format=fmt)
        _check(_library().ge_input_grad_nhwc(
            _ptr(grad), _ptr(gate), _ptr(pool_grad), _ptr(rows), _ptr(cols),
            _ptr(out), n, c, height, width, h, w,
            extent if pool_grad is not None else 1,
            torch.get_num_threads()), 'ge_input_grad_nhwc')
        return out
    _check(_library().ge_input_grad(
        _ptr(grad), _ptr(gate), _ptr(pool_grad), _ptr(rows), _ptr(cols),
        _ptr(out), n * c, height, width, h, w, extent if pool_grad is not None
        else 1, torch.get_num_threads()), 'ge_input_grad')
    return out


#: most levels (``log2`` of the extent) :func:`conv_gather` takes
MAX_LEVELS = 16


class ConvGatherParams(NamedTuple):
    """What :func:`conv_gather` needs of a parametric gather of ``L`` levels
    on ``C`` channels (level ``l``: depthwise 3x3 convolution of stride 2 and
    padding 1, batch norm, ReLU): the modules' own tensors, one per level
    (contiguous float32 CPU tensors, read where they are, not copied).

    Attributes:
        weight (tuple[Tensor]): Convolution kernels, ``C * 9`` values each.
        gamma (tuple[Tensor | None]): Batch norm weights (None: ones).
        beta (tuple[Tensor | None]): Batch norm biases (None: zeros).
        running_mean (tuple[Tensor | None]): The running means, (C, ); None
            where the level trains.
        running_var (tuple[Tensor | None]): The running variances, (C, );
            None where the level trains.
        eps (tuple[float]): Each level's eps.
        train (tuple[bool]): True where a level normalises with the batch's
            statistics.
        relu (tuple[bool]): True where a level ends with a ReLU.
    """
    weight: Tuple[torch.Tensor, ...]
    gamma: Tuple[Optional[torch.Tensor], ...]
    beta: Tuple[Optional[torch.Tensor], ...]
    running_mean: Tuple[Optional[torch.Tensor], ...]
    running_var: Tuple[Optional[torch.Tensor], ...]
    eps: Tuple[float, ...]
    train: Tuple[bool, ...]
    relu: Tuple[bool, ...]

    @property
    def tensors(self) -> Tuple[Optional[torch.Tensor], ...]:
        """tuple[Tensor | None]: Every tensor, for :func:`usable`."""
        return (self.weight + self.gamma + self.beta + self.running_mean +
                self.running_var)


def _pointers(tensors):
    """A C array of the tensors' addresses (NULL for None)."""
    return (_PTR * len(tensors))(*[_ptr(t) for t in tensors])


def conv_gather_size(height: int, width: int,
                     levels: int) -> Tuple[int, int]:
    """The context's size after ``levels`` stride-2 convolutions.

    Args:
        height (int): Input height.
        width (int): Input width.
        levels (int): Number of levels.

    Returns:
        tuple[int, int]: ``(ceil(H / 2^L), ceil(W / 2^L))``.
    """
    return -(-height // 2**levels), -(-width // 2**levels)


class FusedNorm(NamedTuple):
    """A batch norm ``y = norm(x)`` run by :func:`conv_gather` with the
    gather, ``y`` never materialised. In training (no running statistics
    given) it computes the batch's statistics in the same pass over ``x``;
    with running statistics it is the per-channel affine they make.

    Attributes:
        weight (Tensor | None): The norm's weight, (C, ).
        bias (Tensor | None): Its bias, (C, ).
        eps (float): Its eps.
        running_mean (Tensor | None): Its running mean, (C, ), to normalise
            with it instead of the batch's. Defaults to None.
        running_var (Tensor | None): Its running variance, (C, ); given
            with ``running_mean``. Defaults to None.
    """
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float
    running_mean: Optional[torch.Tensor] = None
    running_var: Optional[torch.Tensor] = None


class MLPParams(NamedTuple):
    """GE-theta-plus's excite MLP as :func:`conv_gather` runs it: two 1x1
    convolutions with bias and an optional ReLU between them, their
    tensors read where the modules keep them (:func:`usable` ones).

    Attributes:
        weight1 (Tensor): The first convolution's weight, (hidden, C, 1, 1).
        bias1 (Tensor | None): Its bias, (hidden, ).
        weight2 (Tensor): The second's weight, (C, hidden, 1, 1).
        bias2 (Tensor | None): Its bias, (C, ).
        relu (bool): A ReLU between them.
    """
    weight1: torch.Tensor
    bias1: Optional[torch.Tensor]
    weight2: torch.Tensor
    bias2: Optional[torch.Tensor]
    relu: bool


class Excitation(NamedTuple):
    """The excite :func:`conv_gather` runs after the gather, in the same
    call: ``y * resize(gate) (+ identity)``, then a ReLU when asked, the
    gate being ``sigmoid(context)`` or, with ``mlp``, ``sigmoid(mlp(
    context))``. (:func:`conv_gather_backward` passes its MLP and
    context this way too.)

    Attributes:
        identity (Tensor | None): The block's shortcut, (N, C, H, W).
        relu (bool): The block's ReLU after it.
        mlp (MLPParams | None): GE-theta-plus's MLP.
        context (Tensor | None): Backward only: the context the forward
            gathered, channels-last in memory.
    """
    identity: Optional[torch.Tensor] = None
    relu: bool = False
    mlp: Optional[MLPParams] = None
    context: Optional[torch.Tensor] = None


class _ExciteSpec(ctypes.Structure):
    """``struct ge_excite_spec`` of ``mmge/csrc/ge_excite.h``."""
    _fields_ = [('identity', _PTR), ('out', _PTR), ('mlp_w1', _PTR),
                ('mlp_b1', _PTR), ('mlp_w2', _PTR), ('mlp_b2', _PTR),
                ('mlp_hidden', _I64), ('mlp_relu', ctypes.c_int),
                ('relu', ctypes.c_int), ('mlp_dw1', _PTR), ('mlp_db1', _PTR),
                ('mlp_dw2', _PTR), ('mlp_db2', _PTR), ('mlp_context', _PTR)]


class NormStats(NamedTuple):
    """The statistics of the batch norm before the gather, for
    :func:`conv_gather_backward` to run its backward too.

    Attributes:
        mean (Tensor): The mean it normalised with, (C, ).
        invstd (Tensor): ``1 / sqrt(var + eps)`` it normalised with, (C, ).
        train (bool): They are the batch's (then the gradient also flows
            through them).
    """
    mean: torch.Tensor
    invstd: torch.Tensor
    train: bool


class RunningUpdate(NamedTuple):
    """The running statistics a forward :func:`conv_gather` updates
    itself, per level (None where it does not), as a batch norm module's
    forward would: ``mean`` and ``var`` become ``(1 - momentum)`` times
    themselves plus ``momentum`` times the batch's mean and unbiased
    variance, and ``count`` (``num_batches_tracked``) grows by one.

    Attributes:
        mean (tuple[Tensor | None]): The running means (float32, (C, )).
        var (tuple[Tensor | None]): The running variances.
        count (tuple[Tensor | None]): ``num_batches_tracked`` (int64).
        momentum (tuple[float]): Each level's momentum.
    """
    mean: Tuple[Optional[torch.Tensor], ...]
    var: Tuple[Optional[torch.Tensor], ...]
    count: Tuple[Optional[torch.Tensor], ...]
    momentum: Tuple[float, ...]


class ConvGatherResult(NamedTuple):
    """What :func:`conv_gather` returns (None where not asked for).

    Attributes:
        context (Tensor): (N, C, h, w), ``(h, w)`` from
            :func:`conv_gather_size` (channels-last in memory when asked).
        mean (Tensor | None): When a level trains, the batch mean of the
            levels that do, (L, C) (other rows undefined).
        var (Tensor | None): Their biased batch variance, (L, C).
        grad_gate (Tensor | None): With ``grad``, (N, C, h, w), in the
            context's layout: the nearest resize's adjoint of ``grad * y``.
        level1 (Tensor | None): With ``keep_level1``, the first level's
            convolution output (the kernel's own layout).
        norm_mean (Tensor | None): With a training ``norm``, its batch
            mean, (C, ).
        norm_var (Tensor | None): With a training ``norm``, its biased
            batch variance, (C, ).
        out (Tensor | None): With ``excite``, the excite's output,
            (N, C, H, W) (the context is then not returned).
        raw (tuple[Tensor] | None): With ``keep_raw``, each level's
            convolution output before its norm, in ``x``'s layout.
    """
    context: Optional[torch.Tensor]
    mean: torch.Tensor
    var: torch.Tensor
    grad_gate: Optional[torch.Tensor]
    level1: Optional[torch.Tensor]
    norm_mean: Optional[torch.Tensor]
    norm_var: Optional[torch.Tensor]
    out: Optional[torch.Tensor] = None
    raw: Optional[Tuple[torch.Tensor, ...]] = None


class ConvGatherGrads(NamedTuple):
    """What :func:`conv_gather_backward` returns.

    Attributes:
        dx (Tensor): The gradient of ``y`` (N, C, H, W), or of ``x`` through
            the norm when its statistics were given.
        dweight (Tensor): The convolutions' kernels' gradient, (L, C, 9).
        dgamma (Tensor): The levels' norm weights' gradient, (L, C).
        dbeta (Tensor): Their biases' gradient, (L, C).
        norm_dweight (Tensor | None): With the norm's statistics, its
            weight's gradient, (C, ).
        norm_dbias (Tensor | None): Its bias's gradient, (C, ).
        mlp_dweight1 (Tensor | None): With ``mlp``, the gradient of its
            first weight, (hidden, C).
        mlp_dbias1 (Tensor | None): Of its first bias (when it has one),
            (hidden, ).
        mlp_dweight2 (Tensor | None): Of its second weight, (C, hidden).
        mlp_dbias2 (Tensor | None): Of its second bias, (C, ).
    """
    dx: torch.Tensor
    dweight: torch.Tensor
    dgamma: torch.Tensor
    dbeta: torch.Tensor
    norm_dweight: Optional[torch.Tensor]
    norm_dbias: Optional[torch.Tensor]
    mlp_dweight1: Optional[torch.Tensor] = None
    mlp_dbias1: Optional[torch.Tensor] = None
    mlp_dweight2: Optional[torch.Tensor] = None
    mlp_dbias2: Optional[torch.Tensor] = None


#: the MLP's gradients a backward call with an MLP writes, in
#: ``struct ge_excite_spec``'s order
MLP_GRADS = ('mlp_dweight1', 'mlp_dbias1', 'mlp_dweight2', 'mlp_dbias2')


def _excite_spec(excite: Optional[Excitation],
                 out: Dict[str, Optional[torch.Tensor]]
                 ) -> Optional[_ExciteSpec]:
    if excite is None:
        return None
    mlp = excite.mlp
    weights = (None, ) * 4 if mlp is None else mlp[:4]
    return _ExciteSpec(_ptr(excite.identity), _ptr(out['out']),
                       *[_ptr(t) for t in weights],
                       0 if mlp is None else mlp.weight1.shape[0],
                       int(mlp is not None and mlp.relu), int(excite.relu),
                       *[_ptr(out[k]) for k in MLP_GRADS],
                       _ptr(excite.context))


def _conv_gather(x, params, scale, shift, grad, gate, dcontext, outputs,
                 level1=None, norm=None, stats=None, small_cl=False,
                 excite=None, running=None):
    args, out, keep = conv_gather_args(x, params, scale, shift, grad, gate,
                                       dcontext, outputs, level1, norm,
                                       stats, small_cl, excite, running)
    _check(_library().ge_conv_gather(*args), 'ge_conv_gather')
    del keep
    return out


def conv_gather_args(x, params, scale, shift, grad, gate, dcontext, outputs,
                     level1=None, norm=None, stats=None, small_cl=False,
                     excite=None, running=None) -> Tuple[list, dict, tuple]:
    """The arguments of a ``ge_conv_gather`` call, and the tensors it
    writes. ``x`` is the first argument and the excite's spec
    (``ctypes.byref`` of an :class:`_ExciteSpec`, or None) the fourth
    from the end. ``x`` may be contiguous or channels-last
    (:func:`channels_last`): ``grad`` and the excite's ``identity`` are
    read in its layout (copied to it where they are not), and ``dx`` and
    ``out`` are written in it.

    Args:
        x, params, scale, shift, grad, gate, dcontext, level1, norm,
            stats, excite, running: As :func:`conv_gather` and
            :func:`conv_gather_backward` take them.
        outputs (tuple[str]): The outputs to allocate, by
            :class:`ConvGatherResult`'s and :class:`ConvGatherGrads`' field
            names (``'level1'`` too).
        small_cl (bool): The context and the gate's gradient channels-last.

    Returns:
        tuple[list, dict, tuple]: The arguments; the outputs by name (None
        where not asked for); and what must stay alive until the call
        returns (the argument list holds bare addresses, some of them of
        copies made here).
    """
    n, c, height, width = x.shape
    _check_identity(x, None if excite is None else excite.identity,
                    'ge_conv_gather')
    # the full-resolution tensors (x, grad, dx, the excite's identity and
    # output) in x's layout, contiguous or channels-last
    x_cl = channels_last(x)
    if not (x_cl or x.is_contiguous()):
        raise ValueError(f'mmge native kernel ge_conv_gather: x must be '
                         f'contiguous or channels-last, got strides '
                         f'{x.stride()} for shape {tuple(x.shape)}')
    grad = _layout_of(x, grad)
    if excite is not None and excite.identity is not None:
        excite = excite._replace(identity=_layout_of(x, excite.identity))
    levels = len(params.weight)
    h, w = conv_gather_size(height, width, levels)
    h1, w1 = conv_gather_size(height, width, 1)
    blocks = -(-c // 8)  # LANES in ge_conv_gather.c
    # a level1 block: level 1's output; channels-last with the norm's
    # statistics, that of x - mean and the gate's sums S1, S2 (the kernel's
    # first pass, which a second call then skips)
    level1_size = n * h1 * w1 * 8 + (2 * n * h * w * 8
                                     if x_cl and stats is not None else 0)
    scale, shift = _affine(scale, shift, c)
    rows, cols = nearest_index(height, h), nearest_index(width, w)
    out = {
        'level1': (blocks * level1_size, ),
        'context': (n, c, h, w),
        'mean': (levels, c),
        'var': (levels, c),
        'grad_gate': (n, c, h, w),
        'dx': (n, c, height, width),
        'dweight': (levels, c, 9),
        'dgamma': (levels, c),
        'dbeta': (levels, c),
        'norm_mean': (c, ),
        'norm_var': (c, ),
        'norm_dweight': (c, ),
        'norm_dbias': (c, ),
        'out': (n, c, height, width),
    }
    if excite is not None and excite.mlp is not None:
        hidden = excite.mlp.weight1.shape[0]
        out.update(mlp_dweight1=(hidden, c), mlp_dbias1=(hidden, ),
                   mlp_dweight2=(c, hidden), mlp_dbias2=(c, ))
    else:
        out.update(dict.fromkeys(MLP_GRADS, ()))
    out = {k: (torch.empty_like(x) if k in ('dx', 'out') else
               x.new_empty(v)) if k in outputs else None
           for k, v in out.items()}
    out['raw'] = tuple(
        x.new_empty(n, c, *conv_gather_size(height, width, k)).contiguous(
            memory_format=torch.channels_last if x_cl else
            torch.contiguous_format)
        for k in range(1, levels + 1)) if 'raw' in outputs else None
    layout = torch.channels_last if small_cl else torch.contiguous_format
    for k in ('context', 'grad_gate'):
        if out[k] is not None:
            out[k] = out[k].contiguous(memory_format=layout)
    gate, dcontext = (None if t is None else t.contiguous(
        memory_format=layout) for t in (gate, dcontext))
    mean = invstd = None
    train = 0
    gamma, beta, rmean, rvar, eps = _norm_vectors(norm, c)
    spec = _excite_spec(excite, out)
    if stats is not None:
        mean, invstd = _vector(stats.mean, c), _vector(stats.invstd, c)
        train = int(stats.train)
    args = [
        _ptr(x), _ptr(scale), _ptr(shift),
        *[_pointers(t) for t in params[:5]],
        (ctypes.c_double * levels)(*params.eps),
        (ctypes.c_int * levels)(*params.train),
        (ctypes.c_int * levels)(*params.relu), levels, n, c, height, width,
        _ptr(rows), _ptr(cols),
        _ptr(grad), _ptr(gate), _ptr(dcontext), _ptr(level1),
        _ptr(out['level1']),
        None if out['raw'] is None else _pointers(out['raw']),
        *[_ptr(out[k]) for k in ('context', 'mean', 'var', 'grad_gate', 'dx',
                                 'dweight', 'dgamma', 'dbeta')],
        _ptr(gamma), _ptr(beta), float(eps),
        int(norm is not None and rvar is None), _ptr(mean), _ptr(invstd),
        train,
        *[_ptr(out[k]) for k in ('norm_mean', 'norm_var', 'norm_dweight',
                                 'norm_dbias')],
        _ptr(rmean), _ptr(rvar),
        *((None, ) * 4 if running is None else (
            _pointers(running.mean), _pointers(running.var),
            _pointers(running.count),
            (ctypes.c_double * levels)(*running.momentum))),
        None if spec is None else ctypes.byref(spec),
        int(small_cl), int(x_cl), torch.get_num_threads()
    ]
    # the tensors behind the addresses, made here or not: alive while the
    # caller holds them
    keep = (x, scale, shift, grad, gate, dcontext, level1, rows, cols, gamma,
            beta, rmean, rvar, mean, invstd, params, excite, running)
    return args, out, keep


def conv_gather(x: torch.Tensor,
                params: ConvGatherParams,
                scale: Optional[torch.Tensor] = None,
                shift: Optional[torch.Tensor] = None,
                grad: Optional[torch.Tensor] = None,
                keep_level1: bool = False,
                norm: Optional[FusedNorm] = None,
                channels_last: bool = False,
                excite: Optional[Excitation] = None,
                stats: Optional['NormStats'] = None,
                keep_context: bool = False,
                running: Optional[RunningUpdate] = None,
                keep_raw: bool = False) -> ConvGatherResult:
    """GE-theta's parametric gather of ``y = scale[c] * x + shift[c]``,
    of ``y = norm(x)``, or of ``x``; with ``excite``, its excite too.

    Args:
        x (Tensor): (N, C, H, W), :func:`usable`.
        params (ConvGatherParams): The gather's levels.
        scale (Tensor, optional): Per-channel scale, (C, ).
        shift (Tensor, optional): Per-channel shift, (C, ).
        grad (Tensor, optional): Gradient of the excite's output,
            (N, C, H, W): also return the gate's gradient.
        keep_level1 (bool): Also return the first level's convolution
            output, for :func:`conv_gather_backward`'s ``level1``.
        norm (FusedNorm, optional): The batch norm that makes ``y``; not
            with ``scale``; in training (without running statistics) not
            with ``grad`` or ``keep_level1`` either.
        channels_last (bool): Return the context and the gate's gradient
            channels-last in memory (the rows GE-theta-plus's MLP
            multiplies). Defaults to False.
        excite (Excitation, optional): Excite ``y`` with the gathered
            context in the same call, and return the result as ``out``
            instead of the context: for GE-theta each block of channels is
            gated right after it is gathered, while its planes are in the
            cache; for GE-theta-plus after the MLP. Not with ``grad`` or
            ``keep_level1``.
        stats (NormStats, optional): With channels-last ``x``, ``grad`` and
            ``keep_level1``: the statistics of the batch norm that made
            ``y`` (as :func:`conv_gather_backward` takes them). ``level1``
            then also holds the sums of the kernel's first pass over ``x``
            and ``grad``, which :func:`conv_gather_backward` with the same
            ``level1`` and ``stats`` does not make again.
        keep_context (bool): With ``excite``, return the context too,
            channels-last in memory (GE-theta-plus's backward takes it as
            ``context``). Defaults to False.
        running (RunningUpdate, optional): Update these running statistics
            of the training levels in the call (not with ``grad``).
        keep_raw (bool): Also return each level's convolution output (the
            ``mmge::conv_gather`` op's ``raw``). Defaults to False.

    Returns:
        ConvGatherResult: The context (or the excite's output) and
        statistics.
    """
    batch_norm = norm is not None and norm.running_var is None
    if keep_context and excite is None:
        raise ValueError('conv_gather returns the context anyway without '
                         'excite: keep_context is for a call with excite')
    want = (('out', ) if excite is not None else ('context', )) + (
        ('context', ) if keep_context else ()) + (
        ('mean', 'var') if any(params.train) else ()) + (
            ('grad_gate', ) if grad is not None else ()) + (
                ('level1', ) if keep_level1 else ()) + (
                    ('norm_mean', 'norm_var') if batch_norm else ()) + (
                        ('raw', ) if keep_raw else ())
    out = _conv_gather(x, params, scale, shift, grad, None, None, want,
                       norm=norm, stats=stats,
                       small_cl=channels_last or keep_context, excite=excite,
                       running=running)
    return ConvGatherResult(*[out[k] for k in ConvGatherResult._fields])


def conv_gather_backward(
        x: torch.Tensor,
        params: ConvGatherParams,
        grad: Optional[torch.Tensor],
        scale: Optional[torch.Tensor] = None,
        shift: Optional[torch.Tensor] = None,
        gate: Optional[torch.Tensor] = None,
        dcontext: Optional[torch.Tensor] = None,
        level1: Optional[torch.Tensor] = None,
        stats: Optional[NormStats] = None,
        mlp: Optional[MLPParams] = None,
        context: Optional[torch.Tensor] = None) -> ConvGatherGrads:
    """Backward of ``out = y * resize(gate)`` with ``gate`` made from
    ``conv_gather(y)``: the gradients of ``y`` (both terms) and of the
    gather's parameters; with ``stats``, of ``x`` through the batch norm
    ``y = scale * x + shift`` too, and of the norm's weight and bias.

    The gather is recomputed from ``x`` (with the same batch statistics).
    Without ``gate`` and ``dcontext`` the gate is ``sigmoid(context)``
    (GE-theta), or with ``mlp`` ``sigmoid(mlp(context))`` (GE-theta-plus:
    the MLP's backward runs inside the call, between the gather's forward
    and backward); else ``gate`` is the gate that was applied and
    ``dcontext`` the gradient of the context (GE-theta-plus whose MLP ran
    in between, on a first call's ``grad_gate``). Without ``grad`` (and
    ``gate``) it is the gather's backward alone: ``dcontext`` is the
    context's gradient and there is no excite's term.

    Args:
        x (Tensor): (N, C, H, W), :func:`usable`.
        params (ConvGatherParams): The gather's levels.
        grad (Tensor | None): Gradient of the output, (N, C, H, W); None
            for the gather's backward alone (given ``dcontext``, not
            ``gate``, ``stats`` or ``mlp``).
        scale (Tensor, optional): Per-channel scale, (C, ).
        shift (Tensor, optional): Per-channel shift, (C, ).
        gate (Tensor, optional): The gate, (N, C, h, w); read
            channels-last when it is (:func:`channels_last`), else
            contiguous.
        dcontext (Tensor, optional): Gradient of the context,
            (N, C, h, w), read in ``gate``'s layout; given with ``gate``.
        level1 (Tensor, optional): :func:`conv_gather`'s ``level1`` for the
            same ``x``, parameters and affine (and ``stats``, the same as
            that call's): the first convolution is not run again. Needs
            ``gate`` and ``dcontext``.
        stats (NormStats, optional): The statistics of the batch norm that
            made ``y`` (``scale`` is its weight times ``invstd``, ``shift``
            its bias minus ``mean * scale``).
        mlp (MLPParams, optional): GE-theta-plus's MLP, run forward and
            backward inside the call; not with ``gate``, ``dcontext`` or
            ``level1``. Its weights' and biases' gradients are returned.
        context (Tensor, optional): With ``mlp``: the context the forward
            gathered (``conv_gather(..., keep_context=True)``), (N, C, h,
            w); the call then does not gather it again.

    Returns:
        ConvGatherGrads: The gradients.
    """
    if grad is None and (dcontext is None or gate is not None or
                         stats is not None or mlp is not None):
        raise ValueError('conv_gather_backward without grad is the '
                         'gather\'s backward alone: it takes dcontext, and '
                         'no gate, stats or mlp')
    if grad is not None and (gate is None) != (dcontext is None):
        raise ValueError('conv_gather_backward takes gate and dcontext '
                         'together, or neither')
    if mlp is not None and (gate is not None or level1 is not None):
        raise ValueError('conv_gather_backward takes mlp without gate, '
                         'dcontext and level1 (it makes them itself)')
    if context is not None:
        n, c, height, width = x.shape
        size = (n, c, *conv_gather_size(height, width, len(params.weight)))
        if mlp is None or tuple(context.shape) != size or not (
                context.is_cpu and context.dtype is torch.float32):
            raise ValueError(
                f'conv_gather_backward takes context with mlp, as a float32 '
                f'CPU tensor of shape {size}; got '
                f'{tuple(context.shape)} {context.dtype} with mlp '
                f'{"given" if mlp is not None else "None"}')
        context = context.contiguous(memory_format=torch.channels_last)
    want = ('dx', 'dweight', 'dgamma', 'dbeta') + (
        ('norm_dweight', 'norm_dbias') if stats is not None else ())
    if mlp is not None:
        want += tuple(k for k, t in zip(MLP_GRADS, mlp[:4]) if t is not None)
    out = _conv_gather(x, params, scale, shift, grad, gate, dcontext, want,
                       level1, stats=stats,
                       small_cl=dcontext is not None and channels_last(
                           dcontext if gate is None else gate),
                       excite=None if mlp is None else Excitation(
                           mlp=mlp, context=context))
    return ConvGatherGrads(*[out[k] for k in ConvGatherGrads._fields])
