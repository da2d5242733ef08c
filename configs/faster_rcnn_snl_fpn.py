# GCNet's simplified non-local block (query-independent attention pooling,
# one 1x1 conv, add) where faster_rcnn_nl_fpn.py has its non-local block:
# before the last residual block of c4.
_base_ = './faster_rcnn_nl_fpn.py'

model = dict(
    backbone=dict(
        before_last_block=dict(
            _delete_=True, stage=2, cfg=dict(type='SimplifiedNonLocal2d'))))
