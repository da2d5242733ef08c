# ShuffleNet 1x (g = 3), the baseline of Table 4. The paper gives no ShuffleNet
# recipe of its own; this is mmpretrain's (batch 1024, linear lr decay, no
# weight decay on BN), as for its ShuffleNet v1.
_base_ = [
    '../_base_/models/shufflenet_v1_1x.py',
    '../_base_/datasets/imagenet_bs64_pil_resize.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_linearlr_bn_nowd.py',
    '../_base_/default_runtime.py'
]
