"""Test (evaluate) a checkpoint with MMEngine's Runner (mmdet's flags).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR]
        [--json-prefix PREFIX] [--out RESULTS.pkl] [--cfg-options k=v ...]
        [--launcher LAUNCHER]

For detection configs the evaluator is mmdet's CocoMetric (pycocotools
underneath): it prints the 12 standard COCO bbox numbers, and with
--json-prefix also writes the detections as COCO results json
(PREFIX.bbox.json), which tools/coco_eval.py can score again.
Checkpoints are loaded weights-only: one carrying a pickle payload is refused.
"""
import argparse
import os.path as osp

# importing mmge registers its models and the mmge:: config prefix
from mmge.engine.cli import add_common_args, load_config, run, set_local_rank


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Test (and evaluate) a checkpoint with MMEngine (mmge)')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--json-prefix',
        help='also write the detections as COCO results json '
        '(PREFIX.bbox.json); detection configs only')
    parser.add_argument(
        '--out', help='dump the raw predictions to this pickle file')
    add_common_args(parser)
    args = parser.parse_args(argv)
    set_local_rank(args)
    return args


def _evaluators(cfg):
    ev = cfg.test_evaluator
    return list(ev) if isinstance(ev, (list, tuple)) else [ev]


def build_config(args):
    """The config with the command line applied; checks data and paths."""
    from mmge.engine import check_data_paths
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint {args.checkpoint!r} not found')
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    cfg.resume = False
    if args.json_prefix is not None:
        coco = [e for e in _evaluators(cfg) if e.get('type') == 'CocoMetric']
        if not coco:
            raise ValueError('--json-prefix needs a CocoMetric test_evaluator')
        for e in coco:
            e.outfile_prefix = args.json_prefix
    if args.out is not None:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError(f'--out must be a .pkl file, got {args.out!r}')
        cfg.test_evaluator = _evaluators(cfg) + [
            dict(type='DumpDetResults', out_file_path=args.out)
        ]
    check_data_paths(cfg, ('test_dataloader', ))
    return cfg


def main(argv=None):
    args = parse_args(argv)
    return run(lambda: build_config(args), args.launcher, 'test')


if __name__ == '__main__':
    main()
