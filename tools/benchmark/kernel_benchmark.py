"""Time GE-theta's gather on the native kernel against its modules on ATen.

    python tools/benchmark/kernel_benchmark.py [--batch 4] [--extent 8]
        [--repeats 20] [--maps 256x56 512x28 1024x14 2048x7]

For each map (channels x size, ResNet-50's stages at 224x224 by default):
the median time of ``cpu_kernels.conv_gather`` (forward) and
``conv_gather_backward`` on a float32 map, and of the same ``ConvGather``
modules on ATen, forward and forward + backward (autograd). The norms
train (batch statistics). A benchmark, not a test: run it on an idle
machine.
"""
import argparse
import statistics
import time

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="GE-theta's gather: native kernel against ATen")
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--extent', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--maps', nargs='+',
                        default=['256x56', '512x28', '1024x14', '2048x7'],
                        help='CHANNELSxSIZE of each square map')
    args = parser.parse_args(argv)
    try:
        args.maps = [tuple(int(v) for v in m.split('x')) for m in args.maps]
    except ValueError:
        parser.error(f'--maps takes CHANNELSxSIZE values such as 256x56, '
                     f'got {args.maps}')
    if any(len(m) != 2 or min(m) < 1 for m in args.maps):
        parser.error(f'--maps takes CHANNELSxSIZE values such as 256x56, '
                     f'got {args.maps}')
    return args


def median_ms(fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None):
    args = parse_args(argv)
    from mmge.models.layers.ge_autograd import conv_gather_params
    from mmge.ops import cpu_kernels
    from mmge.models.layers.gather import ConvGather
    if not cpu_kernels.available():
        raise SystemExit('the native kernels are not built: run '
                         'tools/setup_env.sh (or pip install .) first')
    print(f'ConvGather E{args.extent}, batch {args.batch}, float32, torch '
          f'{torch.__version__}, {torch.get_num_threads()} threads, median '
          f'of {args.repeats} (ms)\n')
    print('| map | kernel forward | kernel backward | ATen forward '
          '| ATen forward + backward |')
    print('| --- | --- | --- | --- | --- |')
    for channels, size in args.maps:
        torch.manual_seed(0)
        gather = ConvGather(channels, args.extent).train()
        x = torch.randn(args.batch, channels, size, size)
        grad_x = torch.randn_like(x)
        params = conv_gather_params(gather, x)
        if params is None:
            raise SystemExit(f'the kernel does not take a {channels}x{size} '
                             f'map at batch {args.batch}')
        context = gather.convs(x)
        grad = torch.randn_like(context)
        leaf = x.clone().requires_grad_(True)

        def aten_both():
            torch.autograd.grad(gather.convs(leaf), leaf, grad)

        row = [
            median_ms(lambda: cpu_kernels.conv_gather(x, params),
                      args.repeats),
            median_ms(lambda: cpu_kernels.conv_gather_backward(
                x, params, grad_x), args.repeats),
            median_ms(lambda: gather.convs(x), args.repeats),
            median_ms(aten_both, args.repeats),
        ]
        print(f'| {channels} x {size}x{size} | ' +
              ' | '.join(f'{t:.2f}' for t in row) + ' |')


if __name__ == '__main__':
    main()
