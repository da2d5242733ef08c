# faster_rcnn_r50_fpn.py with GE-theta (E8) in every residual block.
# Memory-bound? --cfg-options model.backbone.ge_cfg.memory_efficient=True
# (GE then keeps nothing of its own for backward; docs/detection.md).
_base_ = './faster_rcnn_r50_fpn.py'

model = dict(
    backbone=dict(
        type='GEResNet',
        ge_cfg=dict(type='GatherExcite', variant='theta', extent=8)))
