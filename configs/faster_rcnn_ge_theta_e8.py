# The paper's detector (Sec. 3.3): faster_rcnn_r50_c4.py with GE-theta,
# extent 8, in every residual block, the conv5 RoI head's included.
# Paper: 28.6 mAP (baseline 27.3), COCO 2014 split.
# Memory-bound at 800x1333? Switch on GE's memory-saving mode: GE then keeps
# nothing of its own for backward (docs/detection.md, "Memory"):
#   --cfg-options model.backbone.ge_cfg.memory_efficient=True \
#       model.roi_head.shared_head.ge_cfg.memory_efficient=True
# (on float32 CPU tensors GE's native kernels keep nothing of their own in
# either mode; the switch matters on the GPU)
_base_ = './faster_rcnn_r50_c4.py'

ge_cfg = dict(type='GatherExcite', variant='theta', extent=8)
model = dict(
    backbone=dict(type='GEResNet', ge_cfg=ge_cfg),
    roi_head=dict(shared_head=dict(type='GEResLayer', ge_cfg=ge_cfg)))
