from .excite import Excite
from .gather import ConvGather, PoolGather
from .gather_excite import GatherExcite
from .simplified_non_local import SimplifiedNonLocal2d
from .squeeze_excite import SqueezeExcite

__all__ = [
    'ConvGather', 'PoolGather', 'Excite', 'GatherExcite',
    'SimplifiedNonLocal2d', 'SqueezeExcite'
]
