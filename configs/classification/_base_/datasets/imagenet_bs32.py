# ImageNet-1k (mmpretrain's pipeline: 224 random-resized crops and flips for
# training; 256 short side and a 224 centre crop for the single-crop error
# the paper reports). 32 images a GPU: 8 GPUs make the paper's batch of 256.
# The data root is one variable: IMAGENET_ROOT (default data/imagenet/,
# holding train/ and val/ in mmpretrain's layout).
_base_ = 'mmpretrain::_base_/datasets/imagenet_bs32.py'

data_root = '{{$IMAGENET_ROOT:data/imagenet/}}'
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
