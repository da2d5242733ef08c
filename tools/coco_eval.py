"""Score a COCO results json against a COCO annotation json (pycocotools).

    python tools/coco_eval.py RESULTS.json ANNOTATIONS.json [--per-class]
        [--out METRICS.json]

Prints the 12 standard COCO bbox numbers (and AP/AP50 per class) and writes
them as json. RESULTS.json is what tools/test.py --json-prefix writes.
"""
import argparse
import json
import os
import os.path as osp
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Score COCO-format detections with pycocotools')
    parser.add_argument('results', help='COCO results json (detections)')
    parser.add_argument('annotations', help='COCO annotation json')
    parser.add_argument(
        '--per-class', action='store_true', help='AP and AP50 per class')
    parser.add_argument(
        '--out', help='write the metrics here (default: RESULTS.metrics.json)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mmge.evaluation import CocoEvalError, evaluate_coco, format_table
    try:
        metrics = evaluate_coco(args.results, args.annotations,
                                per_class=args.per_class)
    except CocoEvalError as e:
        sys.exit(f'error: {e}')
    print(format_table(metrics))
    out = args.out or osp.splitext(args.results)[0] + '.metrics.json'
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
        json.dump(metrics, f, indent=2)
    print(f'metrics written to {out}')
    return metrics


if __name__ == '__main__':
    main()
