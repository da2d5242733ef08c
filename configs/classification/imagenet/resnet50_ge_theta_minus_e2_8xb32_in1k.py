# GE-theta-minus, extent E2, in every block of ResNet-50 (Fig. 2, the extent
# study).
_base_ = './resnet50_8xb32_in1k.py'

model = dict(
    backbone=dict(
        ge_cfg=dict(
            _delete_=True,
            type='GatherExcite', variant='theta_minus', extent=2)))
