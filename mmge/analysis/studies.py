"""The statistics of the GE and GCNet papers' studies of what blocks learn.

Pure functions on tensors, shared by the commands under ``tools/analysis/``:

- :func:`class_selectivity`: Morcos et al.'s class selectivity index of
  every channel (GE paper, Fig. 3);
- :func:`gate_prune_mask`: which channels to zero when pruning a block by
  its excite gates (GE paper, Fig. 5);
- :func:`mean_pairwise_cosine_distance` and :func:`mean_pairwise_jsd`:
  how much the features or attention maps of different query positions
  differ (GCNet, Table 1).
"""
import torch

EPS = 1e-12


def class_selectivity(class_means: torch.Tensor) -> torch.Tensor:
    """Class selectivity index of every channel.

    ``(mu_max - mu_rest) / (mu_max + mu_rest)``, with ``mu_max`` the largest
    class-conditional mean activation of the channel and ``mu_rest`` the
    mean of the other classes' means. 1 for a channel that responds to one
    class only, 0 for one that responds to all classes equally (and for a
    channel that never responds).

    Args:
        class_means (Tensor): (K, C) mean activation of each of C channels
            over the images of each of K >= 2 classes; non-negative (post
            ReLU) activations.

    Returns:
        Tensor: (C, ) indices in [0, 1].

    Raises:
        ValueError: If fewer than two classes are given, or a mean is
            negative.
    """
    if class_means.dim() != 2 or class_means.shape[0] < 2:
        raise ValueError('class_means must be (classes >= 2, channels), got '
                         f'shape {tuple(class_means.shape)}')
    if (class_means < 0).any():
        raise ValueError('class selectivity needs non-negative activations '
                         '(take them after a ReLU)')
    means = class_means.double()
    mu_max = means.amax(dim=0)
    mu_rest = (means.sum(dim=0) - mu_max) / (means.shape[0] - 1)
    denom = mu_max + mu_rest
    index = torch.where(denom > 0, (mu_max - mu_rest) / denom.clamp_min(EPS),
                        torch.zeros_like(denom))
    return index.to(class_means.dtype)


def gate_prune_mask(gates: torch.Tensor, ratio: float,
                    order: str = 'ascending') -> torch.Tensor:
    """Per image, the channels kept when a ratio of them is pruned by gate.

    Args:
        gates (Tensor): (N, C) gate value of each channel for each image
            (spatially averaged excite gates).
        ratio (float): Fraction of channels to zero, in [0, 1];
            ``round(ratio * C)`` of them.
        order (str): ``'ascending'`` zeroes the channels with the smallest
            gates first, ``'descending'`` those with the largest.

    Returns:
        Tensor: (N, C) float mask, 0 for pruned channels, 1 for the rest.

    Raises:
        ValueError: For a ratio outside [0, 1] or an unknown order.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f'ratio must be in [0, 1], got {ratio}')
    if order not in ('ascending', 'descending'):
        raise ValueError("order must be 'ascending' or 'descending', got "
                         f'{order!r}')
    k = int(round(ratio * gates.shape[1]))
    mask = torch.ones_like(gates, dtype=torch.float32)
    if k:
        idx = gates.argsort(dim=1, descending=order == 'descending')[:, :k]
        mask.scatter_(1, idx, 0.0)
    return mask


def mean_pairwise_cosine_distance(vectors: torch.Tensor) -> float:
    """Mean of ``1 - cos(v_i, v_j)`` over all pairs i < j.

    Args:
        vectors (Tensor): (Q, D), one vector per query position.

    Returns:
        float: 0 when all vectors point the same way.
    """
    if vectors.shape[0] < 2:
        raise ValueError('need at least two query positions')
    v = vectors.double()
    v = v / v.norm(dim=1, keepdim=True).clamp_min(EPS)
    cos = v @ v.T
    i, j = torch.triu_indices(len(v), len(v), offset=1)
    # clamped: rounding can put 1 - cos of parallel vectors just below 0
    return float((1 - cos[i, j]).clamp_min(0).mean())


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log) along the last dimension.

    Args:
        p (Tensor): (..., P) distributions.
        q (Tensor): (..., P) distributions.

    Returns:
        Tensor: (...), in [0, ln 2]; 0 for identical distributions.
    """
    p, q = p.double(), q.double()
    m = (p + q) / 2

    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(EPS).log() -
                                       b.clamp_min(EPS).log()),
                           torch.zeros_like(a)).sum(-1)

    return (kl(p, m) + kl(q, m)) / 2


def mean_pairwise_jsd(maps: torch.Tensor) -> float:
    """Mean Jensen-Shannon divergence over all pairs of attention maps.

    Args:
        maps (Tensor): (Q, P), one attention distribution per query.

    Returns:
        float: 0 when the attention is the same for every query.
    """
    if maps.shape[0] < 2:
        raise ValueError('need at least two query positions')
    i, j = torch.triu_indices(len(maps), len(maps), offset=1)
    return float(js_divergence(maps[i], maps[j]).mean())
