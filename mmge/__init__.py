"""mmge: Gather-Excite (Hu et al., NeurIPS 2018) for MMDetection and MMPretrain.

Importing this package registers its layers and backbones in MMEngine's root
``MODELS`` registry, which the registries of mmdet, mmpretrain and mmcv fall
back to, so ``type='GatherExcite'`` and ``type='GEResNet'`` resolve under any
of those default scopes.
"""
from mmengine.config.utils import MODULE2PACKAGE

from . import models  # noqa: F401
from .version import __version__

# Lets configs inherit mmge's as ``_base_ = 'mmge::configs/<file>.py'``, the
# OpenMMLab ``pkg::`` way (mmengine knows only its own packages); the files
# are shipped in mmge/.mim/configs/configs (docs/detection.md).
MODULE2PACKAGE.setdefault('mmge', 'mmge')

__all__ = ['__version__']
