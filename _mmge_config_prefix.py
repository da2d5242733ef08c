"""Make ``_base_ = 'mmge::configs/...'`` work in every OpenMMLab tool.

mmengine resolves a ``pkg::path`` base config only for packages in its fixed
table ``mmengine.config.utils.MODULE2PACKAGE``, and it reads ``_base_`` before
it imports a config's ``custom_imports``. So a tool that has not imported
mmge itself (mmdet's and mmpretrain's own ``tools/train.py``) could not parse
a config that inherits mmge's.

mmge's install puts ``mmge-config-prefix.pth`` next to its package; Python
runs that file's one line (``import _mmge_config_prefix``) at start-up. This
module imports nothing heavy and changes nothing at once: it waits for
``mmengine.config.utils`` to be imported, and adds ``'mmge'`` to the table
right after that module has run. ``import mmge`` adds the same entry, for a
checkout that is not installed.
"""
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Optional, Sequence

TABLE_MODULE = 'mmengine.config.utils'


def add_prefix(module: ModuleType) -> None:
    """Add ``'mmge'`` to ``module.MODULE2PACKAGE`` (mmengine's table)."""
    module.MODULE2PACKAGE.setdefault('mmge', 'mmge')


class _AddPrefixLoader(importlib.abc.Loader):
    """Runs the real loader of mmengine's module, then :func:`add_prefix`."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec) -> Optional[ModuleType]:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        add_prefix(module)

    def __getattr__(self, name: str):
        # get_source, get_filename, ...: whatever the real loader offers
        return getattr(self.loader, name)


class _AddPrefixFinder(importlib.abc.MetaPathFinder):
    """Finds ``mmengine.config.utils`` as usual and wraps its loader."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]],
                  target: Optional[ModuleType] = None):
        if fullname != TABLE_MODULE:
            return None
        sys.meta_path.remove(self)  # once is enough
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _AddPrefixLoader(spec.loader)
        return spec


def install() -> None:
    """Add the prefix now if mmengine is loaded, else once it is."""
    if TABLE_MODULE in sys.modules:
        add_prefix(sys.modules[TABLE_MODULE])
    elif not any(isinstance(f, _AddPrefixFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AddPrefixFinder())


install()
