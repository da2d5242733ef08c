"""Time and memory of GE in ResNet-50 against the plain network.

    python tools/benchmark/ge_benchmark.py [--batch 4] [--size 224]
        [--repeats 5] [--variants theta theta_minus theta_plus] [--extent 8]

For each model, the median over --repeats rounds of one training step
(forward, loss, backward, SGD step), then over --repeats rounds of one
inference forward (eval, no grad), the models alternating within each
round in an order rotated every round; and the bytes of tensors saved for
backward (counted once per storage with
torch.autograd.graph.saved_tensors_hooks, so that figure does not depend
on the machine's noise). Rows: plain ResNet-50, SE, the GE
formula as written (resize, sigmoid, multiply), and mmge's GatherExcite, per
variant (and timm's GatherExcite when timm is importable); mmge's layer
also in its memory-saving mode. Every figure is also given as a ratio to the
plain network: for times, the median over the rounds of each round's ratio
(the model's time over the plain network's in the same round), which
cancels the machine's slow drift between rounds.
By default (--allocator steady) glibc's malloc keeps the memory that freed
tensors return instead of handing it back to the kernel (mallopt), so that a
forward pass does not page-fault tens of thousands of fresh pages, by an
amount that depends on which model ran before; --allocator default leaves
malloc as it is. Either way every model runs under the same allocator.
A benchmark, not a test: run it on an idle machine.
"""
import argparse
import ctypes
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='GE time and memory against plain ResNet-50')
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--extent', type=int, default=8)
    parser.add_argument('--variants', nargs='+',
                        default=['theta', 'theta_minus', 'theta_plus'])
    parser.add_argument('--threads', type=int, default=0,
                        help='torch threads (default: torch\'s choice)')
    parser.add_argument(
        '--allocator', choices=('steady', 'default'), default='steady',
        help='steady: glibc malloc keeps freed memory (no page faults from '
        'handing it back and touching it again); default: as it is')
    return parser.parse_args(argv)


#: glibc's mallopt parameters (malloc.h) and the values --allocator steady
#: sets: the largest fixed mmap threshold (32 MiB on 64-bit), so that no
#: tensor of these models gets its own mapping, and a trim threshold of
#: 1 GiB, so that the heap's free top is kept
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
STEADY = ((M_MMAP_THRESHOLD, 32 * 2**20), (M_TRIM_THRESHOLD, 2**30))


def steady_allocator() -> str:
    """Make glibc's malloc keep freed memory (:data:`STEADY`).

    Returns:
        str: What the allocator is now, for the table's header.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return 'allocator as it is (no glibc mallopt in this process)'
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], \
        ctypes.c_int
    if not all(mallopt(param, value) == 1 for param, value in STEADY):
        return 'allocator as it is (mallopt refused the settings)'
    return ('glibc malloc steady (mallopt: mmap threshold 32 MiB, trim '
            'threshold 1 GiB)')


class FormulaGE(nn.Module):
    """GE as the formula reads: x * sigmoid(resize(f(gather(x)))), with
    plain autograd (mmge's layer's modules, none of its forward)."""

    def __init__(self, in_channels, **kwargs):
        super().__init__()
        from mmge.models import GatherExcite
        self.ge = GatherExcite(in_channels, **kwargs)

    def forward(self, x):
        gather = self.ge.gather
        context = gather.convs(x) if hasattr(gather, 'convs') else gather(x)
        if self.ge.excite.mlp is not None:
            context = self.ge.excite.mlp(context)
        gate = F.interpolate(context, size=x.shape[-2:], mode='nearest')
        return x * gate.sigmoid()


def timm_ge(variant, extent):
    """timm's GatherExcite as a layer config, or None without timm."""
    try:
        from timm.layers import GatherExcite as TimmGE
    except ImportError:
        return None

    class TimmLayer(nn.Module):

        def __init__(self, in_channels):
            super().__init__()
            # timm: extent 0 is global; use_mlp gives theta-plus;
            # extent > 0 without add_maxpool/mlp and with the conv gather
            # is GE-theta, without it GE-theta-minus
            self.ge = TimmGE(
                in_channels, extent=extent, extra_params=variant != 'theta_minus',
                use_mlp=variant == 'theta_plus')

        def forward(self, x):
            return self.ge(x)

    return dict(type=TimmLayer)


def build(ge_cfg):
    import logging

    from mmengine.logging import MMLogger

    from mmge.models import GEResNet
    model = GEResNet(50, ge_cfg=ge_cfg, out_indices=(3, ), norm_eval=False)
    # mmengine logs every parameter's initialiser at INFO level
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    model.init_weights()
    return model


def paired_ratio(times, base):
    """The median over rounds of ``times[r] / base[r]``.

    Args:
        times (list[float]): A model's time in each round.
        base (list[float]): The plain network's time in the same rounds.

    Returns:
        float: The median of the per-round ratios.
    """
    if len(times) != len(base) or not times:
        raise ValueError(f'paired_ratio needs one time per round for both, '
                         f'got {len(times)} and {len(base)}')
    return statistics.median(t / b for t, b in zip(times, base))


def train_step(model, x, opt):
    model.train()
    start = time.perf_counter()
    loss = model(x)[-1].float().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def infer(model, x):
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = steady_allocator() if args.allocator == 'steady' else \
        'allocator as it is'
    import mmge  # noqa: F401
    rows = {'plain': None, 'SE': dict(type='SqueezeExcite')}
    for v in args.variants:
        cfg = dict(variant=v, extent=args.extent)
        rows[f'{v} formula'] = dict(type=FormulaGE, **cfg)
        timm_cfg = timm_ge(v, args.extent)
        if timm_cfg is not None:
            rows[f'{v} timm'] = timm_cfg
        rows[f'{v} mmge'] = dict(type='GatherExcite', **cfg)
        rows[f'{v} mmge, memory-saving'] = dict(
            type='GatherExcite', memory_efficient=True, **cfg)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    models = {name: build(cfg) for name, cfg in rows.items()}
    opts = {n: torch.optim.SGD(m.parameters(), lr=1e-4)
            for n, m in models.items()}
    for name, m in models.items():  # warm-up
        train_step(m, x, opts[name])
        infer(m, x)
    times = {n: dict(train=[], infer=[]) for n in models}
    names = list(models)
    # training rounds, then inference rounds (an inference right after a
    # training step pays for the memory that step freed, unevenly), the
    # models alternating within a round in an order rotated every round
    # (so that no model always follows the same one)
    for step in ('train', 'infer'):
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                m = models[name]
                times[name][step].append(
                    train_step(m, x, opts[name]) if step == 'train' else
                    infer(m, x))
    from mmge.utils import saved_tensor_bytes
    memory = {n: saved_tensor_bytes(lambda m=m: m.train()(x)[-1])
              for n, m in models.items()}
    base = times['plain']
    print(f'ResNet-50, batch {args.batch}, {args.size}x{args.size}, '
          f'extent {args.extent}, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads, median of {args.repeats}, '
          f'{allocator}\n')
    print('| model | train step (s) | / plain | inference (s) | / plain | '
          'saved for backward (MB) | / plain |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for name in models:
        tr = statistics.median(times[name]['train'])
        inf = statistics.median(times[name]['infer'])
        tr_ratio = paired_ratio(times[name]['train'], base['train'])
        inf_ratio = paired_ratio(times[name]['infer'], base['infer'])
        mb = memory[name] / 2**20
        print(f'| {name} | {tr:.3f} | {tr_ratio:.2f}x | {inf:.3f} | '
              f'{inf_ratio:.2f}x | {mb:.0f} | '
              f'{memory[name] / memory["plain"]:.3f}x |')


if __name__ == '__main__':
    main()
