import os
import sys

import pytest
import torch

# tests/ holds reference.py, the independent NumPy reference.
sys.path.insert(0, os.path.dirname(__file__))

if not torch.cuda.is_available():
    # before mmge defines its Triton kernels: without a GPU, Triton's
    # interpreter runs them on CPU tensors (test_triton_kernels.py)
    os.environ.setdefault('TRITON_INTERPRET', '1')

import mmge  # noqa: E402,F401  (registers the layers and backbones)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The data-root variables of the demo configs, and their generators' sizes.
DEMO_DATA = {
    'SHAPES_CLS_ROOT': ('make_shapes_classification',
                        dict(num_train=6, num_val=24, img_size=64)),
    'SHAPES_ROOT': ('make_shapes_dataset', dict(num_train=2, num_val=3)),
}


@pytest.fixture(scope='session')
def demo_model(tmp_path_factory):
    """A factory: ``make(config, seed=0)`` builds a demo config's model with
    random weights on tiny generated data and saves its checkpoint.

    Returns ``(config, checkpoint, model, env)``: the config path, the
    checkpoint path, the model (eval mode) and an environment for
    subprocesses in which the config finds its data.
    """
    from mmengine.registry import MODELS, init_default_scope

    from helpers.demo_config import demo_config
    from mmge import datasets
    base = tmp_path_factory.mktemp('demo_models')
    env = dict(os.environ)
    for var, (maker, sizes) in DEMO_DATA.items():
        root = str(base / var.lower())
        getattr(datasets, maker)(root, **sizes)
        env[var] = root + '/'

    def make(config: str, seed: int = 0):
        path = os.path.join(ROOT, config)
        cfg = demo_config(path, env)
        init_default_scope(cfg.get('default_scope', 'mmpretrain'))
        torch.manual_seed(seed)
        # PyTorch's default init, not init_weights(): residual branches
        # (zero-initialised last norms) and SNL/NL outputs must not be zero
        model = MODELS.build(cfg.model)
        ckpt = base / f'{os.path.basename(config)[:-3]}_{seed}.pth'
        torch.save({'state_dict': model.state_dict()}, ckpt)
        return path, str(ckpt), model.eval(), env

    return make
