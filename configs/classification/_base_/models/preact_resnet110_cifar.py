# ResNet-110, pre-activation basic units (He et al., ECCV 2016)
# for 32x32 inputs; the paper's Table 5 network. ge_cfg (None here) is the
# one line a GE/SE row sets.
model = dict(
    type='ImageClassifier',
    backbone=dict(type='PreActResNet', depth=110, input_size=32),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=10,
        in_channels=64,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))
