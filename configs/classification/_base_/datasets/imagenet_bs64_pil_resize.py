# ImageNet-1k as mmpretrain trains ShuffleNet (PIL resizing, 64 images a GPU;
# 16 GPUs make a batch of 1024). Data root: IMAGENET_ROOT (default
# data/imagenet/).
_base_ = 'mmpretrain::_base_/datasets/imagenet_bs64_pil_resize.py'

data_root = '{{$IMAGENET_ROOT:data/imagenet/}}'
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
