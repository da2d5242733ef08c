"""What every analysis command needs: a trained model, its data, a loop.

The commands under ``tools/analysis/`` read OpenMMLab configs and
checkpoints of classifiers (mmpretrain) or detectors (mmdet) alike:

- :func:`load_model`: build the config's model and load the checkpoint
  weights-only (checkpoints are untrusted input);
- :func:`build_split_loader`: the config's ``val``/``test`` dataloader;
- :func:`iterate`: preprocessed batches with a progress bar;
- :func:`stage_blocks` and :func:`find_module`: blocks of the backbone;
- :func:`display_images`: the preprocessed inputs as RGB images to draw;
- :func:`new_figure` / :func:`write_outputs`: the PNG and JSON beside it;
- :func:`add_models_arg`, :func:`add_data_args`, :func:`add_out_dir_arg`,
  :func:`positive_int`: their shared options.
"""
import argparse
import json
import os
import os.path as osp
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f'must be an integer >= 1, got {text!r}')
    return value


def add_models_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """``--model NAME CONFIG CHECKPOINT``, repeatable, required."""
    parser.add_argument(
        '--model', nargs=3, action='append', required=True,
        metavar=('NAME', 'CONFIG', 'CHECKPOINT'),
        help=f'{what}: its label, config and checkpoint (repeatable)')


def add_out_dir_arg(parser: argparse.ArgumentParser) -> None:
    """``--out-dir``, required."""
    parser.add_argument('--out-dir', required=True,
                        help='where the PNG and the JSON are written')


def add_data_args(parser: argparse.ArgumentParser,
                  max_images: bool = True) -> None:
    """``--split``, ``--max-images`` (unless ``max_images=False``) and
    ``--out-dir``."""
    parser.add_argument('--split', default='val', choices=('val', 'test'),
                        help="the config's dataloader to read (default val)")
    if max_images:
        parser.add_argument('--max-images', type=positive_int, default=None,
                            help='read at most this many images of the '
                            'split')
    add_out_dir_arg(parser)


def load_model(config: str, checkpoint: str) -> Tuple[nn.Module, Any]:
    """The model of ``config`` with the weights of ``checkpoint``.

    The checkpoint is read with PyTorch's weights-only unpickler (plus the
    few MMEngine objects :func:`mmge.utils.allow_mmengine_checkpoints`
    allows) and must match the model exactly.

    Args:
        config (str): An mmpretrain or mmdet config file.
        checkpoint (str): Its checkpoint.

    Returns:
        tuple: The model in eval mode on the CPU, and the config.

    Raises:
        FileNotFoundError: Naming the config or checkpoint that is missing.
    """
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import load_checkpoint

    import mmge  # noqa: F401  (registers mmge's modules)
    for path, what in ((config, 'config'), (checkpoint, 'checkpoint')):
        if not osp.isfile(path):
            raise FileNotFoundError(f'{what} {path!r} does not exist')
    cfg = Config.fromfile(config)
    if 'model' not in cfg:
        raise ValueError(f'config {config!r} has no model')
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    model = MODELS.build(cfg.model)
    try:
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True,
                        logger='silent')
    except Exception as e:
        raise RuntimeError(f'checkpoint {checkpoint!r} does not load into '
                           f'the model of {config!r}: {e}') from e
    return model.eval(), cfg


def build_split_loader(cfg: Any, split: str, config: str = 'the config'):
    """The config's ``{split}_dataloader``, built.

    Args:
        cfg (Config): A loaded config.
        split (str): ``'val'`` or ``'test'``.
        config (str): The config's name, for errors.

    Returns:
        DataLoader: The split's dataloader.
    """
    from mmengine.runner import Runner
    loader_cfg = cfg.get(f'{split}_dataloader')
    if loader_cfg is None:
        raise ValueError(f'{config} has no {split}_dataloader; '
                         "choose --split 'val' or 'test'")
    return Runner.build_dataloader(loader_cfg)


def iterate(model: nn.Module, loader, max_images: Optional[int] = None,
            bar=None) -> Iterator[Tuple[torch.Tensor, list]]:
    """Preprocessed batches ``(inputs, data_samples)``, with a progress bar.

    Args:
        model (nn.Module): The model, whose data preprocessor is used.
        loader (DataLoader): The data.
        max_images (int, optional): Stop after this many images (the last
            batch is cut to fit).
        bar (ProgressBar, optional): A bar to advance per image, shared by
            several passes; by default one for this pass, on stderr.

    Yields:
        tuple: Inputs (N, 3, H, W) and their data samples.
    """
    if bar is None:
        bar = progress_bar(num_images(loader, max_images))
    seen = 0
    for batch in loader:
        data = model.data_preprocessor(batch, False)
        inputs, samples = data['inputs'], data['data_samples']
        if max_images is not None:
            inputs, samples = inputs[:max_images - seen], \
                samples[:max_images - seen]
        yield inputs, samples
        seen += len(inputs)
        bar.update(len(inputs))
        if max_images is not None and seen >= max_images:
            break


def num_images(loader, max_images: Optional[int] = None) -> int:
    """Images one pass of :func:`iterate` reads."""
    total = len(loader.dataset)
    return total if max_images is None else min(total, max_images)


def progress_bar(total: int):
    """MMEngine's progress bar on stderr, so stdout stays the report."""
    from mmengine.utils import ProgressBar
    return ProgressBar(total, file=sys.stderr)


def stage_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The backbone's stages as ``(name, module)``, in order."""
    backbone = model.backbone
    names = getattr(backbone, 'res_layers', None)
    if names is not None:
        return [(n, getattr(backbone, n)) for n in names]
    if hasattr(backbone, 'layers'):
        return [(f'layers.{i}', m) for i, m in enumerate(backbone.layers)]
    raise ValueError(f'{type(backbone).__name__} has no stages '
                     '(res_layers or layers) to analyse')


def stage_blocks(model: nn.Module, stage: int) -> List[nn.Module]:
    """The residual blocks of one backbone stage (``-1``: the last)."""
    stages = stage_modules(model)
    if not -len(stages) <= stage < len(stages):
        raise ValueError(f'--stage must be in {-len(stages)}..'
                         f'{len(stages) - 1}, got {stage}')
    return list(stages[stage][1])


def find_module(model: nn.Module, name: str) -> nn.Module:
    """A submodule of the backbone by its name (``'layer4.0'``).

    Raises:
        ValueError: Naming the module and listing the backbone's blocks.
    """
    modules = dict(model.backbone.named_modules())
    if name not in modules:
        blocks = [f'{s}.{i}' for s, stage in stage_modules(model)
                  for i in range(len(stage))]
        raise ValueError(f'the backbone has no module {name!r}; its blocks '
                         f'are {", ".join(blocks)}')
    return modules[name]


def display_images(model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    """Preprocessed inputs back as uint8 RGB images (N, H, W, 3)."""
    pre = model.data_preprocessor
    img = inputs.detach().float()
    if getattr(pre, '_enable_normalize', False):
        img = img * pre.std + pre.mean
    if img.shape[1] == 3 and not getattr(pre, '_channel_conversion', False):
        img = img.flip(1)  # the model sees BGR: show RGB
    return img.clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def new_figure(rows: int, cols: int, size: Tuple[float, float] = (3, 3)):
    """A matplotlib figure (headless) with a 2-d array of axes."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows),
                        squeeze=False)


def write_outputs(fig, report: Dict[str, Any], out_dir: str,
                  name: str) -> Tuple[str, str]:
    """Save ``name.png`` and ``name.json`` in ``out_dir``.

    Returns:
        tuple[str, str]: The two paths.
    """
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    png, js = (osp.join(out_dir, f'{name}.{ext}') for ext in ('png', 'json'))
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    with open(js, 'w') as f:
        json.dump(report, f, indent=1)
    return png, js
