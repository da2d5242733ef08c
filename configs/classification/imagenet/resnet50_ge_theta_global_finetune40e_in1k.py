# GCNet's ImageNet recipe applied to GE-theta (global): the GE layers inserted
# into a trained ResNet-50 (torchvision's, so PyTorch style), fine-tuned 40
# epochs from lr 0.02 with cosine decay.
_base_ = [
    '../_base_/models/resnet50_torchvision.py',
    '../_base_/datasets/imagenet_bs32.py',
    '../_base_/schedules/gcnet_finetune_40e.py', '../_base_/default_runtime.py'
]

model = dict(
    backbone=dict(
        ge_cfg=dict(
            _delete_=True,
            type='GatherExcite', variant='theta', extent='global')))
