# ResNet-50 started from torchvision's ImageNet weights (RESNET50_WEIGHTS to
# use others), PyTorch style to match them: the start of GCNet's recipe of
# inserting blocks into a trained network.
_base_ = './resnet50_caffe.py'

model = dict(
    backbone=dict(
        style='pytorch',
        init_cfg=dict(
            type='Pretrained',
            checkpoint='{{$RESNET50_WEIGHTS:torchvision://resnet50}}')))
