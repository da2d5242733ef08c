# WRN-16-8 with GE-theta-plus (global extent) in every unit, CIFAR-10 (Table
# 5).
_base_ = './wrn16_8_cifar10.py'

model = dict(
    backbone=dict(
        ge_cfg=dict(
            type='GatherExcite', variant='theta_plus', extent='global')))
