"""Backward of Gather-Excite that recomputes instead of storing.

Autograd, left to itself, keeps for backward every tensor the gather and the
excite make: the layer's input, the gather's intermediate maps and the gate.
:class:`GEFunction` keeps only one tensor per layer, its input, and
recomputes the cheap rest (the gather runs at 1/2 resolution and below) in
backward. Given the norm layer that feeds GE, it keeps that layer's input
instead, which the plain network keeps anyway, so GE then stores nothing of
its own (the memory-saving mode, ``GatherExcite(memory_efficient=True)``,
and the default mode on float32 CPU tensors; off those, the default mode
keeps the gather's maps instead of making them again: :mod:`.input_recompute`).
Outputs and gradients are those of the plain formula; only what is stored
between forward and backward changes.

With a local extent on float32 CPU tensors, contiguous or channels-last
(:func:`cpu_kernels.maps_usable`), every variant has a
second path written out by hand on the native kernels of
:mod:`.cpu_kernels` (:func:`native_plan` decides): GE-theta-minus's pool,
gate gradient and input gradient are one memory pass each; GE-theta's and
GE-theta-plus's whole gather runs in one kernel, forward and backward, and
in the forward the same call makes the gate (the MLP included) and the
excite.
Given a plain ``BatchNorm2d`` (in both modes) this path keeps the norm's
input and makes GE's input on the fly inside the kernels (GE-theta-plus,
outside the memory-saving mode, also keeps its context, 1 / 4^levels of
the input, which its backward's MLP then need not gather again); for
GE-theta and GE-theta-plus the gather's kernel also runs the norm itself,
forward (its batch statistics from the same pass) and backward, so the
norm's output is never materialised (:func:`native_norm_excite`); without
autograd (:func:`native_inference`) no variant materialises it. There,
where the whole layer is one kernel call, :mod:`.prepared_inference`
replays that call from the second forward on.
"""
import contextlib
from typing import ContextManager, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from ...ops import cpu_kernels, ge_ops
from .batch_norm import (batch_norm_again, batch_norm_backward,
                         batch_norm_forward, batch_stats_state,
                         check_batch_size, is_plain_batch_norm,
                         norm_with_state, running_stats_state,
                         update_running_stats, uses_batch_stats)
from ...ops.resize import channels_last
from .depthwise_conv import is_plain_conv
from .args import GLOBAL


def call_frozen(module: nn.Module, *args) -> torch.Tensor:
    """Run ``module`` without touching its buffers.

    A recomputation must not update running statistics a second time (the
    batch statistics a norm layer uses in training do not depend on them).
    Where every buffer belongs to a batch norm, its norms in training run
    with ``track_running_stats`` off for this call: they then normalise
    with the batch's statistics, as in training, and write nothing. A module
    with other buffers runs on copies of them
    (``torch.func.functional_call``, several times slower in Python: this
    runs once per layer and step).

    Args:
        module (nn.Module): The module to run.
        *args: Its inputs.

    Returns:
        Tensor: The module's output.
    """
    if not module.training:
        return module(*args)  # no buffer is written outside training
    norms, other = [], False
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            if m.training and m.track_running_stats:
                norms.append(m)
        elif next(m.buffers(recurse=False), None) is not None:
            other = True
    if other:
        buffers = {name: b.clone() for name, b in module.named_buffers()}
        return torch.func.functional_call(module, buffers, args)
    try:
        for m in norms:
            m.track_running_stats = False
        return module(*args)
    finally:
        for m in norms:
            m.track_running_stats = True


def autocast_state(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``device_type`` (None when off).

    A backward that recomputes part of the forward must run it under the
    same autocast as the forward did: the recomputation then sees the
    dtypes the forward saw (a bfloat16 input against float32 weights is
    an error outside autocast) and makes the same values.

    Args:
        device_type (str): ``'cpu'``, ``'cuda'``, ...

    Returns:
        torch.dtype | None: The dtype, or None.
    """
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_as(device_type: str,
                dtype: Optional[torch.dtype]) -> ContextManager:
    """Autocast as :func:`autocast_state` found it (a no-op for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


#: a native plan of GE-theta-minus (its pool has no parameters)
POOL = 'pool'

NativePlan = Union[str, cpu_kernels.ConvGatherParams]


def conv_gather_params(gather: nn.Module, x: torch.Tensor
                       ) -> Optional[cpu_kernels.ConvGatherParams]:
    """The levels as the native kernel takes them, or None where it
    does not apply.

    The kernel (:func:`cpu_kernels.conv_gather`) runs the gather that
    :class:`~.gather.ConvGather` builds with a local extent: per level a
    depthwise 3x3 ``nn.Conv2d`` of stride 2, padding 1 and no bias, a plain batch norm
    (:func:`is_plain_batch_norm`) and an optional ``nn.ReLU``, in that
    order, on :func:`cpu_kernels.usable` float32 tensors (``x``
    contiguous or channels-last, :func:`cpu_kernels.maps_usable`). Any
    other
    layer (another norm or activation, a global extent, GPU, float64,
    tracing) takes the modules' own forward.

    Args:
        x (Tensor): The gather's input, (N, C, H, W).

    Returns:
        ConvGatherParams | None: The modules' tensors (the kernel reads
        them where they are, as ATen's ops would).
    """
    levels = len(gather.convs)
    if gather.extent == GLOBAL or x.dim() != 4 or \
            levels > cpu_kernels.MAX_LEVELS:
        return None
    n, c, h, w = x.shape
    weights, gammas, betas, means, variances = [], [], [], [], []
    eps, train, relu = [], [], []
    # the modules' own dicts, read directly: this runs on every forward,
    # and each nn.Module.__getattr__ lookup costs about half a microsecond
    for m in gather.convs._modules.values():
        modules = m._modules
        conv = modules.get('conv')
        norm = modules.get(m.norm_name) if m.with_norm else None
        if not (tuple(m.order) == ('conv', 'norm', 'act')
                and not m.with_explicit_padding
                and is_plain_conv(conv)
                and conv.kernel_size == (3, 3) and conv.stride == (2, 2)
                and conv.padding == (1, 1) and conv.dilation == (1, 1)
                and conv.groups == c == conv.in_channels
                and conv.out_channels == c
                and conv._parameters.get('bias') is None
                and conv.padding_mode == 'zeros'
                and is_plain_batch_norm(norm)
                and norm.num_features == c
                and (not m.with_activation
                     or type(modules.get('activate')) is nn.ReLU)):
            return None
        h, w = -(-h // 2), -(-w // 2)
        batch = uses_batch_stats(norm)
        if batch and n * h * w < 2:
            return None  # the module raises ValueError: let it
        weights.append(conv._parameters['weight'])
        gammas.append(norm._parameters.get('weight'))
        betas.append(norm._parameters.get('bias'))
        means.append(None if batch else norm._buffers['running_mean'])
        variances.append(None if batch else norm._buffers['running_var'])
        eps.append(float(norm.eps))
        train.append(batch)
        relu.append(m.with_activation)
    params = cpu_kernels.ConvGatherParams(
        tuple(weights), tuple(gammas), tuple(betas), tuple(means),
        tuple(variances), tuple(eps), tuple(train), tuple(relu))
    return params if cpu_kernels.maps_usable(x) and \
        cpu_kernels.usable(*params.tensors) else None


def conv_gather_forward(
        gather: nn.Module,
        x: torch.Tensor,
        params: cpu_kernels.ConvGatherParams,
        scale: Optional[torch.Tensor] = None,
        shift: Optional[torch.Tensor] = None,
        norm: Optional[cpu_kernels.FusedNorm] = None,
        channels_last: bool = False,
        excite: Optional[cpu_kernels.Excitation] = None,
        keep_context: bool = False
) -> cpu_kernels.ConvGatherResult:
    """The gather of ``scale[c] * x + shift[c]``, of ``norm(x)``, or of
    ``x``, on the native kernel (with ``excite``, the excite too),
    updating the levels' running statistics as their forward would.

    Args:
        x (Tensor): (N, C, H, W).
        params (ConvGatherParams): From :func:`conv_gather_params`.
        scale (Tensor, optional): Per-channel scale, (C, ).
        shift (Tensor, optional): Per-channel shift, (C, ).
        norm (FusedNorm, optional): The batch norm before the gather
            (in training the caller updates its running statistics from
            the result).
        channels_last (bool): The context channels-last in memory.
        excite (Excitation, optional): The excite to run in the same
            call (:func:`cpu_kernels.conv_gather`).
        keep_context (bool): With ``excite``, return the context too
            (channels-last). Defaults to False.

    Returns:
        ConvGatherResult: ``context`` is the context, (N, C,
        ceil(H/e), ceil(W/e)), or with ``excite`` ``out`` the excite's
        output (and the context with ``keep_context``); with a training
        ``norm``, ``norm_mean`` and
        ``norm_var`` are its batch statistics.
    """
    running, rest = _running_update(gather, params)
    result = cpu_kernels.conv_gather(x, params, scale, shift, norm=norm,
                                     channels_last=channels_last,
                                     excite=excite,
                                     keep_context=keep_context,
                                     running=running)
    n, _, h, w = x.shape
    for level, m in enumerate(gather.convs._modules.values()):
        h, w = -(-h // 2), -(-w // 2)
        if level in rest:
            update_running_stats(m._modules[m.norm_name],
                                 result.mean[level], result.var[level],
                                 n * h * w)
    return result


def _running_update(
    gather: nn.Module, params: cpu_kernels.ConvGatherParams
) -> Tuple[Optional[cpu_kernels.RunningUpdate], Tuple[int, ...]]:
    """The training levels' running statistics the kernel updates in
    its call (float32 running statistics of a norm in training mode;
    the momentum as :func:`update_running_stats` takes it), and the
    training levels left to :func:`update_running_stats` after it."""
    means, variances, counts, momenta, rest = [], [], [], [], []
    for level, (m, train) in enumerate(
            zip(gather.convs._modules.values(), params.train)):
        norm = m._modules[m.norm_name]
        buffers = norm._buffers
        mean, var = buffers.get('running_mean'), buffers.get('running_var')
        count = buffers.get('num_batches_tracked')
        kernel = train and norm.training and norm.track_running_stats \
            and cpu_kernels.usable(mean, var) and mean is not None \
            and var is not None
        if train and not kernel:
            rest.append(level)
        momentum = norm.momentum
        if kernel and momentum is None:
            # cumulative: 1 / num_batches_tracked after the increment
            momentum = 0.0 if count is None else 1.0 / (int(count) + 1)
        means.append(mean if kernel else None)
        variances.append(var if kernel else None)
        counts.append(count if kernel else None)
        momenta.append(float(momentum) if kernel else 0.0)
    if not any(t is not None for t in means):
        return None, tuple(rest)
    return cpu_kernels.RunningUpdate(tuple(means), tuple(variances),
                                     tuple(counts),
                                     tuple(momenta)), tuple(rest)


def native_plan(layer: nn.Module, norm: Optional[nn.Module],
                inp: torch.Tensor,
                identity: Optional[torch.Tensor]) -> Optional[NativePlan]:
    """Whether, and how, :class:`GEFunction` takes the native path.

    Args:
        layer (nn.Module): The GE layer.
        norm (nn.Module | None): The norm layer feeding it, if any.
        inp (Tensor): The input.
        identity (Tensor | None): The shortcut.

    Returns:
        str | ConvGatherParams | None: :data:`POOL` for GE-theta-minus with
        a local extent, the gather's :func:`conv_gather_params` for
        GE-theta and GE-theta-plus whose gather the kernel runs, and None
        otherwise; None too unless the tensors are float32 CPU tensors,
        contiguous or channels-last with ``identity`` in ``inp``'s layout
        (:func:`cpu_kernels.maps_usable`), ``identity`` (if any) has
        ``inp``'s shape and ``norm`` is
        None or a plain batch norm, and when the gather, the excite or the
        norm has forward hooks (the analysis probes; the kernels stand in
        for the norm's call, so a hook on it would not fire).
    """
    if not (inp.dim() == 4 and layer.extent != GLOBAL
            and (norm is None or is_plain_batch_norm(norm))
            and (identity is None or identity.shape == inp.shape)
            and cpu_kernels.maps_usable(inp, identity)) or \
            cpu_kernels.hooked(layer.gather, layer.excite, norm):
        return None
    if layer.variant == 'theta_minus':
        return POOL
    return conv_gather_params(layer.gather, inp)


def native_excite(x: torch.Tensor, gate: torch.Tensor,
                  identity: Optional[torch.Tensor],
                  own: bool) -> torch.Tensor:
    """``x * resize(gate) (+ identity)`` on the native kernel
    (:func:`native_plan`'s operands), in place when ``own``.

    Args:
        x (Tensor): The features, (N, C, H, W).
        gate (Tensor): The gate, (N, C, h, w).
        identity (Tensor, optional): The shortcut.
        own (bool): ``x`` is a tensor nobody else holds.

    Returns:
        Tensor: The gated features.
    """
    return cpu_kernels.excite(x, gate, identity, out=x if own else None)


def native_inference(layer: nn.Module, norm: Optional[nn.Module],
                     plan: Optional[NativePlan], inp: torch.Tensor,
                     identity: Optional[torch.Tensor],
                     relu: bool = False) -> Optional[torch.Tensor]:
    """GE without autograd on the native kernels, where they apply.

    The norm's output ``y = norm(inp)`` is never materialised: the gather
    and the excite make it on the fly from ``inp`` (so a block with GE
    makes no more full-resolution passes than one without: the gather's
    read replaces the norm's write). For GE-theta(-plus) the gather's
    kernel also runs a norm in training mode (:func:`native_norm_excite`).

    Args:
        layer (nn.Module): The GE layer.
        norm (nn.Module | None): The norm feeding it: None, or a plain batch
            norm.
        plan (str | ConvGatherParams | None): :func:`native_plan`'s answer.
        inp (Tensor): The norm's input (GE's input without a norm).
        identity (Tensor | None): The shortcut.
        relu (bool): Then a ReLU, in the excite's pass.

    Returns:
        Tensor | None: ``y * resize(gate) (+ identity)``, or None when the
        kernels do not apply (no plan, or GE-theta-minus after a norm in
        training mode).
    """
    if plan is None:
        return None
    if plan != POOL:
        return native_norm_excite(layer, norm, plan,
                                  native_mlp(layer.excite), inp, identity,
                                  relu, want_state=False)[0]
    if norm is not None and uses_batch_stats(norm):
        return None
    fused = None if norm is None else cpu_kernels.FusedNorm(
        norm.weight, norm.bias, norm.eps, norm.running_mean,
        norm.running_var)
    return cpu_kernels.pool_excite(inp, layer.extent, identity, relu=relu,
                                   norm=fused)


def pool_gate(layer: nn.Module, inp: torch.Tensor,
              scale: Optional[torch.Tensor],
              shift: Optional[torch.Tensor]) -> torch.Tensor:
    """GE-theta-minus's gate of ``y = scale[c] * inp + shift[c]`` (or
    ``inp``) on the pool kernel.

    Args:
        layer (nn.Module): The GE layer.
        inp (Tensor): (N, C, H, W).
        scale (Tensor, optional): Per-channel scale.
        shift (Tensor, optional): Per-channel shift.

    Returns:
        Tensor: ``sigmoid(pool(y))``.
    """
    return cpu_kernels.pool_gather(inp, layer.extent, scale,
                                   shift).sigmoid_()


def _as_context(t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``t``, a channels-last (N, C, h, w) view, in ``context``'s layout:
    as it is for a channels-last context, else contiguous."""
    return t if channels_last(context) else t.contiguous()


def plain_mlp(excite: nn.Module) -> bool:
    """Whether an :class:`~.excite.Excite`'s MLP has the layout that class
    builds: two 1x1
    ``nn.Conv2d`` with bias, no norm, a ReLU or nothing after the
    first and nothing after the second."""
    first, second = excite.mlp
    return all(
        tuple(m.order) == ('conv', 'norm', 'act') and not m.with_norm
        and type(m.conv) is nn.Conv2d and m.conv.kernel_size == (1, 1)
        and m.conv.groups == 1 and m.conv.bias is not None
        for m in excite.mlp) and not second.with_activation and (
            not first.with_activation
            or type(first.activate) is nn.ReLU)


def gate_backward(excite: nn.Module, context: torch.Tensor,
                  grad_gate: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """An :class:`~.excite.Excite`'s gate and the gradients of the context
    and the MLP's parameters for the gate's gradient ``grad_gate``.

    Args:
        excite (Excite): The excite.
        context (Tensor): Gathered context (N, C, h, w).
        grad_gate (Tensor): Gradient of ``excite.gate``'s output.

    Returns:
        tuple: ``gate``, ``grad_context`` and, per parameter of the MLP
        that requires grad (in ``parameters()`` order), its gradient.
        For the plain layout the products are written out by hand (no
        autograd graph: the context is small and the graph's overhead
        is not); else autograd runs ``excite.gate``.
    """
    params = [p for p in excite.parameters() if p.requires_grad]
    if excite.mlp is None or not plain_mlp(excite) or context.dim() != 4:
        with torch.enable_grad():
            leaf = context.detach().requires_grad_(True)
            gate = excite.gate(leaf)
        grads = torch.autograd.grad(gate, [leaf] + params, grad_gate)
        return (gate.detach(), ) + tuple(grads)
    first, second = (m.conv for m in excite.mlp)
    n, c, h, w = context.shape
    rows = context.permute(0, 2, 3, 1).reshape(-1, c)
    hidden = F.linear(rows, first.weight.flatten(1), first.bias)
    if excite.mlp[0].with_activation:
        hidden = hidden.clamp_min_(0)
    gate = F.linear(hidden, second.weight.flatten(1),
                    second.bias).sigmoid_()
    d_out = grad_gate.permute(0, 2, 3, 1).reshape(-1, c) * gate * (
        1 - gate)
    d_hidden = d_out @ second.weight.flatten(1)
    if excite.mlp[0].with_activation:
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


def native_mlp(excite: nn.Module) -> Optional[cpu_kernels.MLPParams]:
    """GE-theta-plus's MLP as the gather's kernel runs it, where it can.

    Args:
        excite (nn.Module): The GE layer's :class:`Excite`.

    Returns:
        MLPParams | None: The MLP's tensors when it has the plain layout
        (:func:`plain_mlp`) on :func:`cpu_kernels.usable` tensors
        and CPU autocast is off (under autocast the modules run it in
        bfloat16); else None.
    """
    if excite.mlp is None or not plain_mlp(excite) or \
            torch.is_autocast_enabled('cpu'):
        return None
    first, second = excite.mlp
    params = cpu_kernels.MLPParams(first.conv.weight, first.conv.bias,
                                   second.conv.weight, second.conv.bias,
                                   first.with_activation)
    return params if cpu_kernels.usable(*params[:4]) else None


def native_norm_excite(
        layer: nn.Module, norm: Optional[nn.Module],
        plan: cpu_kernels.ConvGatherParams,
        mlp: Optional[cpu_kernels.MLPParams], inp: torch.Tensor,
        identity: Optional[torch.Tensor], relu: bool = False,
        want_state: bool = True, keep_context: bool = False
) -> Tuple[torch.Tensor, Optional[Dict[str, object]],
           Optional[torch.Tensor]]:
    """GE-theta's or GE-theta-plus's output for ``y = norm(inp)`` (or
    ``inp``), with ``y`` never materialised.

    One kernel call (:func:`cpu_kernels.conv_gather` with an
    :class:`~cpu_kernels.Excitation`) runs the norm, the gather, the gate
    (GE-theta-plus's MLP included) and the excite: a norm with batch
    statistics computes them in the gather's pass over ``inp``, one with
    running statistics is a per-channel affine made on the fly. A
    GE-theta-plus MLP the kernel does not run (another layout, autocast)
    runs between the gather's call and the excite's.

    Args:
        layer (nn.Module): The GE layer.
        norm (nn.Module | None): The plain batch norm feeding it, if any.
        plan (ConvGatherParams): :func:`native_plan`'s answer.
        mlp (MLPParams | None): :func:`native_mlp` of the layer's excite
            (the caller's, who may keep it for the backward).
        inp (Tensor): (N, C, H, W).
        identity (Tensor | None): The shortcut.
        relu (bool): Then a ReLU, in the excite's pass.
        want_state (bool): Return the norm's state (a backward needs it).
            Defaults to True.
        keep_context (bool): Also return GE-theta-plus's context where the
            kernel runs its MLP (:func:`native_mlp`), for the backward not
            to gather it again. Defaults to False.

    Returns:
        tuple: ``y * resize(gate) (+ identity)``, the norm's state (as
        :func:`batch_norm_forward`'s; None without a norm or without
        ``want_state``) and the context (channels-last in memory; None
        unless kept). The running statistics are updated as the modules'
        forward would.
    """
    fused = state = None
    batch = norm is not None and uses_batch_stats(norm)
    if batch:
        count = check_batch_size(inp.shape)
        fused = cpu_kernels.FusedNorm(norm.weight, norm.bias, norm.eps)
    elif norm is not None:
        fused = cpu_kernels.FusedNorm(norm.weight, norm.bias, norm.eps,
                                      norm.running_mean, norm.running_var)
    context = None
    if layer.excite.mlp is None or mlp is not None:
        result = conv_gather_forward(
            layer.gather, inp, plan, norm=fused,
            excite=cpu_kernels.Excitation(identity, relu, mlp),
            keep_context=keep_context and mlp is not None)
        out, context = result.out, result.context
    else:
        # the context channels-last: the MLP's rows as they are
        result = conv_gather_forward(layer.gather, inp, plan, norm=fused,
                                     channels_last=True)
        out = None
    if batch:
        state = batch_stats_state(norm, result.norm_mean, result.norm_var,
                                  count)
    elif norm is not None and (want_state or out is None):
        state = running_stats_state(norm)
    if out is None:
        # float32 for the kernel: autocast may run the MLP in bfloat16
        gate = layer.excite.gate(result.context).float()
        scale, shift = (None, None) if state is None else (state['scale'],
                                                           state['shift'])
        out = cpu_kernels.excite(inp, gate, identity, scale=scale,
                                 shift=shift, relu=relu)
    return out, state, context


class GEFunction(torch.autograd.Function):
    """``out = x * resize(gate(x)) (+ identity)``, ``x = norm(inp)`` or
    ``inp``, storing only ``inp`` for backward.

    ``apply(layer, norm, plan, inp, identity, *params)``: ``layer`` has a
    ``gather`` module and an ``excite`` with ``gate(context)`` (a
    :class:`GatherExcite`);
    ``norm`` is the module feeding GE, or None when ``inp`` is ``x``
    itself; ``plan`` is :func:`native_plan`'s answer; ``params`` are the
    parameters of both that require grad, passed so that autograd hands
    their gradients on (DDP's hooks included).
    """

    @staticmethod
    def forward(ctx, layer: nn.Module, norm: Optional[nn.Module],
                plan: Optional[NativePlan], inp: torch.Tensor,
                identity: Optional[torch.Tensor],
                *params: torch.Tensor) -> torch.Tensor:
        ctx.layer, ctx.norm, ctx.plan = layer, norm, plan
        ctx.with_identity = identity is not None
        # the backward recomputes under the forward's autocast
        ctx.autocast = (inp.device.type, autocast_state(inp.device.type))
        context = None
        if plan is None:
            # a plain batch norm's statistics make x again in backward, in
            # one pass
            x, ctx.norm_state = (inp, None) if norm is None else \
                norm_with_state(norm, inp)
            out = layer.excite(x, layer.gather(x), identity)
        elif plan == POOL:
            # GE-theta-minus: the norm's output is made once, gated in place
            x, ctx.norm_state = (inp, None) if norm is None else \
                batch_norm_forward(norm, inp)
            scale, shift = ctx.affine = (None, None) if norm is None else \
                (ctx.norm_state['scale'], ctx.norm_state['shift'])
            out = native_excite(x, pool_gate(layer, inp, scale, shift),
                                identity, own=norm is not None)
        else:
            # GE-theta(-plus): the norm's output is never materialised.
            # Outside the memory-saving mode GE-theta-plus keeps its context
            # (1 / 4^levels of the input) for the backward's MLP; the
            # backward also takes native_mlp's answer from here (None under
            # autocast: the MLP then runs on autograd there too)
            ctx.mlp = native_mlp(layer.excite)
            out, ctx.norm_state, context = native_norm_excite(
                layer, norm, plan, ctx.mlp, inp, identity,
                keep_context=not layer.memory_efficient)
            ctx.affine = (None, None) if norm is None else \
                (ctx.norm_state['scale'], ctx.norm_state['shift'])
        # the parameters' identities as given: under checkpointing the
        # saved tensors unpack as other objects
        ctx.param_ids = [id(p) for p in params]
        ctx.kept_context = context is not None
        ctx.save_for_backward(inp, *params, *(
            (context, ) if context is not None else ()))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        if ctx.plan is not None:  # grad has the output's dtype and device
            return GEFunction.native_backward(ctx, grad)
        inp, *params = ctx.saved_tensors  # no context kept without a plan
        layer, norm, state = ctx.layer, ctx.norm, ctx.norm_state
        with torch.enable_grad(), autocast_as(*ctx.autocast):
            if state is not None:
                # x from the forward's statistics; autograd runs the gather,
                # the norm's backward runs at the end
                mask = [ctx.needs_input_grad[3]] + [
                    p is not None and p.requires_grad
                    for p in (norm.weight, norm.bias)]
                leaf = batch_norm_again(norm, state, inp).requires_grad_(
                    any(mask))
                x = leaf
            else:
                leaf = inp.detach().requires_grad_(ctx.needs_input_grad[3])
                x = leaf if norm is None else call_frozen(norm, leaf)
            gate = layer.excite.gate(call_frozen(layer.gather, x))
        gate_value = gate.detach()
        x_value = x.detach()
        grad_gate = ge_ops.excite_gate_grad(grad, x_value, gate_value)
        outputs: List[torch.Tensor] = [gate]
        grad_outputs: List[torch.Tensor] = [grad_gate]
        if norm is not None and state is None:
            # the direct path joins the gather's inside the norm's backward
            outputs.append(x)
            grad_outputs.append(ge_ops.excite(grad, gate_value))
        inputs = [t for t in [leaf] + params if t.requires_grad]
        grads = torch.autograd.grad(
            outputs, inputs, grad_outputs, allow_unused=True) \
            if inputs else ()
        grads = dict(zip(map(id, inputs), grads))
        grad_inp = grads.get(id(leaf))
        if (norm is None or state is not None) and leaf.requires_grad:
            # gather path + direct path in one pass
            grad_inp = ge_ops.excite(grad, gate_value, grad_inp).to(
                x_value.dtype)
        # by the parameters' identities as given (under saved-tensor hooks
        # and checkpointing the saved ones unpack as other objects)
        by_param = {i: grads.get(id(p)) for i, p in zip(ctx.param_ids,
                                                        params)}
        if state is not None and leaf.requires_grad:
            grad_inp, grad_weight, grad_bias = batch_norm_backward(
                norm, state, grad_inp, inp, mask)
            for p, g, wanted in ((norm.weight, grad_weight, mask[1]),
                                 (norm.bias, grad_bias, mask[2])):
                if wanted:
                    by_param[id(p)] = g
        grad_identity = grad if ctx.with_identity else None
        return (None, None, None, grad_inp, grad_identity,
                *[by_param.get(i) for i in ctx.param_ids])

    @staticmethod
    def native_backward(ctx, grad: torch.Tensor) -> tuple:
        """Backward on the native kernels.

        With ``y = norm(inp)`` (or ``inp``), ``g`` the gate and
        ``out = y * resize(g) + identity``: ``dg = resize^T(grad * y)``,
        ``dy = grad * resize(g) + gather^T(d context)``, and ``dy`` goes
        through the norm's backward. ``y`` is made on the fly from ``inp``
        (a per-channel affine) inside the kernels. GE-theta-minus:
        ``d context = dg * g * (1 - g)`` and the pool's backward, on
        :func:`cpu_kernels.input_grad`, then ATen's batch norm backward.
        GE-theta and GE-theta-plus: :func:`cpu_kernels.conv_gather_backward`
        recomputes the gather, runs it backwards and runs the norm's
        backward; GE-theta-plus's MLP runs in between, forward and
        backward, inside the same call (:func:`native_mlp`); an MLP the
        kernel does not run goes through :func:`gate_backward`
        between a first kernel call for the gate's gradient and the
        backward's.

        Args:
            ctx: The autograd context.
            grad (Tensor): Gradient of the output.

        Returns:
            tuple: Gradients of :meth:`forward`'s inputs.
        """
        saved = ctx.saved_tensors  # once: checkpointing unpacks them once
        inp = saved[0]
        kept_context = saved[-1] if ctx.kept_context else None
        layer, norm, plan = ctx.layer, ctx.norm, ctx.plan
        # in the input's layout (the gather's kernel reads channels-last
        # too); a no-op where it already is
        grad = grad.contiguous(memory_format=torch.channels_last
                               if channels_last(inp) else
                               torch.contiguous_format)
        scale, shift = ctx.affine
        by_param: Dict[int, torch.Tensor] = {}
        if plan == POOL:
            gate = pool_gate(layer, inp, scale, shift)
            grad_gate = cpu_kernels.gate_grad(grad, inp, gate.shape[-2:],
                                              scale, shift)
            grad_pool = grad_gate.mul_(gate).mul_(1 - gate)
            grad_x = cpu_kernels.input_grad(grad, gate, grad_pool,
                                            layer.extent)
        else:
            gate = dcontext = level1 = None
            state = ctx.norm_state
            stats = None if norm is None else cpu_kernels.NormStats(
                state['mean'], state['invstd'], state['train'])
            mlp = ctx.mlp
            if layer.excite.mlp is not None and mlp is None:
                # an MLP the kernel does not run, on autograd between two
                # calls; channels-last, the first also makes the second's
                # first pass (given the norm's statistics)
                first = cpu_kernels.conv_gather(
                    inp, plan, scale, shift, grad, keep_level1=True,
                    channels_last=True,
                    stats=stats if channels_last(inp) else None)
                context, grad_gate, level1 = (first.context,
                                              first.grad_gate, first.level1)
                weights = [p for p in layer.excite.parameters()
                           if p.requires_grad]
                with autocast_as(*ctx.autocast):
                    gate, dcontext, *grads = gate_backward(
                        layer.excite, context, grad_gate)
                by_param.update(zip(map(id, weights), grads))
                gate, dcontext = gate.float(), dcontext.float()
            grads = cpu_kernels.conv_gather_backward(
                inp, plan, grad, scale, shift, gate, dcontext, level1, stats,
                mlp=mlp, context=kept_context)
            grad_x = grads.dx
            if mlp is not None:
                # the MLP's backward ran inside the call
                first, second = (m.conv for m in layer.excite.mlp)
                for p, g in ((first.weight, grads.mlp_dweight1),
                             (first.bias, grads.mlp_dbias1),
                             (second.weight, grads.mlp_dweight2),
                             (second.bias, grads.mlp_dbias2)):
                    if p is not None and p.requires_grad:
                        by_param[id(p)] = g.view_as(p)
            for level, m in enumerate(layer.gather.convs):
                by_param[id(m.conv.weight)] = grads.dweight[level].view_as(
                    m.conv.weight)
                if m.norm.weight is not None:
                    by_param[id(m.norm.weight)] = grads.dgamma[level]
                if m.norm.bias is not None:
                    by_param[id(m.norm.bias)] = grads.dbeta[level]
            if norm is not None:
                # the kernel ran the norm's backward too
                for p, g in ((norm.weight, grads.norm_dweight),
                             (norm.bias, grads.norm_dbias)):
                    if p is not None and p.requires_grad:
                        by_param[id(p)] = g
                norm = None
        grad_inp = grad_x
        if norm is not None:
            weight, bias = norm.weight, norm.bias
            mask = [ctx.needs_input_grad[3],
                    weight is not None and weight.requires_grad,
                    bias is not None and bias.requires_grad]
            grad_inp, grad_weight, grad_bias = batch_norm_backward(
                norm, ctx.norm_state, grad_x, inp, mask)
            if mask[1]:
                by_param[id(weight)] = grad_weight
            if mask[2]:
                by_param[id(bias)] = grad_bias
        if not ctx.needs_input_grad[3]:
            grad_inp = None
        grad_identity = grad if ctx.with_identity else None
        return (None, None, None, grad_inp, grad_identity,
                *[by_param.get(i) for i in ctx.param_ids])
