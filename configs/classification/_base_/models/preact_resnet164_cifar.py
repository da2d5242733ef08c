# ResNet-164, pre-activation bottleneck units (He et al., ECCV 2016)
# for 32x32 inputs; the paper's Table 5 network. ge_cfg (None here) is the
# one line a GE/SE row sets.
model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='PreActResNet', depth=164, bottleneck=True, input_size=32),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=10,
        in_channels=256,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))
