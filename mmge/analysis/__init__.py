from .attention import AttentionRecorder, attention_blocks, attention_stats
from .complexity import classifier_complexity
from .ge_probe import GatePruner, GateRecorder, ResidualBranchOff, ge_layers
from .paper_numbers import PAPER, baseline_of, targets
from .studies import (class_selectivity, gate_prune_mask, js_divergence,
                      mean_pairwise_cosine_distance, mean_pairwise_jsd)
from .training_logs import epoch_curves

__all__ = [
    'PAPER', 'AttentionRecorder', 'GatePruner', 'GateRecorder',
    'ResidualBranchOff', 'attention_blocks', 'attention_stats',
    'baseline_of', 'class_selectivity', 'classifier_complexity',
    'epoch_curves', 'gate_prune_mask', 'ge_layers', 'js_divergence',
    'mean_pairwise_cosine_distance', 'mean_pairwise_jsd', 'targets'
]
