"""The end of a residual block with GE, fused: ``relu(GE(norm(x)) +
identity)``.

GE sits on the residual branch after its last norm layer and before the
shortcut is added. GE-ResNet's, GE-ShuffleNet's and the C4 head's blocks
call :func:`ge_block_tail` with that norm's input, the norm, the shortcut
and the block's ReLU, so that the four run in as few passes over the map as
the kernels allow, and GE keeps for backward only the norm's input, which
the network keeps anyway. Used on its own (an mmdet plugin),
:class:`~.gather_excite.GatherExcite` runs it without them.
"""
from typing import Optional

import torch
import torch.nn as nn

from ...ops import cpu_kernels, ge_ops
from . import gather_op, input_recompute
from .args import GLOBAL
from .batch_norm import (is_plain_batch_norm, update_running_stats,
                         uses_batch_stats)
from .gather import ConvGather
from .ge_autograd import GEFunction, native_inference, native_plan, plain_mlp
from .prepared_inference import PreparedInference


def fusable(ge: Optional[nn.Module]) -> bool:
    """Whether a block may end with :func:`ge_block_tail` of this layer: a
    :class:`~.gather_excite.GatherExcite` whose own call no forward hook or
    pre-hook watches (the tail does not call the layer; hooks on its
    submodules are honoured inside it).

    Args:
        ge (nn.Module, optional): The block's layer after its last norm.

    Returns:
        bool: True where the block may call :func:`ge_block_tail`.
    """
    from .gather_excite import GatherExcite
    return isinstance(ge, GatherExcite) and not (
        ge._forward_hooks or ge._forward_pre_hooks
        or cpu_kernels.hooked())


def fusable_relu(act: nn.Module, layer: nn.Module) -> bool:
    """Whether a block's activation after its GE layer may run in GE's
    last pass (:func:`ge_block_tail` with ``relu=True``) instead of being
    called.

    Args:
        act (nn.Module): The block's activation module.
        layer (nn.Module): The GE layer.

    Returns:
        bool: True for a plain ``nn.ReLU`` when no forward hook would see
        the difference: none on ``act``, none on ``layer`` itself (a hook
        on it sees, or replaces, its output before the activation), no
        global one. Hooks inside ``layer`` see only its parts' values (the
        layer then leaves its kernels, and applies the ReLU itself).
    """
    # the layer's own hooks, not its submodules': this runs in every
    # block's forward (hooked() also sees global hooks)
    return type(act) is nn.ReLU and not cpu_kernels.hooked(act) and \
        not (layer._forward_hooks or layer._forward_pre_hooks)


def block_tail_op(ge: nn.Module, norm: nn.Module, x: torch.Tensor,
                  identity: Optional[torch.Tensor],
                  relu: bool) -> Optional[torch.Tensor]:
    """``relu(ge(norm(x)) + identity)`` as one ``mmge::block_tail`` op,
    where the device's kernels take it (``gather_op.KERNELS``) and the
    op computes these modules: a plain affine batch norm, GE-theta-minus
    or GE-theta(-plus) of a local extent whose levels
    :func:`~.gather_op.op_args` accepts, a plain MLP
    (:func:`~.ge_autograd.plain_mlp`), no forward hooks. The running
    statistics are updated here from the op's, as the norms would.

    Args:
        ge (GatherExcite): The GE layer.
        norm (nn.Module): The block's norm before it.
        x (Tensor): The norm's input, (N, C, H, W).
        identity (Tensor, optional): The shortcut, of ``x``'s shape.
        relu (bool): Then the block's ReLU.

    Returns:
        Tensor | None: The block's output, or None where the op does not
        take the call.
    """
    if x.dim() != 4 or ge.extent == GLOBAL or \
            not gather_op.has_kernels('block_tail', x) or \
            not is_plain_batch_norm(norm) or norm.weight is None or \
            norm.bias is None or \
            cpu_kernels.hooked(ge.gather, ge.excite, norm):
        return None
    batch = uses_batch_stats(norm)
    n, c, h, w = x.shape
    if batch and n * h * w < 2:
        return None  # the module raises ValueError: let it
    levels = None
    if isinstance(ge.gather, ConvGather):
        levels = gather_op.op_args(ge.gather, x, 'block_tail')
        if levels is None:
            return None
    mlp, mlp_relu = [], False
    if ge.excite.mlp is not None:
        if not plain_mlp(ge.excite):
            return None
        first, second = (m.conv for m in ge.excite.mlp)
        mlp = [first.weight, first.bias, second.weight, second.bias]
        mlp_relu = ge.excite.mlp[0].with_activation
    gather = levels[:-1] if levels is not None else (
        [], [], [], [], [], False, 0.0, False)
    out = ge_ops.block_tail(x, identity, norm.weight, norm.bias,
                            norm.running_mean, norm.running_var, batch,
                            norm.eps, ge.extent, *gather, mlp, mlp_relu,
                            relu)
    if batch:
        update_running_stats(norm, out[1].detach(), out[2].detach(),
                             n * h * w)
    if levels is not None:
        gather_op.update(levels, x, out[3], out[4])
    return out[0]


def ge_block_tail(ge: nn.Module,
                  x: torch.Tensor,
                  identity: Optional[torch.Tensor] = None,
                  norm: Optional[nn.Module] = None,
                  relu: bool = False) -> torch.Tensor:
    """``relu(ge(norm(x)) + identity)``, fused.

    In this order: a shortcut that only broadcasts is added after a call
    without it; without autograd, a prepared native call from an earlier
    forward is replayed when it still fits (:mod:`.prepared_inference`);
    :func:`~.ge_autograd.native_plan` decides whether the native CPU kernels
    take the call; under ``torch.compile`` it is the modules and the ops;
    with autograd, the default mode after a plain batch norm off the native
    kernels takes :mod:`.input_recompute`, anything else
    :class:`~.ge_autograd.GEFunction`; without autograd, the native
    inference call, or the modules and the ops.

    Args:
        ge (GatherExcite): The GE layer.
        x (Tensor): (N, C, H, W): with ``norm``, the norm's input.
        identity (Tensor, optional): The block's shortcut (added in the same
            pass when it has ``x``'s shape; one that broadcasts is added
            after).
        norm (nn.Module, optional): The norm layer feeding GE: GE's input is
            ``norm(x)``. Required by the memory-saving mode.
        relu (bool): Then the block's ReLU. Defaults to False.

    Returns:
        Tensor: Same shape as ``x``.

    Raises:
        ValueError: In the memory-saving mode, if ``norm`` is not given.
    """
    if ge.memory_efficient and norm is None:
        raise ValueError(
            'GatherExcite(memory_efficient=True) recomputes its input from '
            'the norm layer before it, so it must be called through '
            'ge_block_tail(ge, x, identity, norm=...), as GEResNet, '
            'GEResLayer and GEShuffleNetV1 do; as a plugin of mmdet\'s '
            'ResNet it only sees the norm\'s output: use '
            'memory_efficient=False there')
    if isinstance(ge.gather, ConvGather):
        # a global extent's size, before a norm counts the batch
        ge.gather.check_size(x)
    if identity is not None and identity.shape != x.shape:
        # the fused passes add a shortcut of x's own shape; one that
        # broadcasts is added after them
        out = ge_block_tail(ge, x, norm=norm) + identity
        return out.relu_() if relu else out
    replay = not torch.is_grad_enabled() and \
        not torch.compiler.is_compiling() and not torch.jit.is_tracing()
    if replay:
        prepared = ge.__dict__.get('_prepared')
        if prepared is not None:
            out = prepared(ge, x, identity, norm, relu)
            if out is not None:
                return out
            ge._prepared = None
    plan = native_plan(ge, norm, x, identity)
    if norm is not None and not ge.memory_efficient and \
            plan is None and torch.is_grad_enabled() and \
            not is_plain_batch_norm(norm):
        # another norm (SyncBN's forward communicates, GroupNorm's
        # costs more than a batch norm's affine): keep GE's own input
        # rather than run it again in backward. After a plain batch
        # norm both modes keep the norm's input, which the network
        # keeps anyway (the native path makes GE's input on the fly;
        # elsewhere it is made again from the norm's statistics)
        x, norm = norm(x), None
        plan = native_plan(ge, norm, x, identity)
    if torch.compiler.is_compiling():
        # the whole tail as one op where its kernels take it (in eager
        # mode GEFunction and native_inference call the same kernels);
        # else the ops, and the compiler plans the memory between them
        out = None if norm is None else block_tail_op(ge, norm, x,
                                                      identity, relu)
        if out is not None:
            return out
        if norm is not None:
            x = norm(x)
        return ge.excite(x, ge.gather(x), identity, relu)
    if torch.is_grad_enabled():
        if norm is not None and plan is None and \
                not ge.memory_efficient and \
                input_recompute.usable(ge, norm, x):
            # the default mode off the native kernels, after a plain
            # batch norm: the gather's small maps kept, GE's input made
            # again in backward (nothing asks for a gradient: autograd
            # records nothing, and the values are the same)
            return input_recompute.forward(ge, norm, x, identity, relu)
        params = tuple(
            p for m in (ge, norm) if m is not None
            for p in m.parameters() if p.requires_grad)
        if x.requires_grad or params or (identity is not None
                                         and identity.requires_grad):
            out = GEFunction.apply(ge, norm, plan, x, identity,
                                   *params)
            return out.relu_() if relu else out
    if replay and plan is not None:
        prepared = PreparedInference.build(ge, norm, plan, x, identity,
                                           relu)
        if prepared is not None:
            ge._prepared = prepared
            return prepared.run(x, identity)
    out = native_inference(ge, norm, plan, x, identity, relu)
    if out is not None:
        return out
    if norm is not None:
        x = norm(x)
    return ge.excite(x, ge.gather(x), identity, relu)
