"""Load MMEngine checkpoints with PyTorch's weights-only unpickler.

Checkpoints are untrusted input. torch >= 2.6 loads them with
``weights_only=True``: only tensors, containers, primitive types and
explicitly allowed globals are rebuilt, so a pickle payload never runs.
MMEngine 0.10.7's own checkpoints hold a few more objects (its message hub's
``HistoryBuffer`` with NumPy arrays, and ``getattr`` references to the
buffer's statistics methods), so loading them (``--resume``, ``load_from``,
``tools/test.py``) fails unless those are allowed (open-mmlab/mmengine#1655).

:func:`allow_mmengine_checkpoints` allows exactly those objects. ``getattr``
is never allowed as such: the name ``builtins.getattr`` is mapped to a
function that only returns ``HistoryBuffer``'s statistics methods and
refuses everything else.
"""
import re
from typing import Any

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

# the statistics methods a HistoryBuffer pickles by reference
_BUFFER_METHODS = frozenset(('min', 'max', 'current', 'mean'))


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` restricted to ``HistoryBuffer``'s statistics methods."""
    if obj is HistoryBuffer and name in _BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle_error(f'getattr({obj!r}, {name!r})')


def pickle_error(what: str) -> Exception:
    return torch.serialization.pickle.UnpicklingError(
        f'refused to unpickle {what}: not one of the objects an MMEngine '
        f'checkpoint holds')


def _numpy_globals() -> list:
    multiarray = np.core.multiarray
    return [
        (multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
        (multiarray.scalar, 'numpy.core.multiarray.scalar'),
        np.ndarray,
        np.dtype,
    ] + [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64,
                                       np.int32, np.bool_)]


def allow_mmengine_checkpoints() -> None:
    """Let weights-only ``torch.load`` read MMEngine's own checkpoints.

    Adds to PyTorch's weights-only allowlist MMEngine's ``HistoryBuffer``,
    the NumPy array and scalar constructors and dtypes, and a restricted
    stand-in for ``builtins.getattr``. Idempotent.
    """
    torch.serialization.add_safe_globals(
        [HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr')] +
        _numpy_globals())


def refusal_message(err: Exception) -> str:
    """One line for a weights-only refusal, naming the offending object.

    Args:
        err (Exception): The ``pickle.UnpicklingError`` raised by
            ``torch.load(..., weights_only=True)``.

    Returns:
        str: E.g. ``"it holds 'posix.system', which is not ..."``.
    """
    text = str(err)
    found = (re.search(r'GLOBAL ([\w.]+)', text)
             or re.search(r'refused to unpickle ([^:]+):', text))
    what = repr(found.group(1)) if found else 'an object'
    return (f'it holds {what}, which is not a tensor, a container or one of '
            f'the objects an MMEngine checkpoint holds; weights-only loading '
            f'refused it and nothing in it ran')
