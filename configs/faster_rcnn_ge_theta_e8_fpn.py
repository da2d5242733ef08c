# faster_rcnn_r50_fpn.py with GE-theta (E8) in every residual block.
_base_ = './faster_rcnn_r50_fpn.py'

model = dict(
    backbone=dict(
        type='GEResNet',
        ge_cfg=dict(type='GatherExcite', variant='theta', extent=8)))
