from .ge_resnet import GEBasicBlock, GEBottleneck, GEResNet
from .ge_shufflenet_v1 import GEShuffleNetV1, GEShuffleUnit
from .preact_resnet import PreActBlock, PreActResNet, WideResNet

__all__ = [
    'GEBasicBlock', 'GEBottleneck', 'GEResNet', 'GEShuffleNetV1',
    'GEShuffleUnit', 'PreActBlock', 'PreActResNet', 'WideResNet'
]
