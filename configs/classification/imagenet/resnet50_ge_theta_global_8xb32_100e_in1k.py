# Fig. 4, the convergence study: GE-theta (global) ResNet-50, 100 epochs.
_base_ = './resnet50_8xb32_100e_in1k.py'

model = dict(
    backbone=dict(
        ge_cfg=dict(
            _delete_=True,
            type='GatherExcite', variant='theta', extent='global')))
