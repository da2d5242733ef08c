from .excite import Excite
from .gather import ConvGather, PoolGather
from .gather_excite import GatherExcite
from .squeeze_excite import SqueezeExcite

__all__ = [
    'ConvGather', 'PoolGather', 'Excite', 'GatherExcite', 'SqueezeExcite'
]
