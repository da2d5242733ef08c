"""What a GE layer adds to a ResNet-50 block's inference, map by map.

    python tools/benchmark/block_benchmark.py [--batch 4] [--extent 8]
        [--repeats 100] [--threads 1] [--size 224]
        [--maps 256x56:3 512x28:4 1024x14:6 2048x7:3]
        [--variants theta theta_minus theta_plus]

Inference ratios of whole networks move by several percent between runs
on a shared machine; this measures the part GE changes, on hot caches.
For each map (ResNet-50's stages at 224x224 and their block counts by
default) it times the end of a plain bottleneck block, ``relu(norm3(x) +
identity)``, and the GE layer as ``GEBottleneck`` calls it instead
(``ge_block_tail(ge, x, identity, norm=norm3, relu=True)``), both in eval
mode without
grad, and prints the fastest of ``--repeats`` calls (CPU time of the
calling thread with one thread, wall time otherwise). The last rows add
the differences up over the blocks and divide them by the fastest of a
few plain ResNet-50 forwards at ``--size``: an estimate of
``inference / plain - 1`` (with maps and block counts of that network).
A benchmark, not a test: run it on an idle machine.
"""
import argparse
import logging
import time

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='GE layer against the plain block tail, per map')
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--extent', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=100)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--size', type=int, default=224,
                        help='input size of the plain ResNet-50 forward')
    parser.add_argument('--maps', nargs='+',
                        default=['256x56:3', '512x28:4', '1024x14:6',
                                 '2048x7:3'],
                        help='CHANNELSxSIZE:BLOCKS of each square map')
    parser.add_argument('--variants', nargs='+',
                        default=['theta', 'theta_minus', 'theta_plus'],
                        choices=['theta', 'theta_minus', 'theta_plus'])
    args = parser.parse_args(argv)
    maps = []
    for m in args.maps:
        try:
            shape, blocks = m.split(':')
            channels, size = (int(v) for v in shape.split('x'))
            maps.append((channels, size, int(blocks)))
        except ValueError:
            parser.error(f'--maps takes CHANNELSxSIZE:BLOCKS values such as '
                         f'256x56:3, got {m!r}')
        if min(maps[-1]) < 1:
            parser.error(f'--maps values must be positive, got {m!r}')
    args.maps = maps
    for name in ('batch', 'extent', 'repeats', 'threads', 'size'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1, '
                         f'got {getattr(args, name)}')
    return args


def fastest_us(fn, repeats, clock):
    for _ in range(3):
        fn()
    best = float('inf')
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best * 1e6


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    from mmengine.logging import MMLogger

    from mmge.models import GatherExcite, GEResNet
    from mmge.models.layers.ge_block import ge_block_tail
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    print(f'GE E{args.extent} in eval mode against relu(norm(x) + identity), '
          f'batch {args.batch}, float32, torch {torch.__version__}, '
          f'{args.threads} thread(s), fastest of {args.repeats} (us)\n')
    print('| map | blocks | plain tail | ' +
          ' | '.join(f'{v} (added)' for v in args.variants) + ' |')
    print('| --- | --- | --- | ' + ' | '.join('---' for _ in args.variants) +
          ' |')
    added = dict.fromkeys(args.variants, 0.0)
    with torch.no_grad():
        for channels, size, blocks in args.maps:
            torch.manual_seed(0)
            x = torch.randn(args.batch, channels, size, size)
            identity = torch.randn_like(x)
            norm = torch.nn.BatchNorm2d(channels).eval()
            plain = fastest_us(lambda: norm(x).add_(identity).relu_(),
                               args.repeats, clock)
            row = [f'{channels} x {size}x{size}', str(blocks),
                   f'{plain:.0f}']
            for variant in args.variants:
                layer = GatherExcite(channels, variant=variant,
                                     extent=args.extent).eval()
                t = fastest_us(
                    lambda: ge_block_tail(layer, x, identity, norm=norm,
                                          relu=True),
                    args.repeats, clock)
                added[variant] += (t - plain) * blocks
                row.append(f'{t:.0f} ({t - plain:+.0f})')
            print('| ' + ' | '.join(row) + ' |')
        net = GEResNet(50, ge_cfg=None, out_indices=(3, )).eval()
        image = torch.randn(args.batch, 3, args.size, args.size)
        forward = fastest_us(lambda: net(image), 5, clock)
    print(f'\nplain ResNet-50 forward at {args.size}x{args.size}: '
          f'{forward / 1e3:.1f} ms\n')
    print('| variant | added over the blocks (ms) | estimated inference / '
          'plain |')
    print('| --- | --- | --- |')
    for variant, us in added.items():
        print(f'| {variant} | {us / 1e3:.2f} | {1 + us / forward:.3f}x |')


if __name__ == '__main__':
    main()
