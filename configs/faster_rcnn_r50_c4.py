# Baseline of the paper's detection experiment (Sec. 3.3): Faster R-CNN with
# RoIAlign on ResNet-50, C4. Paper: 27.3 mAP (COCO 2014 split).
_base_ = [
    '_base_/models/faster_rcnn_r50_c4.py', '_base_/datasets/coco_detection.py',
    '_base_/schedules/schedule_1x.py', '_base_/default_runtime.py'
]
