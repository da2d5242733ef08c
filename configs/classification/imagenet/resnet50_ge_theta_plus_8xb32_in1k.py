# GE-theta-plus (global extent), in every block of ResNet-50 (Table 2).
_base_ = './resnet50_8xb32_in1k.py'

model = dict(
    backbone=dict(
        ge_cfg=dict(
            _delete_=True,
            type='GatherExcite', variant='theta_plus', extent='global')))
