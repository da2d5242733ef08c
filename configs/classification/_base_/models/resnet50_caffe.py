# ResNet-50 for ImageNet as the paper's: Caffe style (stride 2 in the first 1x1
# conv of a downsampling block; the 3.86 GFLOPs baseline), 224x224 input, a
# 1000-way fc. Built as GEResNet so that each table row changes ge_cfg (and
# ge_stages) only; ge_cfg=None is the plain ResNet-50, so a row that sets a
# layer replaces it with `ge_cfg=dict(_delete_=True, type=...)`.
model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='GEResNet',
        depth=50,
        ge_cfg=None,
        input_size=224,
        out_indices=(3, ),
        style='caffe',
        norm_eval=False),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=2048,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, 5)))
