"""GE's operations on PyTorch's dispatcher (``torch.ops.mmge``): their
definitions and reference implementations (:mod:`.ge_ops`), the CPU
kernels (:mod:`.cpu`), the CUDA kernels (:mod:`.cuda`, Triton), and the
functions GE's modules call (:mod:`.functional`)."""
from . import cpu, ge_ops  # noqa: F401
from .functional import excite, pool_gather

try:
    from . import cuda  # noqa: F401
except ImportError:  # a torch build without Triton: CUDA runs the reference
    cuda = None

__all__ = ['excite', 'pool_gather']
