"""Time and memory of GE in ResNet-50 against the plain network.

    python tools/benchmark/ge_benchmark.py [--batch 4] [--size 224]
        [--repeats 5] [--variants theta theta_minus theta_plus] [--extent 8]
        [--rows control SE formula timm mmge memory-saving] [--channels-last]
        [--device cpu|cuda] [--amp bf16] [--compile default]

For each model, the median over --repeats rounds of one training step
(forward, loss, backward, SGD step), then over --repeats rounds of one
inference forward (eval, no grad); and the bytes of tensors saved for
backward (counted once per storage with
torch.autograd.graph.saved_tensors_hooks, so that figure does not depend
on the machine's noise). Rows: plain ResNet-50, SE, the GE
formula as written (resize, sigmoid, multiply), and mmge's GatherExcite, per
variant (and timm's GatherExcite when timm is importable); mmge's layer
also in its memory-saving mode; and a control, a second plain network timed
like the others, whose ratio shows how far the machine's noise moves a
ratio in this run. --rows picks which of them run (plain always does).
With --channels-last every model and the input are channels-last in
memory (``torch.channels_last``), and the ratios are to the plain network
in that layout.
--device cuda runs everything on the GPU (cuDNN's autotuner on; every
time is taken between two ``torch.cuda.synchronize()``), and the table
then also gives each model's peak GPU memory in a training step; --amp
bf16 runs each forward and loss under
``torch.autocast(dtype=torch.bfloat16)``, as MMEngine's
``AmpOptimWrapper(dtype='bfloat16')`` does. --compile MODE
wraps every model in ``torch.compile(mode=MODE)`` (its compilations happen
in the warm-up, with dynamo's recompile limit raised to fit every model: a
model past it fails instead of running eager); the saved bytes are then
counted on the eager modules (the compiled graphs choose what they save
themselves: the peak memory column shows that).

Every time is also given as a ratio to the plain network. The plain
network runs between every two other runs (plain, A, plain, B, plain, ...,
the others in an order rotated every round), so that each run sits between
two plain runs; a run's ratio is its time over the mean of those two, and
the table gives the median over the rounds. On a shared machine the speed
drifts over seconds (one forward's time correlates strongly with the
next's, and weakly with one a dozen runs away): the neighbours cancel that
drift, a plain time taken once per round would not.
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
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


#: the rows --rows can pick (plain always runs)
ROWS = ('control', 'SE', 'formula', 'timm', 'mmge', 'memory-saving')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='GE time and memory against plain ResNet-50')
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--extent', type=int, default=8)
    parser.add_argument('--variants', nargs='+',
                        default=['theta', 'theta_minus', 'theta_plus'])
    parser.add_argument(
        '--rows', nargs='+', choices=ROWS, default=list(ROWS),
        help='which rows to run besides plain (default: all)')
    parser.add_argument(
        '--channels-last', action='store_true',
        help='models and input channels-last in memory')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                        help='where the models run (default: cpu)')
    parser.add_argument(
        '--amp', choices=('none', 'bf16'), default='none',
        help='bf16: forward and loss under torch.autocast(bfloat16)')
    parser.add_argument(
        '--compile', default='none',
        choices=('none', 'default', 'reduce-overhead', 'max-autotune',
                 'max-autotune-no-cudagraphs'),
        help='torch.compile every model in this mode (default: none)')
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


def model_configs(rows: List[str], variants: List[str],
                  extent: int) -> Dict[str, Optional[dict]]:
    """The GE layer config of each model, by row name, in table order.

    Args:
        rows (list[str]): Which of :data:`ROWS` to include (plain always
            is; timm's only when timm is importable).
        variants (list[str]): GE variants.
        extent (int): GE's extent.

    Returns:
        dict[str, dict | None]: ``ge_cfg`` for :func:`build` (None: plain).
    """
    configs: Dict[str, Optional[dict]] = {'plain': None}
    if 'control' in rows:
        configs['plain, control'] = None
    if 'SE' in rows:
        configs['SE'] = dict(type='SqueezeExcite')
    for v in variants:
        cfg = dict(variant=v, extent=extent)
        if 'formula' in rows:
            configs[f'{v} formula'] = dict(type=FormulaGE, **cfg)
        timm_cfg = timm_ge(v, extent) if 'timm' in rows else None
        if timm_cfg is not None:
            configs[f'{v} timm'] = timm_cfg
        if 'mmge' in rows:
            configs[f'{v} mmge'] = dict(type='GatherExcite', **cfg)
        if 'memory-saving' in rows:
            configs[f'{v} mmge, memory-saving'] = dict(
                type='GatherExcite', memory_efficient=True, **cfg)
    return configs


def build(ge_cfg):
    import logging

    from mmengine.logging import MMLogger

    from mmge.models import GEResNet
    model = GEResNet(50, ge_cfg=ge_cfg, out_indices=(3, ), norm_eval=False)
    # mmengine logs every parameter's initialiser at INFO level
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    model.init_weights()
    return model


def schedule(names: List[str], rounds: int) -> List[str]:
    """The order of the timed runs: plain first, then per round every
    other model once, each followed by plain again, in an order rotated
    every round (so that no model always follows the same one).

    Args:
        names (list[str]): The models other than ``'plain'``.
        rounds (int): Rounds.

    Returns:
        list[str]: Model names, ``'plain'`` at every even position.
    """
    order = ['plain']
    for r in range(rounds):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            order += [name, 'plain']
    return order


def bracketed_ratios(runs: List[Tuple[str, float]]) -> Dict[str, List[float]]:
    """Each run's time over the mean of the plain runs just before and just
    after it.

    Args:
        runs (list[tuple[str, float]]): (model, seconds) in the order they
            ran, as :func:`schedule` orders them.

    Returns:
        dict[str, list[float]]: The ratios of each model other than plain,
        in the order of its runs.

    Raises:
        ValueError: If a run of another model is not between two plain
            runs.
    """
    ratios: Dict[str, List[float]] = {}
    for i, (name, seconds) in enumerate(runs):
        if name == 'plain':
            continue
        if not (0 < i < len(runs) - 1 and runs[i - 1][0] == 'plain'
                and runs[i + 1][0] == 'plain'):
            raise ValueError(
                f'bracketed_ratios needs a plain run on each side of every '
                f'other run; run {i} ({name!r}) has '
                f'{runs[i - 1][0] if i else None!r} before it and '
                f'{runs[i + 1][0] if i + 1 < len(runs) else None!r} after')
        plain = (runs[i - 1][1] + runs[i + 1][1]) / 2
        ratios.setdefault(name, []).append(seconds / plain)
    return ratios


def sync(x: torch.Tensor) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def autocast(x: torch.Tensor, amp: str):
    """The forward's precision context: bf16 autocast, or none."""
    return torch.autocast(x.device.type, dtype=torch.bfloat16,
                          enabled=amp == 'bf16')


def train_step(model, x, opt, amp='none'):
    model.train()
    sync(x)
    start = time.perf_counter()
    with autocast(x, amp):
        loss = model(x)[-1].float().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(x)
    return time.perf_counter() - start


def infer(model, x, amp='none'):
    model.eval()
    sync(x)
    start = time.perf_counter()
    with torch.no_grad(), autocast(x, amp):
        model(x)
    sync(x)
    return time.perf_counter() - start


def peak_train_memory(model, x, opt, amp='none') -> int:
    """Peak bytes the CUDA allocator holds in one training step."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(x.device)
    train_step(model, x, opt, amp)
    return torch.cuda.max_memory_allocated(x.device)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = steady_allocator() if args.allocator == 'steady' else \
        'allocator as it is'
    import mmge  # noqa: F401
    rows = model_configs(args.rows, args.variants, args.extent)
    if args.device == 'cuda':
        if not torch.cuda.is_available():
            raise SystemExit('--device cuda: torch sees no CUDA device '
                             f'(torch {torch.__version__})')
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    models = {name: build(cfg).to(args.device) for name, cfg in rows.items()}
    layout = 'NCHW'
    if args.channels_last:
        layout = 'channels-last'
        x = x.contiguous(memory_format=torch.channels_last)
        for m in models.values():
            m.to(memory_format=torch.channels_last)
    opts = {n: torch.optim.SGD(m.parameters(), lr=1e-4)
            for n, m in models.items()}
    eager = models
    if args.compile != 'none':
        # every model (the networks share their forward's code) compiles
        # once per mode: past dynamo's recompile limit the rest would run
        # eager, unnoticed; fail instead of timing that
        torch._dynamo.config.recompile_limit = max(
            torch._dynamo.config.recompile_limit, 4 * len(models))
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        models = {n: torch.compile(m, mode=args.compile)
                  for n, m in models.items()}
    amp = args.amp
    for name, m in models.items():  # warm-up (and cuDNN's autotuning)
        for _ in range(3 if x.is_cuda else 1):
            train_step(m, x, opts[name], amp)
            infer(m, x, amp)
    # training rounds, then inference rounds (an inference right after a
    # training step pays for the memory that step freed, unevenly)
    order = schedule([n for n in models if n != 'plain'], args.repeats)
    times = {n: dict(train=[], infer=[]) for n in models}
    ratios = {}
    for step in ('train', 'infer'):
        runs = []
        for name in order:
            m = models[name]
            seconds = train_step(m, x, opts[name], amp) \
                if step == 'train' else infer(m, x, amp)
            times[name][step].append(seconds)
            runs.append((name, seconds))
        ratios[step] = bracketed_ratios(runs)
    from mmge.utils import saved_tensor_bytes

    def forward(m):
        with autocast(x, amp):
            return m.train()(x)[-1]

    memory = {n: saved_tensor_bytes(lambda m=m: forward(m))
              for n, m in eager.items()}
    peak = {n: peak_train_memory(m, x, opts[n], amp)
            for n, m in models.items()} if x.is_cuda else None
    where = f'{torch.get_num_threads()} threads'
    if x.is_cuda:
        where = f'{torch.cuda.get_device_name(x.device)}, cuDNN autotuned'
    precision = ', bf16 autocast' if amp == 'bf16' else ''
    if args.compile != 'none':
        precision += f', torch.compile(mode={args.compile!r})'
    print(f'ResNet-50, batch {args.batch}, {args.size}x{args.size}, '
          f'{layout}{precision}, extent {args.extent}, torch '
          f'{torch.__version__}, {where}, median of {args.repeats} '
          f'rounds, each run between two plain runs, {allocator}\n')
    head = ('| model | train step (s) | / plain | inference (s) | / plain | '
            'saved for backward (MB) | / plain |')
    if peak:
        head += ' peak in training (MB) | / plain |'
    print(head)
    print('|' + ' --- |' * (head.count('|') - 1))
    for name in models:
        tr = statistics.median(times[name]['train'])
        inf = statistics.median(times[name]['infer'])
        tr_ratio, inf_ratio = (
            statistics.median(ratios[step][name]) if name != 'plain' else 1.0
            for step in ('train', 'infer'))
        mb = memory[name] / 2**20
        line = (f'| {name} | {tr:.4f} | {tr_ratio:.3f}x | {inf:.4f} | '
                f'{inf_ratio:.3f}x | {mb:.0f} | '
                f'{memory[name] / memory["plain"]:.3f}x |')
        if peak:
            line += (f' {peak[name] / 2**20:.0f} | '
                     f'{peak[name] / peak["plain"]:.3f}x |')
        print(line)


if __name__ == '__main__':
    main()
