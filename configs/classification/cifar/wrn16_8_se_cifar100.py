# WRN-16-8 with SE (r16) in every unit, CIFAR-100 (Table 5).
_base_ = './wrn16_8_cifar100.py'

model = dict(
    backbone=dict(
        ge_cfg=dict(type='SqueezeExcite', reduction=16)))
