# The demo classifier with one simplified non-local block
# (SimplifiedNonLocal2d, GCNet Sec. 3.2) where nl_resnet18_shapes_cls.py has its
# non-local block (before the last residual block of c3).
_base_ = ['./ge_resnet18_shapes_cls.py']

model = dict(
    backbone=dict(
        ge_cfg=None,
        before_last_block=dict(
            stage=1, cfg=dict(type='SimplifiedNonLocal2d'))))
