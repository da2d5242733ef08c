# ShuffleNet v1 1x (g = 3), the paper's Table 4 network, 224x224 input, as
# GEShuffleNetV1 so that each row changes ge_cfg only (None: the plain
# network; a row that sets a layer replaces it with _delete_=True).
model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='GEShuffleNetV1', groups=3, ge_cfg=None, input_size=224),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=960,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, 5)))
