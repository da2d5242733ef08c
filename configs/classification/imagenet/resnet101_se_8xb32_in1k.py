# SE-ResNet-101 (Table 3): SE (r16) in every block.
_base_ = './resnet101_8xb32_in1k.py'

model = dict(
    backbone=dict(
        ge_cfg=dict(_delete_=True, type='SqueezeExcite', reduction=16)))
