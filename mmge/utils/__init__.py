from .checkpoint import allow_mmengine_checkpoints, refusal_message
from .saved_tensors import saved_tensor_bytes

__all__ = [
    'allow_mmengine_checkpoints', 'refusal_message', 'saved_tensor_bytes'
]
