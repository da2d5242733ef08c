"""Train and val error per epoch of two or more runs (GE paper, Fig. 4).

    python tools/analysis/convergence_curves.py \\
        --run baseline WORK_DIR --run GE-theta WORK_DIR [--run ...] \\
        [--train-key accuracy_top-1] [--val-key accuracy/top1] --out-dir DIR

Reads MMEngine's scalar logs (``<timestamp>/vis_data/<timestamp>.json``) of
each work dir (or a log file given directly). Train error per epoch is
100 minus the training accuracy averaged over the epoch's logged windows
(mmpretrain logs it with ``model.head.cal_acc=True``), val error 100 minus
the val metric at the end of each validated epoch. Writes
``convergence_curves.png`` (error, train dashed and val solid, one colour
per run; and the training loss) and ``convergence_curves.json``.
"""
import argparse
import sys

from mmge.analysis.loading import (add_out_dir_arg, new_figure, progress_bar,
                                   write_outputs)
from mmge.analysis.training_logs import epoch_curves


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='train/val error per epoch of several runs from their '
        'MMEngine logs (GE paper, Fig. 4)')
    parser.add_argument('--run', nargs=2, action='append', required=True,
                        metavar=('NAME', 'WORK_DIR_OR_LOG'),
                        help='a run: its label and work dir or scalar log '
                        '(give two or more)')
    parser.add_argument('--train-key', default='accuracy_top-1',
                        help='training accuracy (%%) in the logs (default '
                        'accuracy_top-1, logged by heads with cal_acc=True)')
    parser.add_argument('--val-key', default='accuracy/top1',
                        help='val accuracy (%%) in the logs (default '
                        'accuracy/top1)')
    add_out_dir_arg(parser)
    args = parser.parse_args(argv)
    if len(args.run) < 2:
        parser.error('give at least two --run to compare')
    names = [name for name, _ in args.run]
    if len(set(names)) != len(names):
        parser.error(f'--run names must differ, got {names}')
    return args


def plot(runs: dict):
    """Error (train dashed, val solid) and training loss, per epoch."""
    import matplotlib.pyplot as plt
    fig, axes = new_figure(1, 2, (4.4, 3.4))
    err, loss = axes[0]
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for k, (name, c) in enumerate(runs.items()):
        colour = colours[k % len(colours)]
        for key, style, what in (('train_error', '--', 'train'),
                                 ('val_error', '-', 'val')):
            if c[key]:
                epochs = [int(e) for e in c[key]]
                err.plot(epochs, list(c[key].values()), style, color=colour,
                         marker='.', label=f'{name} ({what})')
        if c['train_loss']:
            loss.plot([int(e) for e in c['train_loss']],
                      list(c['train_loss'].values()), color=colour,
                      marker='.', label=name)
    err.set_xlabel('epoch')
    err.set_ylabel('top-1 error (%)')
    err.legend(fontsize=8)
    loss.set_xlabel('epoch')
    loss.set_ylabel('training loss')
    loss.legend(fontsize=8)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    return fig


def main(argv=None):
    args = parse_args(argv)
    runs, bar = {}, progress_bar(len(args.run))
    for name, path in args.run:
        runs[name] = epoch_curves(path, args.train_key, args.val_key)
        bar.update()
    sys.stderr.write('\n')
    for name, c in runs.items():
        if not c['val_error']:
            print(f'warning: {name}: no {args.val_key!r} in its logs (val '
                  'every epoch needs train_cfg.val_interval=1)')
        if not c['train_error']:
            print(f'warning: {name}: no {args.train_key!r} in its logs (set '
                  'model.head.cal_acc=True to log training accuracy)')
    report = dict(train_key=args.train_key, val_key=args.val_key,
                  runs={name: dict(path=path, **runs[name])
                        for name, path in args.run})
    png, js = write_outputs(plot(runs), report, args.out_dir,
                            'convergence_curves')
    print(f'{"run":<16} {"epochs":>6} {"last train err":>15} '
          f'{"last val err":>13} {"best val err":>13}')
    for name, c in runs.items():
        def fmt(curve, pick):
            return f'{pick(curve.values()):.2f}' if curve else '-'
        epochs = max([0] + [int(e) for e in c['train_loss']] +
                     [int(e) for e in c['val_error']])
        print(f'{name:<16} {epochs:>6} '
              f'{fmt(c["train_error"], lambda v: list(v)[-1]):>15} '
              f'{fmt(c["val_error"], lambda v: list(v)[-1]):>13} '
              f'{fmt(c["val_error"], min):>13}')
    print(f'wrote {png} and {js}')


if __name__ == '__main__':
    main()
