"""Record the attention maps of non-local, simplified non-local and GC
blocks while a model runs (GCNet, Sec. 3.1, Table 1 and Fig. 2).

- mmcv's ``NonLocal2d``: one map per query position, ``(Q, P)``; ``P`` is
  the number of key positions (a quarter of them with ``sub_sample``);
- mmge's ``SimplifiedNonLocal2d`` and mmcv's ``ContextBlock`` (attention
  pooling): one map shared by all queries, ``(1, P)``; an average-pooling
  ``ContextBlock`` attends uniformly.

:class:`AttentionRecorder` records, per block, the block's input, its
output and the attention the block itself computed in that forward pass
(nothing is recomputed); :func:`attention_stats` turns them into GCNet's
Table 1 statistics.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import ContextBlock, NonLocal2d

from mmge.models.layers.simplified_non_local import SimplifiedNonLocal2d
from .studies import mean_pairwise_cosine_distance, mean_pairwise_jsd

ATTENTION_BLOCKS = (NonLocal2d, SimplifiedNonLocal2d, ContextBlock)


def attention_blocks(module: nn.Module) -> Dict[str, nn.Module]:
    """The NL, SNL and GC blocks in ``module``, by name."""
    return {n: m for n, m in module.named_modules()
            if isinstance(m, ATTENTION_BLOCKS)}


class AttentionRecorder:
    """Record input, output and attention of attention blocks.

    Inside the context, after a forward pass, ``records[name]`` is a dict
    with ``input`` and ``output`` (N, C, H, W) and ``attention``
    (N, Q, P): ``Q = H * W`` rows for a non-local block, one row for the
    query-independent blocks.

    Args:
        blocks (dict[str, nn.Module]): NL, SNL or GC blocks by name.
    """

    def __init__(self, blocks: Dict[str, nn.Module]) -> None:
        for name, block in blocks.items():
            if not isinstance(block, ATTENTION_BLOCKS):
                raise TypeError(f'{name} is a {type(block).__name__}; the '
                                'recorder reads NonLocal2d, '
                                'SimplifiedNonLocal2d and ContextBlock')
        self.blocks = blocks
        self.records: Dict[str, Dict[str, torch.Tensor]] = {}
        self._undo: List = []

    def __enter__(self) -> 'AttentionRecorder':
        for name, block in self.blocks.items():
            rec = self.records.setdefault(name, {})
            self._undo.append(block.register_forward_hook(
                lambda m, i, out, rec=rec: rec.update(
                    input=i[0].detach(), output=out.detach())).remove)
            self._undo.append(self._attention_hook(block, rec))
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []

    @staticmethod
    def _attention_hook(block: nn.Module, rec: dict):
        """Capture the block's attention; returns the undo function."""

        def keep(att: torch.Tensor) -> torch.Tensor:
            rec['attention'] = att.detach().flatten(2) if att.dim() > 3 \
                else att.detach().reshape(att.shape[0], -1, att.shape[-1])
            return att

        if isinstance(block, ContextBlock) and block.pooling_type == 'att':
            handle = block.softmax.register_forward_hook(
                lambda m, i, out: keep(out))
            return handle.remove
        if isinstance(block, ContextBlock):  # average pooling
            def uniform(m, i, out):
                n, p = out.shape[0], out.shape[2] * out.shape[3]
                keep(out.new_full((n, 1, p), 1.0 / p))
            return block.register_forward_hook(uniform).remove
        # NonLocal2d computes its pairwise weights with the method named by
        # its mode, SimplifiedNonLocal2d its map with ``attention``: shadow
        # the method on the instance, call through, keep the result
        method = block.mode if isinstance(block, NonLocal2d) else 'attention'
        original = getattr(block, method)
        setattr(block, method, lambda *a: keep(original(*a)))
        return lambda: delattr(block, method)


def key_grid(height: int, width: int, num_keys: int) -> Tuple[int, int]:
    """The key positions' grid: the feature map's, or a non-local block's
    2x2 max-pooled one (``sub_sample=True``)."""
    for grid in ((height, width), (height // 2, width // 2)):
        if grid[0] * grid[1] == num_keys:
            return grid
    raise ValueError(f'{num_keys} attention keys fit neither {height}x{width}'
                     ' nor its 2x2-subsampled grid')


def is_distribution(att: torch.Tensor) -> bool:
    """Whether every row is a distribution (softmax attention); the
    dot-product and concatenation non-local modes are not."""
    return bool((att >= 0).all()) and torch.allclose(
        att.sum(-1), torch.ones((), dtype=att.dtype), atol=1e-4)


def attention_stats(record: Dict[str, torch.Tensor],
                    queries: Optional[torch.Tensor] = None) -> List[dict]:
    """GCNet Table 1's statistics of one recorded pass, per image.

    Args:
        record (dict): ``input``, ``output`` (N, C, H, W) and ``attention``
            (N, Q, P) of one block, as :class:`AttentionRecorder` keeps.
        queries (Tensor, optional): Flat indices of the query positions to
            compare (default: all ``H * W``).

    Returns:
        list[dict]: Per image, the mean pairwise cosine distance between
        query positions of the ``input``, the ``output`` and the
        ``attention`` maps, and ``jsd``, the mean pairwise Jensen-Shannon
        divergence of the attention maps (None where the maps are not
        distributions).
    """
    x, y, att = record['input'], record['output'], record['attention']
    n, c, h, w = x.shape
    if queries is None:
        queries = torch.arange(h * w)
    stats = []
    for k in range(n):
        maps = att[k].expand(h * w, -1)[queries]
        stats.append(dict(
            input=mean_pairwise_cosine_distance(x[k].flatten(1).T[queries]),
            output=mean_pairwise_cosine_distance(
                y[k].flatten(1).T[queries]),
            attention=mean_pairwise_cosine_distance(maps),
            jsd=mean_pairwise_jsd(maps) if is_distribution(maps) else None))
    return stats
