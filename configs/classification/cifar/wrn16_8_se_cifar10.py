# WRN-16-8 with SE (r16) in every unit, CIFAR-10 (Table 5).
_base_ = './wrn16_8_cifar10.py'

model = dict(
    backbone=dict(
        ge_cfg=dict(type='SqueezeExcite', reduction=16)))
