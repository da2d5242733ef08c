from .checkpoint import allow_mmengine_checkpoints, refusal_message

__all__ = ['allow_mmengine_checkpoints', 'refusal_message']
