# GCNet's comparison (Cao et al., Table 2) on the same FPN detector as GE:
# faster_rcnn_r50_fpn.py with one non-local block (mmcv NonLocal2d, embedded
# Gaussian) before the last residual block of c4.
_base_ = './faster_rcnn_r50_fpn.py'

model = dict(
    backbone=dict(
        type='GEResNet',
        ge_cfg=None,
        before_last_block=dict(
            stage=2,
            cfg=dict(type='NonLocal2d', reduction=2,
                     mode='embedded_gaussian'))))
