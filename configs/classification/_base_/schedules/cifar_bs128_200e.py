# CIFAR: SGD, momentum 0.9, lr 0.1 for a batch of 128, weight decay 1e-4,
# 200 epochs, lr / 10 at 100 and 150 (mmpretrain's CIFAR schedule; the paper
# names no schedule of its own for CIFAR).
_base_ = 'mmpretrain::_base_/schedules/cifar10_bs128.py'
