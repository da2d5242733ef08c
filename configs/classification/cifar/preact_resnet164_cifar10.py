# ResNet-164 on CIFAR-10 (Table 5 baseline).
_base_ = [
    '../_base_/models/preact_resnet164_cifar.py',
    '../_base_/datasets/cifar10_bs128.py',
    '../_base_/schedules/cifar_bs128_200e.py', '../_base_/default_runtime.py'
]
