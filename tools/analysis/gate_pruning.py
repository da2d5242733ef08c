"""Top-1 after pruning a block's channels by their excite gates (GE paper,
Fig. 5).

    python tools/analysis/gate_pruning.py --ge CONFIG CHECKPOINT \\
        [--baseline CONFIG CHECKPOINT] [--blocks layer2.0 layer3.0 ...] \\
        [--ratios 0 0.1 ... 1] [--split val] [--max-images N] --out-dir DIR

For each chosen block of a GE classifier and each test image, the channels
of the residual branch are ranked by their gate (averaged over the gate's
positions for a local extent) and a ratio of them is set to zero before the
shortcut is added: least important first (ascending, dashed) and most
important first (descending, solid). Ratio 0 is the unpruned model; ratio 1
drops the residual branch. The baseline's same blocks at ratios 0 and 1 are
the reference stars. Writes ``gate_pruning.png`` (one panel per block) and
``gate_pruning.json`` (every top-1).
"""
import argparse
from typing import Callable, List, Optional

import torch

from mmge.analysis.ge_probe import GatePruner, ResidualBranchOff, block_ge
from mmge.analysis.loading import (add_data_args, build_split_loader,
                                   find_module, iterate, load_model,
                                   new_figure, num_images, progress_bar,
                                   stage_modules, write_outputs)

ORDERS = ('ascending', 'descending')


def ratio(text: str) -> float:
    """argparse type: a prune ratio in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f'prune ratios must be in [0, 1], got {text!r}')
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='top-1 against the ratio of channels pruned by their '
        'excite gates (GE paper, Fig. 5)')
    parser.add_argument('--ge', nargs=2, required=True,
                        metavar=('CONFIG', 'CHECKPOINT'),
                        help='the GE classifier')
    parser.add_argument('--baseline', nargs=2,
                        metavar=('CONFIG', 'CHECKPOINT'),
                        help='its baseline, for the ratio-0 and ratio-1 '
                        'reference points')
    parser.add_argument(
        '--blocks', nargs='+',
        help='residual blocks by their backbone name, e.g. layer4.0 '
        '(default: the first block of every stage but the first)')
    parser.add_argument(
        '--ratios', nargs='+', type=ratio,
        default=[k / 10 for k in range(11)],
        help='prune ratios (default 0, 0.1, ..., 1)')
    add_data_args(parser)
    return parser.parse_args(argv)


def top1(model, loader, max_images: Optional[int], bar) -> float:
    """Top-1 (percent) of a classifier over the split."""
    correct = total = 0
    with torch.no_grad():
        for inputs, samples in iterate(model, loader, max_images, bar):
            scores = model(inputs, mode='tensor')
            labels = torch.cat([s.gt_label.view(-1)[:1] for s in samples])
            correct += int((scores.argmax(1) == labels).sum())
            total += len(labels)
    return 100.0 * correct / total


def under(make_context: Callable, evaluate: Callable) -> float:
    """``evaluate()`` inside the hooks of ``make_context()``."""
    with make_context():
        return evaluate()


def plot(report: dict):
    """One panel per block: top-1 against the prune ratio."""
    blocks = report['blocks']
    fig, axes = new_figure(1, len(blocks), (3.6, 3.2))
    for ax, (name, r) in zip(axes[0], blocks.items()):
        for order, style in zip(ORDERS, ('--', '-')):
            ax.plot(report['ratios'], r[order], style, marker='.',
                    label=f'GE, {order[:3]}.')
        base = r.get('baseline')
        if base is not None:
            ax.plot([0, 1], [base['0'], base['1']], 'k*', markersize=11,
                    label='baseline')
        ax.set_title(name)
        ax.set_xlabel('prune ratio')
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel('top-1 (%)')
    axes[0][-1].legend(fontsize=8)
    return fig


def main(argv=None):
    args = parse_args(argv)
    model, cfg = load_model(*args.ge)
    if not hasattr(model, 'head'):
        raise ValueError(f'{args.ge[0]} is not a classifier (a model with a '
                         'head giving class scores): gate pruning measures '
                         'top-1')
    loader = build_split_loader(cfg, args.split, args.ge[0])
    names: List[str] = args.blocks or [
        f'{name}.0' for name, _ in stage_modules(model)[1:]]
    layers = {n: block_ge(find_module(model, n), n) for n in names}
    ratios = sorted(set(args.ratios) | {0.0})
    base = None
    if args.baseline:
        base, base_cfg = load_model(*args.baseline)
        base_loader = build_split_loader(base_cfg, args.split,
                                         args.baseline[0])
        base_blocks = {n: find_module(base, n) for n in names}
    passes = 1 + 2 * len(names) * (len(ratios) - 1) + (
        1 + len(names) if base is not None else 0)
    bar = progress_bar(passes * num_images(loader, args.max_images))

    def ge_top1():
        return top1(model, loader, args.max_images, bar)

    unpruned = ge_top1()
    report = dict(split=args.split, ge=args.ge, baseline=args.baseline,
                  ratios=ratios, unpruned_top1=unpruned, blocks={})
    for name, layer in layers.items():
        r = report['blocks'][name] = {}
        for order in ORDERS:
            r[order] = [unpruned if p == 0 else under(
                lambda: GatePruner(layer, p, order), ge_top1)
                for p in ratios]
    if base is not None:
        def base_top1():
            return top1(base, base_loader, args.max_images, bar)

        base_unpruned = base_top1()
        report['baseline_unpruned_top1'] = base_unpruned
        for name, block in base_blocks.items():
            report['blocks'][name]['baseline'] = {
                '0': base_unpruned,
                '1': under(lambda: ResidualBranchOff(block), base_top1)}
    png, js = write_outputs(plot(report), report, args.out_dir,
                            'gate_pruning')
    print(f'\nunpruned top-1 {unpruned:.2f}%')
    header = ' '.join(f'{p:>6.2f}' for p in ratios)
    print(f'{"block":<12} {"order":<11} {header}')
    for name, r in report['blocks'].items():
        for order in ORDERS:
            row = ' '.join(f'{a:6.2f}' for a in r[order])
            print(f'{name:<12} {order:<11} {row}')
        if 'baseline' in r:
            print(f'{name:<12} {"baseline":<11} ratio 0: '
                  f'{r["baseline"]["0"]:.2f}, ratio 1: '
                  f'{r["baseline"]["1"]:.2f}')
    print(f'wrote {png} and {js}')


if __name__ == '__main__':
    main()
