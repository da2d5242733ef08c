"""Per-epoch curves from MMEngine's training logs (GE paper, Fig. 4).

MMEngine's ``LoggerHook`` writes, in each run's
``<work_dir>/<timestamp>/vis_data/<timestamp>.json``, one JSON object per
line: training lines carry ``epoch`` and ``iter`` with the scalars averaged
over the last logging window (mmpretrain's heads log ``accuracy_top-1``
with ``cal_acc=True``), validation lines carry the metrics with ``step``
set to the epoch.
"""
import glob
import json
import math
import os.path as osp
from typing import Dict, List, Optional


def log_files(path: str) -> List[str]:
    """The scalar logs of a work dir (oldest run first), or ``[path]``.

    Raises:
        FileNotFoundError: If the path does not exist or holds no logs.
    """
    if osp.isfile(path):
        return [path]
    if not osp.isdir(path):
        raise FileNotFoundError(f'{path!r} is neither a log file nor a '
                                'work dir')
    files = sorted(glob.glob(osp.join(path, '*', 'vis_data', '*.json')))
    files = [f for f in files if osp.basename(f) != 'scalars.json']
    if not files:
        raise FileNotFoundError(
            f'{path!r} holds no MMEngine scalar logs '
            '(<timestamp>/vis_data/<timestamp>.json)')
    return files


def read_lines(file: str) -> List[dict]:
    """The JSON objects of one log, one per line.

    Raises:
        ValueError: Naming the file and line that is not JSON.
    """
    entries = []
    with open(file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f'{file}, line {number}: not JSON ({e})')
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


def epoch_curves(path: str, train_key: str = 'accuracy_top-1',
                 val_key: str = 'accuracy/top1',
                 loss_key: str = 'loss') -> Dict[str, Dict[int, float]]:
    """Train and val error and train loss per epoch of one run.

    Logs of runs that trained (the lines with ``epoch``) are read oldest
    first, so a resumed run's later epochs replace nothing but add on, and
    a re-run epoch keeps its latest value; test-only runs are skipped.

    Args:
        path (str): A work dir or one scalar log file.
        train_key (str): Training accuracy in percent, averaged over the
            logged windows of each epoch.
        val_key (str): Validation accuracy in percent.
        loss_key (str): Training loss, averaged likewise.

    Returns:
        dict: ``train_error``, ``val_error`` (percent) and ``train_loss``,
        each ``{epoch: value}``; empty where the log lacks the key.

    Raises:
        ValueError: If no training lines are found.
    """
    sums: Dict[str, Dict[int, List[float]]] = {
        'train_error': {}, 'train_loss': {}}
    val: Dict[int, float] = {}
    trained = False
    for file in log_files(path):
        entries = read_lines(file)
        if not any('epoch' in e and 'iter' in e for e in entries):
            continue
        trained = True
        per_run: Dict[str, Dict[int, List[float]]] = {
            'train_error': {}, 'train_loss': {}}
        for e in entries:
            if 'epoch' in e and 'iter' in e:
                epoch = int(e['epoch'])
                if _number(e.get(train_key)) is not None:
                    per_run['train_error'].setdefault(epoch, []).append(
                        100.0 - float(e[train_key]))
                if _number(e.get(loss_key)) is not None:
                    per_run['train_loss'].setdefault(epoch, []).append(
                        float(e[loss_key]))
            elif _number(e.get(val_key)) is not None and 'step' in e:
                val[int(e['step'])] = 100.0 - float(e[val_key])
        for name, epochs in per_run.items():
            sums[name].update(epochs)
    if not trained:
        raise ValueError(f'{path!r}: no training lines (with "epoch" and '
                         '"iter") in its logs')
    curves = {name: {k: sum(v) / len(v) for k, v in sorted(epochs.items())}
              for name, epochs in sums.items()}
    curves['val_error'] = dict(sorted(val.items()))
    return curves


def _number(value) -> Optional[float]:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None
