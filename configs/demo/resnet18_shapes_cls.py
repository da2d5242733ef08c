# The baseline of the classification demo: configs/demo/ge_resnet18_shapes_cls.py
# without GE (the same narrow ResNet-18, data and schedule). Train it with
#   python tools/demo.py --task classification \
#       --config configs/demo/resnet18_shapes_cls.py --work-dir work_dirs/demo_cls_base
# It is the reference of the GE paper's studies in docs/analysis.md.
_base_ = ['./ge_resnet18_shapes_cls.py']

model = dict(backbone=dict(ge_cfg=None))
