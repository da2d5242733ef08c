"""How query-dependent are non-local, simplified non-local and GC blocks?
(GCNet, Table 1 and Fig. 2)

    python tools/analysis/attention_stats.py \\
        --model NL CONFIG CHECKPOINT --model SNL CONFIG CHECKPOINT \\
        [--model GC CONFIG CHECKPOINT] [--blocks NAME ...] [--queries 64] \\
        [--image-index 0] [--points 0.25,0.25 0.5,0.5 0.75,0.75] \\
        [--split val] [--max-images N] --out-dir DIR

For every NonLocal2d, SimplifiedNonLocal2d and ContextBlock of each model
(classifier or detector), averaged over the images of the split: the mean
cosine distance between query positions of the block's inputs, of its
outputs and of the attention maps, and the mean Jensen-Shannon divergence
between the attention maps (GCNet Table 1). Small attention distances mean
the block attends to the same places whatever the query. Writes
``attention_stats.png`` (GCNet Fig. 2: the attention maps of three query
points on one image, one row per model) and ``attention_stats.json``.
"""
import argparse
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from mmge.analysis.attention import (AttentionRecorder, attention_blocks,
                                     attention_stats, key_grid)
from mmge.analysis.loading import (add_data_args, add_models_arg,
                                   build_split_loader, display_images,
                                   iterate, load_model, new_figure,
                                   num_images, positive_int, progress_bar,
                                   write_outputs)

STATS = ('input', 'output', 'attention', 'jsd')


def point(text: str) -> Tuple[float, float]:
    """argparse type: ``x,y`` as fractions of the width and height."""
    try:
        x, y = (float(v) for v in text.split(','))
    except ValueError:
        x = y = -1.0
    if not (0 <= x <= 1 and 0 <= y <= 1):
        raise argparse.ArgumentTypeError(
            f'a query point is x,y with both in [0, 1], got {text!r}')
    return x, y


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='query dependence of NL / SNL / GC attention (GCNet '
        'Table 1) and attention maps of three query points (GCNet Fig. 2)')
    add_models_arg(parser, 'a model with NL, SNL or GC blocks')
    parser.add_argument(
        '--blocks', nargs='+',
        help='only these blocks, by their name in the model (e.g. '
        'backbone.layer3.5.before_block); the figure shows the first of '
        'each model (default: every block; the figure the first)')
    parser.add_argument('--queries', type=positive_int, default=64,
                        help='query positions compared per image, a fixed '
                        'random subset when the map has more (default 64)')
    parser.add_argument('--image-index', type=int, default=0,
                        help='the image of the split for the figure')
    parser.add_argument('--points', nargs=3, type=point,
                        default=[(0.25, 0.25), (0.5, 0.5), (0.75, 0.75)],
                        metavar='X,Y', help='the three query points of the '
                        'figure, as fractions of width and height')
    add_data_args(parser)
    args = parser.parse_args(argv)
    if args.image_index < 0:
        parser.error('--image-index must be >= 0')
    return args


def pick_blocks(model, config: str, only) -> Dict[str, torch.nn.Module]:
    blocks = attention_blocks(model)
    if not blocks:
        raise ValueError(f'the model of {config} has no NonLocal2d, '
                         'SimplifiedNonLocal2d or ContextBlock')
    if only:
        chosen = {n: b for n, b in blocks.items() if n in only}
        if not chosen:
            raise ValueError(f'none of --blocks {only} is in the model of '
                             f'{config}; its blocks are {list(blocks)}')
        blocks = chosen
    return blocks


def query_subset(size: int, wanted: int) -> torch.Tensor:
    """All positions, or a fixed random subset of ``wanted`` of them."""
    if size <= wanted:
        return torch.arange(size)
    return torch.randperm(size, generator=torch.Generator().manual_seed(0))[
        :wanted].sort().values


def analyse(model, loader, blocks, args, bar) -> Tuple[dict, dict]:
    """Mean statistics per block, and the figure's image and maps."""
    sums: Dict[str, Dict[str, List[float]]] = {
        n: {k: [] for k in STATS} for n in blocks}
    shown, seen = {}, 0
    with AttentionRecorder(blocks) as rec, torch.no_grad():
        for inputs, samples in iterate(model, loader, args.max_images, bar):
            model.extract_feat(inputs)
            for name in blocks:
                r = rec.records[name]
                h, w = r['input'].shape[-2:]
                for s in attention_stats(r, query_subset(h * w,
                                                         args.queries)):
                    for k in STATS:
                        if s[k] is not None:
                            sums[name][k].append(s[k])
            k = args.image_index - seen
            if 0 <= k < len(inputs):
                first = next(iter(blocks))
                r = rec.records[first]
                shown = dict(block=first, image=display_images(
                    model, inputs[k:k + 1])[0], attention=r['attention'][k],
                    size=tuple(r['input'].shape[-2:]))
            seen += len(inputs)
    means = {n: {k: (sum(v) / len(v) if v else None) for k, v in s.items()}
             for n, s in sums.items()}
    return means, shown


def plot(shown: Dict[str, dict], stats: dict, points):
    """Per model: the image with the query points, then their maps."""
    fig, axes = new_figure(len(shown), 1 + len(points), (2.6, 2.7))
    colours = ('red', 'lime', 'cyan')
    for row, (name, s) in zip(axes, shown.items()):
        img = s['image']
        ih, iw = img.shape[:2]
        h, w = s['size']
        att = s['attention']
        kh, kw = key_grid(h, w, att.shape[-1])
        row[0].imshow(img)
        row[0].set_title(f'{name}: {s["block"]}', fontsize=7)
        st = stats[name][s['block']]
        row[0].set_xlabel(f'attention cos dist {st["attention"]:.3f}',
                          fontsize=8)
        for col, ((x, y), c) in enumerate(zip(points, colours), 1):
            qy, qx = min(int(y * h), h - 1), min(int(x * w), w - 1)
            cx, cy = (qx + 0.5) * iw / w, (qy + 0.5) * ih / h
            amap = att[qy * w + qx if att.shape[0] > 1 else 0]
            amap = F.interpolate(amap.view(1, 1, kh, kw).float(),
                                 size=(ih, iw), mode='nearest')[0, 0]
            row[col].imshow(img)
            row[col].imshow(amap.numpy(), cmap='jet', alpha=0.55)
            for ax in (row[0], row[col]):
                ax.plot(cx, cy, 'o', color=c, markersize=7,
                        markeredgecolor='black')
            row[col].set_title(f'query {col} ({x:.2f}, {y:.2f})', fontsize=8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


def main(argv=None):
    args = parse_args(argv)
    models = []
    for name, config, checkpoint in args.model:
        model, cfg = load_model(config, checkpoint)
        loader = build_split_loader(cfg, args.split, config)
        models.append((name, config, model, loader,
                       pick_blocks(model, config, args.blocks)))
    total = sum(num_images(m[3], args.max_images) for m in models)
    if any(args.image_index >= num_images(m[3], args.max_images)
           for m in models):
        raise ValueError(f'--image-index {args.image_index} is beyond the '
                         'images read')
    bar = progress_bar(total)
    stats, shown = {}, {}
    for name, config, model, loader, blocks in models:
        stats[name], shown[name] = analyse(model, loader, blocks, args, bar)
    report = dict(split=args.split, queries=args.queries,
                  image_index=args.image_index, points=args.points,
                  models={name: dict(config=config, blocks=stats[name])
                          for name, config, *_ in models})
    png, js = write_outputs(plot(shown, stats, args.points), report,
                            args.out_dir, 'attention_stats')
    print('\n| model | block | cos dist input | cos dist output | '
          'cos dist attention | JSD attention |\n| --- | --- | ---: | ---: '
          '| ---: | ---: |')
    for name, blocks in stats.items():
        for block, s in blocks.items():
            cells = ' | '.join('-' if s[k] is None else f'{s[k]:.4f}'
                               for k in STATS)
            print(f'| {name} | {block} | {cells} |')
    print(f'wrote {png} and {js}')


if __name__ == '__main__':
    main()
