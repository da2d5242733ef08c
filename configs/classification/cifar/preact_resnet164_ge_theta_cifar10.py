# ResNet-164 with GE-theta (global extent) in every unit, CIFAR-10 (Table 5).
_base_ = './preact_resnet164_cifar10.py'

model = dict(
    backbone=dict(
        ge_cfg=dict(
            type='GatherExcite', variant='theta', extent='global')))
