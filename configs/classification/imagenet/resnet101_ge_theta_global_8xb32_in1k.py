# GE-theta, extent global, in every block of ResNet-101 (Table 3).
_base_ = './resnet101_8xb32_in1k.py'

model = dict(
    backbone=dict(
        ge_cfg=dict(
            _delete_=True,
            type='GatherExcite', variant='theta', extent='global')))
