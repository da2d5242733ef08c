# mmdet's 1x schedule: 12 epochs, SGD lr 0.02 for 16 images a step, /10 at
# epochs 8 and 11, linear warm-up. auto_scale_lr rescales lr for another
# total batch with tools/train.py --auto-scale-lr.
_base_ = 'mmdet::_base_/schedules/schedule_1x.py'
