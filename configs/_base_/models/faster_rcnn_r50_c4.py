# Faster R-CNN with RoIAlign, ResNet-50 in the C4 setting of He et al. 2016:
# conv2-conv4 are the backbone (conv4 features feed the RPN and RoIAlign),
# conv5 runs per RoI as the head. Caffe-style ResNet, as the paper's.
# Backbone initialisation: plain ResNet-50 ImageNet weights (mmdet's
# detectron2 Caffe ResNet-50). To start from an ImageNet-trained GE-ResNet
# instead, set GE_PRETRAINED to its checkpoint (converted to the backbone
# layout, see docs/detection.md); its GE layers then load too. Without it the
# GE layers are freshly initialised, and the log's "missing keys" line lists
# them.
_base_ = 'mmdet::_base_/models/faster-rcnn_r50-caffe-c4.py'

pretrained = '{{$GE_PRETRAINED:open-mmlab://detectron2/resnet50_caffe}}'
model = dict(
    backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    roi_head=dict(
        shared_head=dict(
            init_cfg=dict(type='Pretrained', checkpoint=pretrained))))
