"""Say in the log whether loaded weights covered a model's GE layers."""
from typing import Sequence

import torch.nn as nn
from mmengine.logging import print_log


def report_layer_loading(module: nn.Module, layer_names: Sequence[str]) -> None:
    """After every ``load_state_dict`` into ``module``, log one line saying
    whether the weights held its gating layers (GE, SE, GC) or left them as
    freshly initialised.

    A detector's backbone is usually initialised from plain ResNet ImageNet
    weights; this makes the log say so in words rather than only in
    MMEngine's list of missing keys.

    Args:
        module (nn.Module): ``GEResNet`` or ``GEResLayer``.
        layer_names (Sequence[str]): The layers' attribute names in a block,
            e.g. ``['gather_excite']``.
    """
    names = tuple(f'.{n}.' for n in layer_names)
    owner = type(module).__name__

    def hook(mod, incompatible):
        expected = [k for k in mod.state_dict() if any(n in k for n in names)]
        if not expected:
            return
        missing = [k for k in incompatible.missing_keys
                   if any(n in k for n in names)
                   and not k.endswith('num_batches_tracked')]
        layers = ', '.join(layer_names)
        if missing:
            print_log(
                f'{owner}: the loaded weights have no entries for its '
                f'{layers} layers ({len(missing)} tensors); those keep their '
                f'fresh initialisation', logger='current')
        else:
            print_log(f'{owner}: its {layers} layers were loaded from the '
                      f'weights too', logger='current')

    module.register_load_state_dict_post_hook(hook)
