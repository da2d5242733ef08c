# The demo classifier with GC blocks (mmcv ContextBlock, r = 16) instead of
# GE, in every residual block of c3-c5, as GCNet places them (after the last
# conv of the residual branch; 'after_conv2' in a basic block).
_base_ = ['./ge_resnet18_shapes_cls.py']

model = dict(
    backbone=dict(
        ge_cfg=dict(_delete_=True, type='ContextBlock', ratio=1. / 16),
        ge_stages=(False, True, True, True)))
