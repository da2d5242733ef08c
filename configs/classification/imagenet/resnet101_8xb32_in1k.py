# ResNet-101 (Table 3 baseline): Caffe style, 224x224,
# the paper's recipe (SGD, batch 256, lr 0.1 / 10 at plateaus, ~300 epochs).
_base_ = [
    '../_base_/models/resnet50_caffe.py',
    '../_base_/datasets/imagenet_bs32.py',
    '../_base_/schedules/paper_300e.py', '../_base_/default_runtime.py'
]

model = dict(backbone=dict(depth=101))
