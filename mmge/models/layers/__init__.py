from .excite import Excite
from .gather import ConvGather, PoolGather
from .gather_excite import GatherExcite
from .ge_block import ge_block_tail
from .simplified_non_local import SimplifiedNonLocal2d
from .squeeze_excite import SqueezeExcite

__all__ = [
    'ConvGather', 'PoolGather', 'Excite', 'GatherExcite', 'ge_block_tail',
    'SimplifiedNonLocal2d', 'SqueezeExcite'
]
