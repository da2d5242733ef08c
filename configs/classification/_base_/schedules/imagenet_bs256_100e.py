# mmpretrain's standard ResNet schedule, which is also the paper's convergence
# study (Fig. 4): 100 epochs, SGD lr 0.1 for batch 256, divided by 10 every
# 30 epochs.
_base_ = 'mmpretrain::_base_/schedules/imagenet_bs256.py'
