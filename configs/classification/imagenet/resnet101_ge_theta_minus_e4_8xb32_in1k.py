# GE-theta-minus, extent E4, in every block of ResNet-101 (Fig. 2, the extent
# study).
_base_ = './resnet101_8xb32_in1k.py'

model = dict(
    backbone=dict(
        ge_cfg=dict(
            _delete_=True,
            type='GatherExcite', variant='theta_minus', extent=4)))
