# faster_rcnn_r50_fpn.py with SE (r16) in every residual block.
_base_ = './faster_rcnn_r50_fpn.py'

model = dict(
    backbone=dict(
        type='GEResNet', ge_cfg=dict(type='SqueezeExcite', reduction=16)))
