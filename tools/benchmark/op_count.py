"""ATen operations in a training step of GE in ResNet-50, counted.

    python tools/benchmark/op_count.py [--batch 2] [--size 224]
        [--amp bf16|none] [--extent 8]
        [--variants theta theta_minus theta_plus]
        [--rows SE formula mmge memory-saving]

On one H200 a ResNet-50 training step at batch 32 in bf16 is bound by the
host, not the GPU (docs/benchmarks.md): every operation costs
its dispatch and its launch, whatever its size. This counts the operations
one training step (forward, loss, backward) dispatches, for the rows of
``ge_benchmark.py``, on the CPU, on the path a GPU takes: under bf16
autocast (``--amp bf16``, the default) none of mmge's native CPU kernels
runs (they need float32), the gather's first convolution runs in one
call (``GatherConv2d.cpu_chunk`` lifted: only the CPU splits it) and its
depthwise backward in bfloat16 (``GatherConv2d.cpu_wide_backward`` off:
only the CPU widens it to float32). Two counts
per row: every operation dispatched, and those that run a kernel (not
views, ``detach``, ``empty`` and the like). A count, not a timing: the same
on any machine, for the same versions.
"""
import argparse
import os
import sys
from typing import Dict, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: operations that run no kernel besides views (``OpOverload.is_view``)
NO_KERNEL = frozenset({
    'empty', 'empty_like', 'empty_strided', 'new_empty',
    'new_empty_strided', 'promote_types', 'result_type', 'lift_fresh',
    'is_same_size', 'sym_size', 'sym_stride', 'sym_numel'
})


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched under it: ``total`` of all,
    ``kernels`` of those that run a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        if not (func.is_view
                or func.overloadpacket.__name__ in NO_KERNEL):
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='ATen operations per training step, GE against plain')
    for name, default in (('batch', 2), ('size', 224), ('extent', 8)):
        parser.add_argument(f'--{name}', type=int, default=default)
    parser.add_argument('--amp', choices=('bf16', 'none'), default='bf16',
                        help='bf16 (default): the GPU\'s path; none: '
                        'float32, on the native CPU kernels')
    variants = ['theta', 'theta_minus', 'theta_plus']
    parser.add_argument('--variants', nargs='+', default=variants,
                        choices=variants)
    rows = ['SE', 'formula', 'mmge', 'memory-saving']
    parser.add_argument('--rows', nargs='+', choices=rows, default=rows)
    args = parser.parse_args(argv)
    if args.batch < 2:
        parser.error('--batch must be at least 2: batch norms in training '
                     'need more than one value per channel')
    if min(args.size, args.extent) < 1:
        parser.error(f'--size and --extent must be positive, got '
                     f'{args.size} and {args.extent}')
    return args


def count_step(model, x: torch.Tensor, amp: str) -> Tuple[int, int]:
    """Operations of one training step (forward, loss, backward).

    Returns:
        tuple[int, int]: All operations, and those that run a kernel.
    """
    counter = OpCounter()
    with counter:
        with torch.autocast('cpu', dtype=torch.bfloat16,
                            enabled=amp == 'bf16'):
            loss = model(x)[-1].float().mean()
        loss.backward()
    return counter.total, counter.kernels


def main(argv=None) -> Dict[str, Tuple[int, int]]:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ge_benchmark import build, model_configs

    from mmge.models.layers.depthwise_conv import GatherConv2d
    rows = model_configs(args.rows, args.variants, args.extent)
    chunk = GatherConv2d.cpu_chunk
    GatherConv2d.cpu_chunk = float('inf')  # as on a GPU: one call
    # as on a GPU: the depthwise backward in the autocast dtype
    wide = GatherConv2d.cpu_wide_backward
    GatherConv2d.cpu_wide_backward = False
    try:
        torch.manual_seed(0)
        x = torch.randn(args.batch, 3, args.size, args.size)
        counts = {}
        for name, cfg in rows.items():
            model = build(cfg).train()
            count_step(model, x, args.amp)  # lazy set-up out of the count
            model.zero_grad(set_to_none=True)
            counts[name] = count_step(model, x, args.amp)
    finally:
        GatherConv2d.cpu_chunk = chunk
        GatherConv2d.cpu_wide_backward = wide
    precision = 'bf16 autocast' if args.amp == 'bf16' else 'float32'
    print(f'ResNet-50, batch {args.batch}, {args.size}x{args.size}, '
          f'{precision}, extent {args.extent}, torch {torch.__version__}: '
          f'ATen operations in one training step (forward, loss, '
          f'backward)\n')
    print('| model | operations | / plain | kernels | / plain |')
    print('| --- | --- | --- | --- | --- |')
    total, kernels = counts['plain']
    for name, (t, k) in counts.items():
        print(f'| {name} | {t} | {t / total:.3f}x | {k} | '
              f'{k / kernels:.3f}x |')
    return counts


if __name__ == '__main__':
    main()
