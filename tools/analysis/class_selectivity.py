"""Class selectivity of every channel at the output of each block of a stage
(GE paper, Fig. 3), for one or more classification models on one figure.

    python tools/analysis/class_selectivity.py \\
        --model baseline CONFIG CHECKPOINT --model GE CONFIG CHECKPOINT \\
        [--split val] [--stage -1] [--max-images N] --out-dir DIR

For each model, the block outputs (post-ReLU) of the stage are averaged
over space per image, then per class over the split's images; the index of
a channel is ``(mu_max - mu_rest) / (mu_max + mu_rest)``
(:func:`mmge.analysis.class_selectivity`). Writes ``class_selectivity.png``
(one panel per block, the models' histograms overlaid) and
``class_selectivity.json`` (every index, per model and block).
"""
import argparse
from typing import Dict

import torch

from mmge.analysis import class_selectivity
from mmge.analysis.loading import (add_data_args, add_models_arg,
                                   build_split_loader, iterate, load_model,
                                   new_figure, stage_blocks, write_outputs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='class selectivity index per channel and block '
        '(GE paper, Fig. 3)')
    add_models_arg(parser, 'a classifier')
    parser.add_argument('--stage', type=int, default=-1,
                        help='backbone stage (0-based; -1: the last)')
    parser.add_argument('--bins', type=int, default=40,
                        help='histogram bins (default 40)')
    add_data_args(parser)
    return parser.parse_args(argv)


def class_means(model, dataloader, blocks, max_images=None):
    """Per block, (classes, channels) class-conditional mean activations."""
    feats: Dict[int, torch.Tensor] = {}
    hooks = [
        b.register_forward_hook(
            lambda m, i, o, k=k: feats.__setitem__(k, o.mean((2, 3))))
        for k, b in enumerate(blocks)
    ]
    sums: Dict[int, Dict[int, torch.Tensor]] = {}  # class -> block -> sum
    counts: Dict[int, int] = {}
    try:
        with torch.no_grad():
            for inputs, samples in iterate(model, dataloader, max_images):
                model.extract_feat(inputs)
                labels = [int(s.gt_label) for s in samples]
                for k, f in feats.items():
                    for row, label in zip(f.double(), labels):
                        per_class = sums.setdefault(label, {})
                        per_class[k] = per_class.get(k, 0) + row
                for label in labels:
                    counts[label] = counts.get(label, 0) + 1
    finally:
        for h in hooks:
            h.remove()
    classes = sorted(counts)
    return {
        k: torch.stack([sums[c][k] / counts[c] for c in classes])
        for k in range(len(blocks))
    }, classes


def plot(results: dict, bins: int, stage: int):
    """One panel per block, the models' histograms overlaid."""
    num_blocks = max(len(r) for r in results.values())
    fig, axes = new_figure(1, num_blocks, (3.2, 3))
    fig.suptitle(f'stage {stage}', fontsize=9)
    for k, ax in enumerate(axes[0]):
        for name, per_block in results.items():
            if k < len(per_block):
                ax.hist(per_block[k], bins=bins, range=(0, 1), alpha=0.5,
                        label=name)
        ax.set_title(f'block {k + 1}')
        ax.set_xlabel('class selectivity index')
    axes[0][0].set_ylabel('channels')
    axes[0][-1].legend()
    return fig


def main(argv=None):
    args = parse_args(argv)
    results, report = {}, {'stage': args.stage, 'split': args.split,
                           'models': {}}
    for name, config, checkpoint in args.model:
        model, cfg = load_model(config, checkpoint)
        loader = build_split_loader(cfg, args.split, config)
        blocks = stage_blocks(model, args.stage)
        means, classes = class_means(model, loader, blocks, args.max_images)
        if len(classes) < 2:
            raise ValueError(f'{args.split} split of {config} has images of '
                             f'{len(classes)} class; need at least two')
        indices = [class_selectivity(means[k]).tolist()
                   for k in range(len(blocks))]
        results[name] = indices
        report['models'][name] = dict(
            config=config, checkpoint=checkpoint, classes=classes,
            mean_index_per_block=[sum(i) / len(i) for i in indices],
            index=indices)
    png, js = write_outputs(plot(results, args.bins, args.stage), report,
                            args.out_dir, 'class_selectivity')
    for name, r in report['models'].items():
        means = ', '.join(f'{m:.3f}' for m in r['mean_index_per_block'])
        print(f'{name}: mean index per block {means}')
    print(f'wrote {png} and {js}')


if __name__ == '__main__':
    main()
