"""The excite gates of chosen GE blocks over the input images.

    python tools/analysis/gate_maps.py CONFIG CHECKPOINT \\
        [--blocks layer2.0 layer3.0 ...] [--num-images 4] [--split val] \\
        --out-dir DIR

Works for GE classifiers and detectors. Each chosen block's gate
``sigmoid(excite(gather(x)))`` is recorded at the gather's resolution and
drawn over the image (nearest resize, as GE applies it): the mean over the
channels, and the one channel whose gate changes most across the image
(what the context switches on in one place and off in another). A global
extent has one gate per channel and image: it is drawn as a strip of
gates instead, in the same channel order for every image. Writes
``gate_maps.png`` (one row per image) and ``gate_maps.json``
(per image and block: the gate's size, mean, min, max, the fraction of
gates below 0.5 and every channel's mean gate).
"""
import argparse
from typing import Dict, List

import torch
import torch.nn.functional as F

from mmge.analysis.ge_probe import GateRecorder, block_ge
from mmge.analysis.loading import (add_data_args, build_split_loader,
                                   display_images, find_module, iterate,
                                   load_model, new_figure, positive_int,
                                   stage_modules, write_outputs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='excite gates of GE blocks drawn over input images')
    parser.add_argument('config', help='a GE classifier or detector config')
    parser.add_argument('checkpoint')
    parser.add_argument(
        '--blocks', nargs='+',
        help='residual blocks by their backbone name, e.g. layer3.0 '
        '(default: the first block of every stage but the first)')
    parser.add_argument('--num-images', type=positive_int, default=4,
                        help='images of the split to draw (default 4)')
    parser.add_argument('--stride', type=positive_int, default=1,
                        help='draw every N-th image of the split (default '
                        '1; a classification split is sorted by class)')
    add_data_args(parser, max_images=False)  # --num-images chooses
    return parser.parse_args(argv)


def summarise(gate: torch.Tensor) -> dict:
    """The numbers of one image's gate (C, h, w)."""
    spread = gate.flatten(1).std(1) if gate[0].numel() > 1 else \
        torch.zeros(len(gate))
    return dict(size=list(gate.shape[1:]), mean=float(gate.mean()),
                min=float(gate.min()), max=float(gate.max()),
                below_half=float((gate < 0.5).double().mean()),
                most_varying_channel=int(spread.argmax()),
                most_varying_std=float(spread.max()),
                channel_mean=gate.mean((1, 2)).tolist())


def overlay(ax, img, gate_map: torch.Tensor, title: str) -> None:
    """One gate map (h, w) over the image, nearest-resized."""
    up = F.interpolate(gate_map[None, None].float(), size=img.shape[:2],
                       mode='nearest')[0, 0]
    ax.imshow(img)
    shown = ax.imshow(up.numpy(), cmap='viridis', alpha=0.6, vmin=0, vmax=1)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def plot(images, gates: Dict[str, torch.Tensor], report: List[dict]):
    """Per image: the image, then per block the mean and most-varying
    channel maps (or the sorted gates of a global extent)."""
    names = list(gates)
    orders = {n: torch.stack(g).flatten(1).mean(0).argsort()
              for n, g in gates.items()}
    fig, axes = new_figure(len(images), 1 + 2 * len(names), (2.3, 2.4))
    shown = None
    for i, row in enumerate(axes):
        row[0].imshow(images[i])
        row[0].set_title(f'image {report[i]["image"]}', fontsize=8)
        row[0].set_xticks([])
        row[0].set_yticks([])
        for b, name in enumerate(names):
            gate, info = gates[name][i], report[i]['blocks'][name]
            mean_ax, chan_ax = row[1 + 2 * b], row[2 + 2 * b]
            if gate[0].numel() > 1:
                shown = overlay(mean_ax, images[i], gate.mean(0),
                                f'{name}: mean gate')
                c = info['most_varying_channel']
                overlay(chan_ax, images[i], gate[c],
                        f'{name}: channel {c}')
            else:
                # one gate per channel: a strip in one channel order for
                # all images (by the mean gate over them), so that the
                # channels an image switches on or off stand out
                order = orders[name]
                mean_ax.imshow(gate.flatten()[order][None].numpy(),
                               aspect='auto', cmap='viridis', vmin=0, vmax=1)
                mean_ax.set_yticks([])
                mean_ax.set_title(f'{name}: channel gates', fontsize=7)
                chan_ax.hist(gate.flatten().numpy(), bins=20, range=(0, 1))
                chan_ax.set_title(f'{name}: gate histogram', fontsize=7)
            mean_ax.set_xlabel(
                f'below 0.5: {100 * info["below_half"]:.0f}%', fontsize=7)
    if shown is not None:
        fig.suptitle('gate maps: 0 dark blue ... 0.5 green ... 1 yellow '
                     '(viridis)', fontsize=9)
    return fig


def main(argv=None):
    args = parse_args(argv)
    model, cfg = load_model(args.config, args.checkpoint)
    loader = build_split_loader(cfg, args.split, args.config)
    names = args.blocks or [f'{n}.0' for n, _ in stage_modules(model)[1:]]
    layers = {n: block_ge(find_module(model, n), n) for n in names}
    images, gates = [], {n: [] for n in names}
    wanted = set(range(0, args.num_images * args.stride, args.stride))
    indices, seen = [], 0
    with GateRecorder(layers) as rec, torch.no_grad():
        for inputs, _ in iterate(model, loader, max(wanted) + 1):
            keep = [k for k in range(len(inputs)) if seen + k in wanted]
            indices += [seen + k for k in keep]
            seen += len(inputs)
            if not keep:
                continue
            model.extract_feat(inputs[keep])
            images.extend(display_images(model, inputs[keep]))
            for n in names:
                gates[n].extend(rec.gates[n])
    if not images:
        raise ValueError(f'the {args.split} split of {args.config} is empty')
    report = [dict(image=index, blocks={n: summarise(gates[n][i])
                                        for n in names})
              for i, index in enumerate(indices)]
    fig = plot(images, gates, report)
    png, js = write_outputs(fig, dict(config=args.config, split=args.split,
                                      images=report), args.out_dir,
                            'gate_maps')
    print(f'\n{"block":<12} {"gate size":>10} {"mean":>6} {"min":>6} '
          f'{"max":>6} {"<0.5":>6}')
    for n in names:
        rows = [r['blocks'][n] for r in report]
        size = 'x'.join(map(str, rows[0]['size']))
        print(f'{n:<12} {size:>10} '
              f'{sum(r["mean"] for r in rows) / len(rows):6.3f} '
              f'{min(r["min"] for r in rows):6.3f} '
              f'{max(r["max"] for r in rows):6.3f} '
              f'{sum(r["below_half"] for r in rows) / len(rows):6.3f}')
    print(f'wrote {png} and {js}')


if __name__ == '__main__':
    main()
