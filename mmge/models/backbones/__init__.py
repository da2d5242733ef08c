from .ge_resnet import GEBasicBlock, GEResNet

__all__ = ['GEBasicBlock', 'GEResNet']
