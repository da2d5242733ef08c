# COCO detection data (mmdet's pipeline and CocoMetric). Two environment
# variables select the data, so no config needs editing:
#   COCO_ROOT  the folder holding annotations/ and the image folders
#              (default: data/coco/)
#   COCO_YEAR  2017 (default, mmdet's split) or 2014 (the paper's split:
#              train2014 ~80k images / val2014 ~40k images)
#   COCO_ROOT=/datasets/coco/ COCO_YEAR=2014 tools/dist_train.sh CONFIG 8
_base_ = 'mmdet::_base_/datasets/coco_detection.py'

data_root = '{{$COCO_ROOT:data/coco/}}'
coco_year = '{{$COCO_YEAR:2017}}'

train_dataloader = dict(
    dataset=dict(
        data_root=data_root,
        ann_file=f'annotations/instances_train{coco_year}.json',
        data_prefix=dict(img=f'train{coco_year}/')))
val_dataloader = dict(
    dataset=dict(
        data_root=data_root,
        ann_file=f'annotations/instances_val{coco_year}.json',
        data_prefix=dict(img=f'val{coco_year}/')))
test_dataloader = val_dataloader

val_evaluator = dict(
    ann_file=f'{data_root}annotations/instances_val{coco_year}.json')
test_evaluator = val_evaluator
