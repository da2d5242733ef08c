from .complexity import classifier_complexity
from .paper_numbers import PAPER, baseline_of, targets
from .studies import (class_selectivity, gate_prune_mask, js_divergence,
                      mean_pairwise_cosine_distance, mean_pairwise_jsd)

__all__ = [
    'PAPER', 'baseline_of', 'class_selectivity', 'classifier_complexity',
    'gate_prune_mask', 'js_divergence', 'mean_pairwise_cosine_distance',
    'mean_pairwise_jsd', 'targets'
]
