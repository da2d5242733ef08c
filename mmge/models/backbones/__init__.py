from .ge_resnet import GEBasicBlock, GEResNet
from .ge_shufflenet_v1 import GEShuffleNetV1, GEShuffleUnit
from .preact_resnet import PreActBlock, PreActResNet, WideResNet

__all__ = [
    'GEBasicBlock', 'GEResNet', 'GEShuffleNetV1', 'GEShuffleUnit',
    'PreActBlock', 'PreActResNet', 'WideResNet'
]
