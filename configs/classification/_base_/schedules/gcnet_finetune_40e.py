# GCNet's ImageNet recipe (seeds/002): insert the blocks into a trained
# ResNet-50 and fine-tune 40 epochs from lr 0.02 with cosine decay, batch 256.
# The configs that use it start from ../models/resnet50_torchvision.py.
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-4))
param_scheduler = dict(type='CosineAnnealingLR', T_max=40, by_epoch=True)
train_cfg = dict(by_epoch=True, max_epochs=40, val_interval=1)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=256)
