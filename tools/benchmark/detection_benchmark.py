"""Time and memory of a whole detector training iteration, GE against its
baseline config.

    python tools/benchmark/detection_benchmark.py [--size 800 1333]
        [--repeats 3] [--configs BASE GE ...] [--memory-saving]

Builds every config's model (random weights), makes one batch of
``--batch`` images of ``--size`` with ``--boxes`` ground-truth boxes each
(mmdet's ``demo_mm_inputs``), and reports for each model the median over
``--repeats`` alternating rounds of one training iteration (data
preprocessor, losses, backward, SGD step) and the bytes of tensors autograd
saves for backward during the losses (once per storage, deterministic),
each also as a ratio to the first config. The RPN's box regression is
zeroed and its training NMS is off, so that every model has the same
proposals (its anchors) and samples the same number of RoIs. ``--memory-saving`` adds the GE
configs again with ``ge_cfg.memory_efficient=True`` wherever a ``ge_cfg``
appears. A benchmark, not a test: run it on an idle machine.
"""
import argparse
import copy
import logging
import statistics
import time

import torch

DEFAULT_CONFIGS = ('configs/faster_rcnn_r50_c4.py',
                   'configs/faster_rcnn_ge_theta_e8.py')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='detector training iteration: GE against its baseline')
    parser.add_argument('--configs', nargs='+', default=list(DEFAULT_CONFIGS),
                        help='configs; ratios are to the first one')
    parser.add_argument('--size', nargs=2, type=int, default=(800, 1333),
                        metavar=('H', 'W'), help='image size')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--boxes', type=int, default=10,
                        help='ground-truth boxes per image')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--rois', type=int, default=None,
                        help='RoIs sampled per image (default: the '
                        "config's, 512)")
    parser.add_argument('--memory-saving', action='store_true',
                        help='also GE configs with memory_efficient=True')
    parser.add_argument('--threads', type=int, default=0)
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                        help='where the models run (default: cpu)')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: torch sees no CUDA device')
    if args.repeats < 1 or args.batch < 1 or min(args.size) < 32 or (
            args.rois is not None and args.rois < 1):
        parser.error('--repeats, --batch and --rois must be >= 1 and '
                     '--size >= 32')
    return args


def _edit_dicts(node, edit):
    """Call ``edit`` on every dict inside ``node``, depth first."""
    if isinstance(node, dict):
        for value in node.values():
            _edit_dicts(value, edit)
        edit(node)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _edit_dicts(value, edit)


def same_roi_count(cfg):
    """The model config with the RPN's training NMS switched off (IoU 1),
    so that every model, whatever its (random) weights, passes the same
    number of proposals and so samples the same number of RoIs."""
    cfg = copy.deepcopy(cfg)
    proposal = cfg.get('train_cfg', {}).get('rpn_proposal')
    if proposal is not None:
        proposal['nms'] = dict(type='nms', iou_threshold=1.0)
    return cfg


def memory_saving(cfg):
    """A copy of a model config with every ``ge_cfg`` in memory-saving
    mode; None if it has no ``ge_cfg``."""
    found = []

    def edit(node):
        if isinstance(node.get('ge_cfg'), dict):
            node['ge_cfg']['memory_efficient'] = True
            found.append(node)

    cfg = copy.deepcopy(cfg)
    _edit_dicts(cfg, edit)
    return cfg if found else None


def random_weights(cfg):
    """The model config without its pretrained-weight ``init_cfg``s (no
    download; time and memory do not depend on the weights)."""

    def edit(node):
        init = node.get('init_cfg')
        if isinstance(init, dict) and init.get('type') == 'Pretrained':
            node.pop('init_cfg')

    cfg = copy.deepcopy(cfg)
    _edit_dicts(cfg, edit)
    return cfg


def fixed_proposals(model):
    """Zero the RPN's box regression and its scores, so that its proposals
    are the same anchors in every model, whatever the rest of the (random)
    weights: RoIAlign's cost grows with the RoIs' sizes, and random scores
    would pick other anchors for each model."""
    head = getattr(model, 'rpn_head', None)
    for name in ('rpn_reg', 'rpn_cls'):
        layer = getattr(head, name, None)
        if layer is not None:
            with torch.no_grad():
                layer.weight.zero_()
                layer.bias.zero_()


def build_models(args):
    from mmengine.config import Config, ConfigDict
    from mmengine.logging import MMLogger
    from mmengine.registry import MODELS, init_default_scope

    import mmge  # noqa: F401
    init_default_scope('mmdet')
    rows = {}
    for path in args.configs:
        model_cfg = same_roi_count(
            random_weights(Config.fromfile(path).model.to_dict()))
        if args.rois is not None:
            model_cfg['train_cfg']['rcnn']['sampler']['num'] = args.rois
        name = path.rsplit('/', 1)[-1][:-3]
        rows[name] = model_cfg
        saving = memory_saving(model_cfg) if args.memory_saving else None
        if saving is not None:
            rows[f'{name}, memory-saving'] = saving
    models = {}
    for name, cfg in rows.items():
        torch.manual_seed(0)
        model = MODELS.build(ConfigDict(cfg))
        MMLogger.get_current_instance().setLevel(logging.WARNING)
        model.init_weights()
        fixed_proposals(model)
        models[name] = model.to(args.device).train()
    return models


def make_batch(args):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    return demo_mm_inputs(
        batch_size=args.batch,
        image_shapes=[(3, *args.size)] * args.batch,
        num_items=[args.boxes] * args.batch,
        num_classes=80)


def losses(model, batch):
    # the RoI sampler draws the same RoIs in every call of every model
    torch.manual_seed(0)
    data = model.data_preprocessor(batch, True)
    loss, _ = model.parse_losses(model(**data, mode='loss'))
    return loss


def _sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


def train_iter(model, batch, opt, device='cpu'):
    _sync(device)
    start = time.perf_counter()
    losses(model, batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = build_models(args)
    batch = make_batch(args)
    # lr 0: the step does its work but leaves the proposals fixed
    opts = {n: torch.optim.SGD(m.parameters(), lr=0.0)
            for n, m in models.items()}
    for name, m in models.items():  # warm-up
        train_iter(m, batch, opts[name], args.device)
    times = {n: [] for n in models}
    for _ in range(args.repeats):
        for name, m in models.items():
            times[name].append(train_iter(m, batch, opts[name], args.device))
    from mmge.utils import saved_tensor_bytes
    memory = {n: saved_tensor_bytes(lambda m=m: losses(m, batch))
              for n, m in models.items()}
    base = next(iter(models))
    base_time = statistics.median(times[base])
    h, w = args.size
    where = torch.cuda.get_device_name() if args.device == 'cuda' else \
        f'CPU, {torch.get_num_threads()} threads'
    print(f'training iteration, batch {args.batch} of {h}x{w}, '
          f'{args.boxes} boxes per image, torch {torch.__version__}, '
          f'{where}, median of {args.repeats}\n')
    print('| model | iteration (s) | / baseline | saved for backward (MB) '
          '| / baseline |')
    print('| --- | --- | --- | --- | --- |')
    for name in models:
        t = statistics.median(times[name])
        print(f'| {name} | {t:.2f} | {t / base_time:.2f}x | '
              f'{memory[name] / 2**20:.0f} | '
              f'{memory[name] / memory[base]:.3f}x |')


if __name__ == '__main__':
    main()
