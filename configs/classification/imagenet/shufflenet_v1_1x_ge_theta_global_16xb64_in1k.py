# GE-theta, global extent, on the branch of every unit of ShuffleNet 1x
# (Table 4).
_base_ = './shufflenet_v1_1x_16xb64_in1k.py'

model = dict(
    backbone=dict(
        ge_cfg=dict(
            _delete_=True,
            type='GatherExcite', variant='theta', extent='global')))
