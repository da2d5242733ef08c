"""Count the bytes autograd saves for backward, deterministically."""
from typing import Callable

import torch


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs.

    Every tensor saved for backward is counted once per storage (a tensor
    saved by several operations, or a view of one, counts once), through
    ``torch.autograd.graph.saved_tensors_hooks``, so the figure does not
    depend on the machine's noise. ``fn``'s result is dropped.

    Args:
        fn (callable): Runs the forward pass to measure, without arguments.

    Returns:
        int: The bytes.
    """
    seen = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())
