# Table 1: GE-theta (global) in the paper's stage 4 only (mmdet's layer3).
_base_ = './resnet50_ge_theta_global_8xb32_in1k.py'

model = dict(backbone=dict(ge_stages=(False, False, True, False)))
