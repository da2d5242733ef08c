"""GE's inference kernel call, prepared once per layer and replayed.

Without autograd, a GE layer on the native CPU path is one kernel call
(:func:`~.ge_autograd.native_inference`). Deciding that the call applies
(:func:`~.ge_autograd.native_plan` walks the modules and checks every
tensor) and marshalling its arguments through :mod:`ctypes` costs about
75 us of Python on small maps, and several times that inside a network,
where the convolutions between two GE layers evict the interpreter's objects
from the caches. :class:`PreparedInference` does that work once, keeps the
marshalled arguments, and on later calls checks only what can change
between forwards before replaying the call with the new input, shortcut and
output.
"""
import ctypes
from typing import List, Optional

import torch
import torch.nn as nn
from torch.nn.modules import module as torch_module

from ...ops import cpu_kernels
from .batch_norm import uses_batch_stats
from .ge_autograd import POOL, NativePlan, native_mlp


def fingerprint(layer: nn.Module,
                norm: Optional[nn.Module]) -> Optional[List[object]]:
    """What a prepared call depends on in the modules, in one list.

    For the GE layer's gather and excite and the norm feeding it, and all
    their submodules: each module itself (a replaced submodule is another
    object), its ``training`` flag, its ``eps`` and ``track_running_stats``
    where it has them, and the address of each parameter and buffer (0 for
    None: a tensor replaced, moved or converted has another address, since
    :class:`PreparedInference` keeps the old storage alive).

    Args:
        layer (nn.Module): The GE layer.
        norm (nn.Module | None): The norm feeding it.

    Returns:
        list | None: The fingerprint, or None when a forward hook (global
        or on one of the modules) would see calls the kernel stands in for.
    """
    if torch_module._global_forward_hooks or \
            torch_module._global_forward_pre_hooks:
        return None
    modules = layer._modules
    stack = [modules.get('gather'), modules.get('excite'), norm]
    state: List[object] = []
    # plain loops and bound methods: this runs on every call, and a
    # comprehension costs a function call per module
    add, pop, push = state.append, stack.pop, stack.extend
    while stack:
        m = pop()
        if m is None:
            continue
        d = m.__dict__
        if d['_forward_hooks'] or d['_forward_pre_hooks']:
            return None
        add(m)
        add(d['training'])
        for t in d['_parameters'].values():
            add(0 if t is None else t.data_ptr())
        buffers = d['_buffers']
        if buffers:  # a norm layer's eps and statistics
            add(d.get('eps'))
            add(d.get('track_running_stats'))
            for t in buffers.values():
                add(0 if t is None else t.data_ptr())
        push(d['_modules'].values())
    return state


class PreparedInference:
    """One GE layer's kernel call without autograd, ready to replay.

    Built by :meth:`build` from a call that takes the native path with
    frozen statistics (every batch norm involved in eval mode with running
    statistics): GE-theta-minus's ``ge_pool_excite``, or GE-theta's and
    GE-theta-plus's ``ge_conv_gather`` with the excite (and the MLP) in the
    same call. Calling it replays that call for a new input when nothing
    it depends on has changed, and returns None otherwise (the layer then
    takes its full path and prepares again). It checks on every call:

    - the input and the shortcut: shape, float32, on the CPU, and the
      strides of the building call's input (contiguous or channels-last);
    - the call: whether there is a shortcut, ``relu``, the number of
      threads, CPU autocast (GE-theta-plus's MLP);
    - the modules: :func:`fingerprint` of the layer and the norm passed
      (which norm, if any; hooks, train/eval, replaced modules or tensors,
      ``eps``).

    Copies and pickles of a layer do not carry it (it holds addresses).

    Args:
        fn (ctypes function): The kernel.
        name (str): Its name, for errors.
        args (list): Its arguments as marshalled for the building call.
        spec (ctypes.Structure | None): The excite's spec of a
            ``ge_conv_gather`` call (its shortcut and output are set per
            call); None for ``ge_pool_excite``.
        inp (Tensor): The building call's input.
        identity (Tensor | None): Its shortcut.
        relu (bool): Its ``relu``.
        autocast (bool): The call depends on CPU autocast being off.
        state (list): :func:`fingerprint` at building.
        keep (tuple): The tensors the arguments point to.
    """

    __slots__ = ('fn', 'name', 'args', 'spec', 'shape', 'stride',
                 'with_identity',
                 'relu', 'threads', 'autocast', 'state', 'pinned')

    def __init__(self, fn, name: str, args: list,
                 spec: Optional[ctypes.Structure], inp: torch.Tensor,
                 identity: Optional[torch.Tensor], relu: bool,
                 autocast: bool,
                 state: List[object], keep: tuple) -> None:
        self.fn, self.name, self.args, self.spec = fn, name, args, spec
        self.shape, self.stride = inp.shape, inp.stride()
        self.with_identity = identity is not None
        self.relu, self.autocast = relu, autocast
        self.threads = torch.get_num_threads()
        self.state = state
        # aliases of the storages read: while they live, no other tensor
        # takes their addresses, so an address in the fingerprint is the
        # same storage (the input, shortcut and output are set per call)
        skip = {id(inp), id(identity)}
        self.pinned = tuple(
            t.detach() for t in _tensors(keep) if id(t) not in skip)

    def __reduce__(self):
        return _dropped, ()

    @classmethod
    def build(cls, layer: nn.Module, norm: Optional[nn.Module],
              plan: NativePlan, inp: torch.Tensor,
              identity: Optional[torch.Tensor],
              relu: bool) -> Optional['PreparedInference']:
        """Prepare the call :func:`~.ge_autograd.native_inference` would
        make, when it is one kernel call with frozen statistics.

        Args:
            layer (nn.Module): The GE layer.
            norm (nn.Module | None): The plain batch norm feeding it.
            plan (str | ConvGatherParams): :func:`native_plan`'s answer
                (not None).
            inp (Tensor): The input (the norm's, with a norm).
            identity (Tensor | None): The shortcut, of ``inp``'s shape.
            relu (bool): Then a ReLU.

        Returns:
            PreparedInference | None: None when a norm uses batch
            statistics, when GE-theta-plus's MLP does not run in the
            kernel, when a norm's vector would be copied for the kernel
            (another dtype or layout: a copy would not see updates), when
            the shortcut's layout is not the input's (the call would read
            a copy), or under hooks.
        """
        if identity is not None and identity.stride() != inp.stride():
            return None
        state = fingerprint(layer, norm)
        if state is None or (norm is not None and uses_batch_stats(norm)):
            return None
        fused = None
        if norm is not None:
            fused = cpu_kernels.FusedNorm(norm.weight, norm.bias, norm.eps,
                                          norm.running_mean,
                                          norm.running_var)
            c = inp.shape[1]
            if any(t is not None and cpu_kernels._vector(t, c) is not t
                   for t in (fused.weight, fused.bias, fused.running_mean,
                             fused.running_var)):
                return None
        lib = cpu_kernels._library()
        if plan == POOL:
            args, keep = cpu_kernels.pool_excite_args(
                inp, layer.extent, identity, None, None, None, relu, fused)
            return cls(lib.ge_pool_excite, 'ge_pool_excite', args, None,
                       inp, identity, relu, False, state, keep)
        if any(plan.train):
            return None
        mlp = native_mlp(layer.excite)
        if layer.excite.mlp is not None and mlp is None:
            return None
        args, _, keep = cpu_kernels.conv_gather_args(
            inp, plan, None, None, None, None, None, (), norm=fused,
            excite=cpu_kernels.Excitation(identity, relu, mlp))
        return cls(lib.ge_conv_gather, 'ge_conv_gather', args,
                   args[-4]._obj, inp, identity, relu, mlp is not None, state,
                   keep)

    def __call__(self, layer: nn.Module, inp: torch.Tensor,
                 identity: Optional[torch.Tensor], norm: Optional[nn.Module],
                 relu: bool) -> Optional[torch.Tensor]:
        """Replay the call for ``ge_block_tail(layer, inp, identity,
        norm=norm, relu=relu)`` without autograd, if nothing it depends on
        changed.

        Returns:
            Tensor | None: The layer's output, or None: take the full path.
        """
        if not (inp.shape == self.shape and relu == self.relu
                and (identity is not None) == self.with_identity
                and inp.dtype is torch.float32 and inp.is_cpu
                and inp.stride() == self.stride):
            return None
        if identity is not None and not (
                identity.shape == self.shape
                and identity.dtype is torch.float32 and identity.is_cpu
                and identity.stride() == self.stride):
            return None
        if torch.get_num_threads() != self.threads or (
                self.autocast and torch.is_autocast_enabled('cpu')):
            return None
        if fingerprint(layer, norm) != self.state:
            return None
        return self.run(inp, identity)

    def run(self, inp: torch.Tensor,
            identity: Optional[torch.Tensor]) -> torch.Tensor:
        """The call on ``inp`` and ``identity``, unchecked.

        Args:
            inp (Tensor): The input, as :meth:`__call__` checks it.
            identity (Tensor | None): The shortcut.

        Returns:
            Tensor: A new tensor, the layer's output.
        """
        out = torch.empty_like(inp)
        args = self.args.copy()
        args[0] = inp.data_ptr()
        ident = None if identity is None else identity.data_ptr()
        if self.spec is None:  # ge_pool_excite
            args[3], args[6] = ident, out.data_ptr()
        else:
            spec = type(self.spec).from_buffer_copy(self.spec)
            spec.identity, spec.out = ident, out.data_ptr()
            args[-4] = ctypes.byref(spec)
        cpu_kernels._check(self.fn(*args), self.name)
        return out


def _tensors(keep) -> List[torch.Tensor]:
    """The tensors in ``keep``, nested tuples and named tuples included."""
    found, stack = [], [keep]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, tuple):
            stack += item
    return found


def _dropped() -> None:
    """What a copied or unpickled :class:`PreparedInference` becomes."""
    return None
