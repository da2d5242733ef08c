from .complexity import classifier_complexity
from .paper_numbers import PAPER, baseline_of, targets

__all__ = ['PAPER', 'baseline_of', 'classifier_complexity', 'targets']
