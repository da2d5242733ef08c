from .coco_eval import CocoEvalError, evaluate_coco, format_table

__all__ = ['CocoEvalError', 'evaluate_coco', 'format_table']
