# ResNet-164 with GE-theta-minus (global extent) in every unit, CIFAR-100
# (Table 5).
_base_ = './preact_resnet164_cifar100.py'

model = dict(
    backbone=dict(
        ge_cfg=dict(
            type='GatherExcite', variant='theta_minus', extent='global')))
