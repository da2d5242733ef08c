"""The prepared inference call: a GE layer without autograd
replays its kernel call, and takes its full path again whenever something
the call depends on has changed. Every output is compared with the formula
(float64, on copies of the modules as they are at that moment)."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn

from mmge.models.layers.ge_block import ge_block_tail
from mmge.models import GatherExcite, GEResNet
from mmge.ops import cpu_kernels
from mmge.models.layers import ge_block as ge_module
from mmge.models.layers.prepared_inference import (PreparedInference,
                                                   fingerprint)
from test_ge_fast_paths import formula

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason='native kernels not built')

VARIANTS = ('theta_minus', 'theta', 'theta_plus')


def make(variant, channels=16):
    torch.manual_seed(0)
    layer = GatherExcite(channels, variant=variant, extent=4,
                         reduction=4).eval()
    norm = nn.BatchNorm2d(channels).eval()
    for bn in [norm] + [m for m in layer.modules()
                        if isinstance(m, nn.BatchNorm2d)]:
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, channels, 13, 18)
    return layer, norm, x, torch.randn_like(x)


def check(layer, norm, x, identity, relu=True):
    """The layer's output (no grad) against the formula."""
    with torch.no_grad():
        out = ge_block_tail(layer, x, identity, norm=norm, relu=relu)
        ref = formula(copy.deepcopy(layer).double(), x.double(),
                      None if identity is None else identity.double(),
                      None if norm is None else copy.deepcopy(norm).double(),
                      relu)
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=1e-4,
                               atol=2e-5)
    return out


@pytest.fixture
def plans(monkeypatch):
    """Count the calls that take the full path (:func:`native_plan`)."""
    calls = []
    plan = ge_module.native_plan

    def spy(*args):
        calls.append(1)
        return plan(*args)

    monkeypatch.setattr(ge_module, 'native_plan', spy)
    return calls


@pytest.mark.parametrize('variant', VARIANTS)
def test_second_call_replays_the_first(variant, plans):
    layer, norm, x, identity = make(variant)
    first = check(layer, norm, x, identity)
    prepared = layer._prepared
    assert isinstance(prepared, PreparedInference)
    second = check(layer, norm, x + 1, identity)
    third = check(layer, norm, x, identity)
    assert len(plans) == 1, 'the later calls took the full path'
    assert layer._prepared is prepared
    assert torch.equal(first, third) and not torch.equal(first, second)


@pytest.mark.parametrize('variant', VARIANTS)
def test_values_updated_in_place_are_read_by_the_replay(variant, plans):
    layer, norm, x, identity = make(variant)
    check(layer, norm, x, identity)
    state = {k: v + 0.25 if v.is_floating_point() else v
             for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)
    norm.running_mean.add_(0.5)
    check(layer, norm, x, identity)
    assert len(plans) == 1


def _replace_param(layer, norm):
    conv = layer.excite.mlp[0].conv if layer.excite.mlp is not None else \
        None
    if conv is None and layer.variant == 'theta':
        conv = layer.gather.convs[0].conv
    if conv is None:  # theta-minus: the norm's
        norm.weight = nn.Parameter(norm.weight.detach() * 2)
    else:
        conv.weight = nn.Parameter(conv.weight.detach() * 2)


def _set_data(layer, norm):
    norm.weight.data = norm.weight.detach() * -1


def _replace_module(layer, norm):
    if layer.variant == 'theta_minus':  # no state: the same values
        layer.excite = type(layer.excite)()
    else:
        old = layer.gather.convs[1].bn
        new = nn.BatchNorm2d(old.num_features).eval()
        new.running_var.fill_(3)
        layer.gather.convs[1].bn = new


def _eps(layer, norm):
    norm.eps = 0.5


def _double_then_float(layer, norm):
    layer.double().float()
    norm.double().float()


CHANGES = {
    'parameter replaced': _replace_param,
    'parameter data replaced': _set_data,
    'submodule replaced': _replace_module,
    'eps changed': _eps,
    'converted and back': _double_then_float,
}


@pytest.mark.parametrize('change', sorted(CHANGES))
@pytest.mark.parametrize('variant', VARIANTS)
def test_a_changed_module_is_prepared_again(variant, change, plans):
    layer, norm, x, identity = make(variant)
    before = check(layer, norm, x, identity)
    prepared = layer._prepared
    CHANGES[change](layer, norm)
    after = check(layer, norm, x, identity)
    assert not torch.equal(before, after) or change == 'converted and back' \
        or (variant, change) == ('theta_minus', 'submodule replaced')
    assert len(plans) == 2, 'the change was not noticed'
    assert layer._prepared is not None and layer._prepared is not prepared


@pytest.mark.parametrize('variant', VARIANTS)
def test_each_call_argument_is_checked(variant, plans):
    """Shape, shortcut or none, ``relu``, the norm module, threads."""
    layer, norm, x, identity = make(variant)
    check(layer, norm, x, identity)
    calls = [
        (norm, x[:, :, :7], identity[:, :, :7].contiguous(), True),
        (norm, x, None, True),
        (norm, x, identity, False),
        (copy.deepcopy(norm).train().eval(), x, identity, True),
        (None, x, identity, True),
    ]
    for n, (nm, inp, ident, relu) in enumerate(calls, start=2):
        if nm is not None and nm is not norm:
            nm.running_mean.mul_(2)
        check(layer, nm, inp, ident, relu)
        assert len(plans) == n
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        check(layer, None, x, identity)
    finally:
        torch.set_num_threads(threads)
    assert len(plans) == len(calls) + 2
    check(layer, None, x, identity)
    assert len(plans) == len(calls) + 3


@pytest.mark.parametrize('variant', VARIANTS)
def test_inputs_it_does_not_take_go_the_full_path(variant):
    layer, norm, x, identity = make(variant)
    check(layer, norm, x, identity)
    prepared = layer._prepared
    assert prepared(layer, x.transpose(2, 3).contiguous().transpose(2, 3),
                    identity, norm, True) is None
    assert prepared(layer, x, identity.double(), norm, True) is None
    assert prepared(layer, x, identity, norm, True) is not None
    # the layer falls back and stays right
    check(layer, norm, x.contiguous(memory_format=torch.channels_last),
          identity)
    check(layer, norm, x, identity.transpose(0, 1).contiguous().transpose(
        0, 1))
    check(layer.double(), norm.double(), x.double(), identity.double())


@pytest.mark.parametrize('variant', VARIANTS)
def test_training_mode_and_hooks_are_not_replayed(variant):
    layer, norm, x, identity = make(variant)
    check(layer, norm, x, identity)
    norm.train()  # batch statistics: the full path, which updates them
    running = norm.running_mean.clone()
    with torch.no_grad():
        ge_block_tail(layer, x, identity, norm=norm)
    assert not torch.equal(running, norm.running_mean)
    assert layer._prepared is None
    norm.eval()
    check(layer, norm, x, identity)
    assert layer._prepared is not None
    seen = []
    inner = layer.gather if variant == 'theta_minus' else \
        layer.gather.convs[0]
    handle = inner.register_forward_hook(lambda m, *a: seen.append(m))
    check(layer, norm, x, identity)  # the formula runs on a copy
    assert seen.count(inner) == 1 and layer._prepared is None
    assert fingerprint(layer, norm) is None
    handle.remove()
    check(layer, norm, x, identity)
    assert layer._prepared is not None


def test_theta_plus_under_autocast_is_not_replayed():
    layer, norm, x, identity = make('theta_plus')
    check(layer, norm, x, identity)
    assert layer._prepared is not None
    with torch.no_grad(), torch.autocast('cpu'):
        out = ge_block_tail(layer, x, identity, norm=norm, relu=True)
    assert layer._prepared is None
    ref = check(layer, norm, x, identity)
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize('variant', VARIANTS)
def test_copies_and_pickles_do_not_carry_it(variant):
    layer, norm, x, identity = make(variant)
    out = check(layer, norm, x, identity)
    assert layer._prepared is not None
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other._prepared is None
        with torch.no_grad():
            assert torch.equal(ge_block_tail(
                    other, x, identity, norm=norm, relu=True), out)
        assert other._prepared is not None
        assert other._prepared is not layer._prepared


def test_moving_a_layer_drops_it():
    layer, norm, x, identity = make('theta')
    check(layer, norm, x, identity)
    layer.to(torch.float64)
    assert layer._prepared is None
    check(layer, norm.double(), x.double(), identity.double())
    assert layer._prepared is None  # float64 takes the ATen path


def test_a_ge_resnet_replays_every_layer_with_the_same_values():
    torch.manual_seed(0)
    model = GEResNet(50, base_channels=8, out_indices=(3, ),
                     ge_cfg=dict(variant='theta', extent=8)).eval()
    x = torch.randn(2, 3, 64, 64)
    layers = [m for m in model.modules() if isinstance(m, GatherExcite)]
    with torch.no_grad():
        first = model(x)[0]
        prepared = [m._prepared for m in layers]
        assert all(p is not None for p in prepared)
        second = model(x)[0]
    assert [m._prepared for m in layers] == prepared
    assert torch.equal(first, second)
