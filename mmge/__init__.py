"""mmge: Gather-Excite (Hu et al., NeurIPS 2018) for MMDetection and MMPretrain.

Importing this package registers its layers and backbones in MMEngine's root
``MODELS`` registry, which the registries of mmdet, mmpretrain and mmcv fall
back to, so ``type='GatherExcite'`` and ``type='GEResNet'`` resolve under any
of those default scopes.
"""
from . import models  # noqa: F401
from .version import __version__

__all__ = ['__version__']
