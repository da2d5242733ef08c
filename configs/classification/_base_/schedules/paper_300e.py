# The paper's ImageNet recipe (Sec. 3): SGD, momentum 0.9, batch 256, lr 0.1,
# divided by 10 each time top-1 stops improving, three times, for about 300
# epochs, from random initialisation. The paper gives no plateau patience;
# 10 epochs is ours.
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4))
param_scheduler = dict(
    type='ReduceOnPlateauLR',
    monitor='accuracy/top1',
    rule='greater',
    factor=0.1,
    patience=10,
    min_value=1e-4,  # 0.1 / 10**3: three divisions
    by_epoch=True)
train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=1)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=256)
