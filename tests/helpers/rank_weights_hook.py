"""A test hook: each rank saves its final parameters, to compare across ranks.

Parameters only: BN running statistics are each rank's own, as with
MMEngine's DDP default (``broadcast_buffers=False``) on any device.
"""
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class RankWeightsHook(Hook):

    def after_train(self, runner):
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        torch.save(dict(model.named_parameters()),
                   osp.join(runner.work_dir, f'weights_rank{get_rank()}.pth'))
