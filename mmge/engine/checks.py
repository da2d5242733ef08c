"""Early, one-line errors for data paths a config points at."""
import os.path as osp

from mmengine.config import Config

COCO_HINT = ('get COCO from https://cocodataset.org (images train2017/, '
             'val2017/ and annotations/instances_*.json; or the 2014 '
             'release) and point COCO_ROOT (and COCO_YEAR) at it, see '
             'docs/detection.md')


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
            root = ds.get('data_root') or ''
            if root and not osp.isdir(root):
                raise DataPathError(
                    f'{loader}.dataset.data_root: {root!r} does not exist; '
                    f'{COCO_HINT}')
            ann = ds.get('ann_file')
            if ann:
                path = osp.join(root, ann)
                if not osp.isfile(path):
                    raise DataPathError(
                        f'{loader}.dataset.ann_file: {path!r} does not '
                        f'exist; {COCO_HINT}')
            img = (ds.get('data_prefix') or {}).get('img')
            if img is not None and not osp.isdir(osp.join(root, img)):
                raise DataPathError(
                    f'{loader}.dataset.data_prefix.img: '
                    f'{osp.join(root, img)!r} does not exist; {COCO_HINT}')
