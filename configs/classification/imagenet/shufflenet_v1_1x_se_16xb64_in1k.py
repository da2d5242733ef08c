# SE-ShuffleNet 1x (Table 4): SE (r16) on the branch of every unit.
_base_ = './shufflenet_v1_1x_16xb64_in1k.py'

model = dict(
    backbone=dict(
        ge_cfg=dict(_delete_=True, type='SqueezeExcite', reduction=16)))
