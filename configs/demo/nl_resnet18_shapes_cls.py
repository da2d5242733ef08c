# The demo classifier with one non-local block (mmcv NonLocal2d, embedded
# Gaussian) instead of GE, placed as GCNet places it: before the last residual
# block of a stage. GCNet uses c4; at the demo's 64x64 inputs c4 is 4x4, so the
# demo uses c3 (stage 1, 8x8) for attention maps worth looking at. For GCNet's
# comparison (docs/analysis.md, tools/analysis/attention_stats.py).
_base_ = ['./ge_resnet18_shapes_cls.py']

model = dict(
    backbone=dict(
        ge_cfg=None,
        before_last_block=dict(
            stage=1, cfg=dict(type='NonLocal2d', reduction=2))))
