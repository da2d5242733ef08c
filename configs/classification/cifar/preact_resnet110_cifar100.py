# ResNet-110 on CIFAR-100 (Table 5 baseline).
_base_ = [
    '../_base_/models/preact_resnet110_cifar.py',
    '../_base_/datasets/cifar100_bs128.py',
    '../_base_/schedules/cifar_bs128_200e.py', '../_base_/default_runtime.py'
]

model = dict(head=dict(num_classes=100))
