# CIFAR-100 with the paper's augmentation (pad 4, random 32x32 crop,
# horizontal flip, mean/std normalisation), mmpretrain's pipeline; a batch of
# 128 on one GPU. Data root: CIFAR_ROOT (default data/cifar100/).
_base_ = 'mmpretrain::_base_/datasets/cifar100_bs16.py'

data_root = '{{$CIFAR_ROOT:data/cifar100/}}'
train_dataloader = dict(batch_size=128, dataset=dict(data_root=data_root))
val_dataloader = dict(batch_size=128, dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
