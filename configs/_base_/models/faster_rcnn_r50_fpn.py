# Faster R-CNN with FPN (RoIAlign), PyTorch-style ResNet-50 from torchvision's
# ImageNet weights (mmdet's default); GE_PRETRAINED overrides them as in
# faster_rcnn_r50_c4.py.
_base_ = 'mmdet::_base_/models/faster-rcnn_r50_fpn.py'

pretrained = '{{$GE_PRETRAINED:torchvision://resnet50}}'
model = dict(
    backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
