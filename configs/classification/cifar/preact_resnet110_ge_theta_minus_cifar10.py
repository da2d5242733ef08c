# ResNet-110 with GE-theta-minus (global extent) in every unit, CIFAR-10 (Table
# 5).
_base_ = './preact_resnet110_cifar10.py'

model = dict(
    backbone=dict(
        ge_cfg=dict(
            type='GatherExcite', variant='theta_minus', extent='global')))
