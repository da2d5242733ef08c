"""mmge's registry scope, for configs that inherit mmge's with ``mmge::``.

mmge registers its own modules in MMEngine's root registries (see
``mmge/__init__.py``), which every OpenMMLab scope falls back to. This module
exists for one more case: when a config inherits ``mmge::configs/...``,
mmengine tags each dict that mmge's config defines with ``_scope_='mmge'`` and
builds it in the ``mmge`` scope. The registries below make that scope resolve
a name the way mmge's configs mean it: as mmdet's scope does (mmdet's names,
then MMEngine's root, where mmge's and mmcv's live), else as mmpretrain's.
"""
from typing import Optional, Sequence

import mmdet.registry as mmdet_registry
import mmpretrain.registry as mmpretrain_registry
from mmengine.registry import Registry


class ScopeBridge(Registry):
    """A registry of the ``mmge`` scope that also looks names up in others.

    Args:
        name (str): Registry name (``'model'``, ``'dataset'``, ...).
        parent (Registry): MMEngine's root registry of that name.
        others (Sequence[Registry]): Registries asked, in order, for a
            name; each falls back to MMEngine's root registry itself.
    """

    def __init__(self, name: str, parent: Registry,
                 others: Sequence[Registry]) -> None:
        super().__init__(
            name, parent=parent, scope='mmge', locations=['mmge.models'])
        self._others = list(others)

    def get(self, key: str) -> Optional[type]:
        # each of the others falls back to MMEngine's root itself, after
        # its own names (mmdet's LoadAnnotations before mmcv's, say)
        for other in self._others:
            obj = other.get(key)
            if obj is not None:
                return obj
        return super().get(key)


def _bridge(attr: str) -> ScopeBridge:
    det = getattr(mmdet_registry, attr)
    others = [det]
    pretrain = getattr(mmpretrain_registry, attr, None)
    if pretrain is not None:
        others.append(pretrain)
    return ScopeBridge(det.name, det.parent, others)


_NAMES = ('RUNNERS', 'RUNNER_CONSTRUCTORS', 'LOOPS', 'HOOKS', 'DATASETS',
          'DATA_SAMPLERS', 'TRANSFORMS', 'MODELS', 'MODEL_WRAPPERS',
          'WEIGHT_INITIALIZERS', 'OPTIMIZERS', 'OPTIM_WRAPPERS',
          'OPTIM_WRAPPER_CONSTRUCTORS', 'PARAM_SCHEDULERS', 'METRICS',
          'EVALUATOR', 'TASK_UTILS', 'VISUALIZERS', 'VISBACKENDS',
          'LOG_PROCESSORS')
globals().update({name: _bridge(name) for name in _NAMES})

__all__ = ['ScopeBridge'] + list(_NAMES)
