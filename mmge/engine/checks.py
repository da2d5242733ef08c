"""Early, one-line errors for data paths a config points at."""
import os.path as osp

from mmengine.config import Config

HINTS = {
    'CocoDataset':
    'get COCO from https://cocodataset.org (images train2017/, val2017/ '
    'and annotations/instances_*.json; or the 2014 release) and point '
    'COCO_ROOT (and COCO_YEAR) at it, see docs/detection.md',
    'ImageNet':
    'get ImageNet-1k from https://image-net.org (train/ and val/ as '
    'mmpretrain lays them out) and point IMAGENET_ROOT at it',
    'CIFAR10':
    'create it and put the CIFAR python archive there (mmpretrain '
    'downloads it into an existing empty folder when the internet is '
    'reachable), and point CIFAR_ROOT at it',
}
HINTS['CIFAR100'] = HINTS['CIFAR10']


class DataPathError(FileNotFoundError):
    """A data root, annotation file or image folder named by a config is
    missing."""


def _datasets(cfg: Config, loader: str):
    dataset = (cfg.get(loader) or {}).get('dataset')
    while dataset is not None:  # unwrap RepeatDataset & co.
        yield dataset
        dataset = dataset.get('dataset')


def check_data_paths(cfg: Config, loaders=('train_dataloader',
                                           'val_dataloader',
                                           'test_dataloader')) -> None:
    """Raise :class:`DataPathError` naming the first missing data path.

    Args:
        cfg (Config): The experiment config.
        loaders (Sequence[str]): Which dataloaders to check.

    Raises:
        DataPathError: With the config field, the path and how to get the
            data.
    """
    for loader in loaders:
        for ds in _datasets(cfg, loader):
            hint = HINTS.get(ds.get('type'), 'see the config\'s comments')
            root = ds.get('data_root') or ''
            if root and not osp.isdir(root):
                raise DataPathError(
                    f'{loader}.dataset.data_root: {root!r} does not exist; '
                    f'{hint}')
            ann = ds.get('ann_file')
            if ann and not osp.isfile(osp.join(root, ann)):
                raise DataPathError(
                    f'{loader}.dataset.ann_file: {osp.join(root, ann)!r} '
                    f'does not exist; {hint}')
            prefix = ds.get('data_prefix')
            img = prefix.get('img') if isinstance(prefix, dict) else prefix
            if img and not osp.isdir(osp.join(root, img)):
                raise DataPathError(
                    f'{loader}.dataset.data_prefix: {osp.join(root, img)!r} '
                    f'does not exist; {hint}')
