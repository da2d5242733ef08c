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
import json
import os
import os.path as osp
import sys
from typing import Dict, List

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='class selectivity index per channel and block '
        '(GE paper, Fig. 3)')
    parser.add_argument(
        '--model', nargs=3, action='append', required=True,
        metavar=('NAME', 'CONFIG', 'CHECKPOINT'),
        help='a classifier: its label, config and checkpoint (repeatable)')
    parser.add_argument('--split', default='val', choices=('val', 'test'),
                        help="the config's dataloader to read")
    parser.add_argument('--stage', type=int, default=-1,
                        help='backbone stage (0-based; -1: the last)')
    parser.add_argument('--max-images', type=int, default=None)
    parser.add_argument('--bins', type=int, default=40)
    parser.add_argument('--out-dir', required=True)
    return parser.parse_args(argv)


def load_classifier(config: str, checkpoint: str):
    """The classifier of ``config`` with weights-only-loaded ``checkpoint``,
    in eval mode, and its config."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import load_checkpoint

    import mmge  # noqa: F401
    from mmge.utils.checkpoint import allow_mmengine_checkpoints
    for path, what in ((config, 'config'), (checkpoint, 'checkpoint')):
        if not osp.isfile(path):
            raise FileNotFoundError(f'{what} {path!r} does not exist')
    cfg = Config.fromfile(config)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    model = MODELS.build(cfg.model)
    allow_mmengine_checkpoints()
    load_checkpoint(model, checkpoint, map_location='cpu', strict=True,
                    logger='silent')
    return model.eval(), cfg


def stage_blocks(model, stage: int) -> List[torch.nn.Module]:
    """The residual blocks of one backbone stage."""
    backbone = model.backbone
    names = getattr(backbone, 'res_layers', None)
    if names is not None:
        layers = [getattr(backbone, n) for n in names]
    elif hasattr(backbone, 'layers'):
        layers = list(backbone.layers)
    else:
        raise ValueError(f'{type(backbone).__name__} has no stages '
                         '(res_layers or layers) to analyse')
    if not -len(layers) <= stage < len(layers):
        raise ValueError(f'--stage must be in {-len(layers)}..'
                         f'{len(layers) - 1}, got {stage}')
    return list(layers[stage])


def class_means(model, dataloader, blocks, max_images=None):
    """Per block, (classes, channels) class-conditional mean activations."""
    from mmengine.utils import ProgressBar
    feats: Dict[int, torch.Tensor] = {}
    hooks = [
        b.register_forward_hook(
            lambda m, i, o, k=k: feats.__setitem__(k, o.mean((2, 3))))
        for k, b in enumerate(blocks)
    ]
    sums: Dict[int, Dict[int, torch.Tensor]] = {}  # class -> block -> sum
    counts: Dict[int, int] = {}
    total = len(dataloader.dataset)
    if max_images:
        total = min(total, max_images)
    bar, seen = ProgressBar(total, file=sys.stderr), 0
    try:
        with torch.no_grad():
            for batch in dataloader:
                data = model.data_preprocessor(batch, False)
                model.extract_feat(data['inputs'])
                labels = [int(s.gt_label) for s in data['data_samples']]
                for k, f in feats.items():
                    for row, label in zip(f.double(), labels):
                        per_class = sums.setdefault(label, {})
                        per_class[k] = per_class.get(k, 0) + row
                for label in labels:
                    counts[label] = counts.get(label, 0) + 1
                    bar.update()
                seen += len(labels)
                if max_images and seen >= max_images:
                    break
    finally:
        for h in hooks:
            h.remove()
    classes = sorted(counts)
    return {
        k: torch.stack([sums[c][k] / counts[c] for c in classes])
        for k in range(len(blocks))
    }, classes


def plot(results: dict, out_file: str, bins: int) -> None:
    """One panel per block, the models' histograms overlaid."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    num_blocks = max(len(r) for r in results.values())
    fig, axes = plt.subplots(1, num_blocks, figsize=(3.2 * num_blocks, 3),
                             squeeze=False)
    for k, ax in enumerate(axes[0]):
        for name, per_block in results.items():
            if k < len(per_block):
                ax.hist(per_block[k], bins=bins, range=(0, 1), alpha=0.5,
                        label=name)
        ax.set_title(f'block {k + 1}')
        ax.set_xlabel('class selectivity index')
    axes[0][0].set_ylabel('channels')
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    from mmengine.runner import Runner

    from mmge.analysis import class_selectivity
    os.makedirs(args.out_dir, exist_ok=True)
    results, report = {}, {'stage': args.stage, 'split': args.split,
                           'models': {}}
    for name, config, checkpoint in args.model:
        model, cfg = load_classifier(config, checkpoint)
        loader_cfg = cfg.get(f'{args.split}_dataloader')
        if loader_cfg is None:
            raise ValueError(f'{config} has no {args.split}_dataloader')
        loader = Runner.build_dataloader(loader_cfg)
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
    png = osp.join(args.out_dir, 'class_selectivity.png')
    plot(results, png, args.bins)
    with open(osp.join(args.out_dir, 'class_selectivity.json'), 'w') as f:
        json.dump(report, f, indent=1)
    for name, r in report['models'].items():
        means = ', '.join(f'{m:.3f}' for m in r['mean_index_per_block'])
        print(f'{name}: mean index per block {means}')
    print(f'wrote {png} and class_selectivity.json')


if __name__ == '__main__':
    main()
