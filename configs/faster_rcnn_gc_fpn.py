# faster_rcnn_r50_fpn.py with GCNet's GC block (mmcv ContextBlock, r16) after
# conv3 of every block of c3-c5, as GCNet inserts it.
_base_ = './faster_rcnn_r50_fpn.py'

model = dict(
    backbone=dict(
        type='GEResNet',
        ge_cfg=dict(type='ContextBlock', ratio=1. / 16),
        ge_stages=(False, True, True, True)))
