# Fig. 4, the convergence study: ResNet-50, a fixed 100 epochs, lr / 10
# every 30 (mmpretrain's standard ResNet schedule).
_base_ = [
    '../_base_/models/resnet50_caffe.py',
    '../_base_/datasets/imagenet_bs32.py',
    '../_base_/schedules/imagenet_bs256_100e.py',
    '../_base_/default_runtime.py'
]
