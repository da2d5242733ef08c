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
import os
import os.path as osp
import pickle
import sys

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Test (and evaluate) a checkpoint with MMEngine (mmge)')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir', help='the dir to save the evaluation metrics and logs')
    parser.add_argument(
        '--json-prefix',
        help='also write the detections as COCO results json '
        '(PREFIX.bbox.json); detection configs only')
    parser.add_argument(
        '--out', help='dump the raw predictions to this pickle file')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (nested keys with dots)')
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_config(args) -> Config:
    """Read the config and apply the command line to it."""
    for what, path in (('config file', args.config),
                       ('checkpoint', args.checkpoint)):
        if not osp.isfile(path):
            raise FileNotFoundError(f'{what} {path!r} not found')
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    cfg.resume = False
    if args.json_prefix is not None:
        evaluators = cfg.test_evaluator if isinstance(
            cfg.test_evaluator, list) else [cfg.test_evaluator]
        coco = [e for e in evaluators if e.get('type') == 'CocoMetric']
        if not coco:
            raise ValueError('--json-prefix needs a CocoMetric test_evaluator')
        for e in coco:
            e.outfile_prefix = args.json_prefix
    if args.out is not None:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError(f'--out must be a .pkl file, got {args.out!r}')
        evaluators = cfg.test_evaluator if isinstance(
            cfg.test_evaluator, list) else [cfg.test_evaluator]
        cfg.test_evaluator = list(evaluators) + [
            dict(type='DumpDetResults', out_file_path=args.out)
        ]
    return cfg


def main(argv=None):
    args = parse_args(argv)
    # imported here so that --help is quick; importing mmge registers its
    # models and the mmge:: config prefix
    from mmge.engine import DataPathError, check_data_paths, setup_runtime

    try:
        cfg = build_config(args)
        check_data_paths(cfg, ('test_dataloader', ))
        setup_runtime(cfg, args.launcher)
        # builds the model: bad --cfg-options show up here, as mmengine's
        # error in one line rather than a traceback
        runner = (Runner.from_cfg(cfg) if 'runner_type' not in cfg else
                  RUNNERS.build(cfg))
    except (DataPathError, FileNotFoundError, ValueError, KeyError,
            TypeError) as e:
        sys.exit(f'error: {e}')
    try:
        return runner.test()
    except pickle.UnpicklingError as e:
        from mmge.utils import refusal_message
        sys.exit(f'error: refused to load checkpoint {args.checkpoint!r}: '
                 f'{refusal_message(e)}')


if __name__ == '__main__':
    main()
