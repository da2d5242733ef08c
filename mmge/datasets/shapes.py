"""Small datasets of simple shapes, made from a seed: the demos' built-in data.

No download, the same files for the same arguments on every machine. Each
image has a textured background and filled squares, circles or triangles of
random colour and size. :func:`make_shapes_dataset` writes a COCO-format
detection set (a few objects an image, exact boxes);
:func:`make_shapes_classification` an image-folder classification set (one
object an image, its class the label).
"""
import json
import os
import os.path as osp
import shutil
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ('square', 'circle', 'triangle')


def _draw_shape(draw: ImageDraw.ImageDraw, label: int, box: Sequence[int],
                colour: Tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if CLASSES[label] == 'square':
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
    elif CLASSES[label] == 'circle':
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
    else:
        draw.polygon(((x0 + x1 - 1) / 2, y0, x1 - 1, y1 - 1, x0, y1 - 1),
                     fill=colour)


def _overlaps(box: Sequence[int], boxes: List[Sequence[int]],
              max_iou: float) -> bool:
    for b in boxes:
        iw = min(box[2], b[2]) - max(box[0], b[0])
        ih = min(box[3], b[3]) - max(box[1], b[1])
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        union = ((box[2] - box[0]) * (box[3] - box[1]) +
                 (b[2] - b[0]) * (b[3] - b[1]) - inter)
        if inter / union > max_iou:
            return True
    return False


def make_image(rng: np.random.RandomState, size: int, max_objects: int,
               min_side: int, max_side: int) -> Tuple[Image.Image, list]:
    """One image and its ``(label, [x0, y0, x1, y1])`` objects."""
    base = rng.randint(0, 256, size=3)
    noise = rng.randint(-20, 21, size=(size, size, 3))
    background = np.clip(base[None, None] + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    objects, boxes = [], []
    for _ in range(rng.randint(1, max_objects + 1)):
        for _attempt in range(20):
            side = rng.randint(min_side, max_side + 1)
            x0, y0 = rng.randint(0, size - side + 1, size=2)
            box = [int(x0), int(y0), int(x0 + side), int(y0 + side)]
            if not _overlaps(box, boxes, max_iou=0.1):
                break
        else:
            continue
        # a colour far from the background, so every shape is visible
        while True:
            colour = rng.randint(0, 256, size=3)
            if np.abs(colour - base).sum() > 180:
                break
        label = int(rng.randint(len(CLASSES)))
        _draw_shape(draw, label, box, tuple(int(c) for c in colour))
        boxes.append(box)
        objects.append((label, box))
    return image, objects


def _check_counts(**values) -> None:
    for name, (value, low) in values.items():
        if not isinstance(value, int) or value < low:
            raise ValueError(f'{name} must be an int >= {low}, got {value!r}')


def _up_to_date(root: str, meta: dict, paths) -> bool:
    """Whether ``root`` already holds the files ``meta`` describes.

    If not, empties the folders of a dataset generated before with other
    arguments (it has ``meta.json``), so no stale image stays; a non-empty
    folder that was not generated here is refused, never emptied.
    """
    meta_path = osp.join(root, 'meta.json')
    if osp.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) == meta and all(osp.exists(p) for p in paths):
                return True
        for sub in ('train', 'val', 'annotations'):
            shutil.rmtree(osp.join(root, sub), ignore_errors=True)
        os.remove(meta_path)
    elif osp.isdir(root) and os.listdir(root):
        raise ValueError(
            f'{root!r} is not empty and holds no generated dataset '
            f'(no meta.json); give an empty or new folder')
    return False


def make_shapes_classification(root: str,
                               num_train: int = 600,
                               num_val: int = 150,
                               img_size: int = 64,
                               seed: int = 0) -> Dict[str, str]:
    """Write a one-shape-per-image classification set under ``root``.

    ``root/{train,val}/<class>/<index>.png`` (mmpretrain's
    ``CustomDataset`` layout; classes are the folder names). Rewritten only
    when missing or when the arguments changed (``root/meta.json``).

    Args:
        root (str): Output folder.
        num_train (int): Training images. Defaults to 600.
        num_val (int): Held-out images. Defaults to 150.
        img_size (int): Side of the square images. Defaults to 64.
        seed (int): Random seed. Defaults to 0.

    Returns:
        dict: The two split folders (``'train'``, ``'val'``).
    """
    _check_counts(num_train=(num_train, 1), num_val=(num_val, 1),
                  img_size=(img_size, 32))
    meta = dict(task='classification', num_train=num_train, num_val=num_val,
                img_size=img_size, seed=seed, classes=list(CLASSES))
    splits = {s: osp.join(root, s) for s in ('train', 'val')}
    if _up_to_date(root, meta, splits.values()):
        return splits
    rng = np.random.RandomState(seed)
    for split, count in (('train', num_train), ('val', num_val)):
        for name in CLASSES:
            os.makedirs(osp.join(splits[split], name), exist_ok=True)
        for i in range(count):
            image, ((label, _), ) = make_image(rng, img_size, 1,
                                               img_size // 4, img_size // 2)
            image.save(osp.join(splits[split], CLASSES[label], f'{i:06d}.png'))
    with open(osp.join(root, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return splits


def make_shapes_dataset(root: str,
                        num_train: int = 400,
                        num_val: int = 100,
                        img_size: int = 128,
                        max_objects: int = 3,
                        seed: int = 0) -> Dict[str, str]:
    """Write the dataset under ``root`` in COCO layout.

    ``root/train/*.png``, ``root/val/*.png`` and
    ``root/annotations/instances_{train,val}.json``. Files are rewritten
    only when missing or when the arguments changed (``root/meta.json``).

    Args:
        root (str): Output folder.
        num_train (int): Training images. Defaults to 400.
        num_val (int): Held-out images. Defaults to 100.
        img_size (int): Side of the square images. Defaults to 128.
        max_objects (int): Objects per image, 1 to this. Defaults to 3.
        seed (int): Random seed. Defaults to 0.

    Returns:
        dict: Paths of the two annotation files (``'train'``, ``'val'``).
    """
    _check_counts(num_train=(num_train, 1), num_val=(num_val, 1),
                  img_size=(img_size, 32), max_objects=(max_objects, 1))
    meta = dict(num_train=num_train, num_val=num_val, img_size=img_size,
                max_objects=max_objects, seed=seed, classes=list(CLASSES))
    ann_dir = osp.join(root, 'annotations')
    paths = {s: osp.join(ann_dir, f'instances_{s}.json')
             for s in ('train', 'val')}
    if _up_to_date(root, meta, paths.values()):
        return paths
    os.makedirs(ann_dir, exist_ok=True)
    rng = np.random.RandomState(seed)
    min_side, max_side = max(8, img_size // 8), img_size // 2
    for split, count in (('train', num_train), ('val', num_val)):
        os.makedirs(osp.join(root, split), exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image, objects = make_image(rng, img_size, max_objects, min_side,
                                        max_side)
            file_name = f'{i:06d}.png'
            image.save(osp.join(root, split, file_name))
            images.append(dict(id=i, file_name=file_name, width=img_size,
                               height=img_size))
            for label, (x0, y0, x1, y1) in objects:
                annotations.append(
                    dict(id=len(annotations) + 1, image_id=i,
                         category_id=label + 1,
                         bbox=[x0, y0, x1 - x0, y1 - y0],
                         area=(x1 - x0) * (y1 - y0), iscrowd=0))
        coco = dict(
            images=images, annotations=annotations,
            categories=[dict(id=i + 1, name=n) for i, n in enumerate(CLASSES)])
        with open(paths[split], 'w') as f:
            json.dump(coco, f)
    with open(osp.join(root, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return paths
