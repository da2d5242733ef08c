_base_ = 'mmpretrain::_base_/default_runtime.py'

# mmge's layers and backbones, for runs that do not import mmge themselves
custom_imports = dict(imports=['mmge'], allow_failed_imports=False)
