# ResNet-110 with SE (r16) in every unit, CIFAR-100 (Table 5).
_base_ = './preact_resnet110_cifar100.py'

model = dict(
    backbone=dict(
        ge_cfg=dict(type='SqueezeExcite', reduction=16)))
