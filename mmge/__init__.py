"""mmge: Gather-Excite (Hu et al., NeurIPS 2018) for MMDetection and MMPretrain.

Importing this package (``import mmge``, or a config's
``custom_imports=dict(imports=['mmge'])``):

- registers its layers and backbones in MMEngine's root ``MODELS`` registry,
  which the registries of mmdet, mmpretrain and mmcv fall back to, so
  ``type='GatherExcite'`` and ``type='GEResNet'`` resolve under any of those
  default scopes;
- lets weights-only ``torch.load`` read MMEngine's own checkpoints in this
  process, so every OpenMMLab client (``DetInferencer``, ``get_model``,
  ``Runner``'s ``load_from``/``resume``, mmdet's and mmpretrain's
  ``tools/test.py``) loads mmge's checkpoints while a pickle payload is still
  refused (:func:`mmge.utils.allow_mmengine_checkpoints`);
- adds ``mmge`` to mmengine's ``pkg::`` config prefixes (the installed
  ``mmge-config-prefix.pth`` already does this at start-up, see
  ``_mmge_config_prefix``; here for a checkout that is not installed).
"""
from mmengine.config.utils import MODULE2PACKAGE

from . import models, ops  # noqa: F401
from .utils import allow_mmengine_checkpoints
from .version import __version__

allow_mmengine_checkpoints()
MODULE2PACKAGE.setdefault('mmge', 'mmge')

__all__ = ['__version__']
