"""An independent NumPy reference of Gather-Excite, written from docs/operators.md.

Loops over output cells, float64 throughout; it shares no code with mmge.
The one PyTorch detail it mirrors on purpose is the source index of
``F.interpolate(mode='nearest')``, which docs/operators.md names as the reference
semantics: ``min(floor(i * float32(in / out)), in - 1)``.
"""
import math

import numpy as np


def nearest_index(out_size, in_size):
    if out_size == in_size:
        return np.arange(out_size)
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale)
    return np.minimum(idx.astype(np.int64), in_size - 1)


def pool_gather(x, extent):
    """Mean over a (2e-1)^2 window centred on e*u, padding not counted."""
    n, c, h, w = x.shape
    if extent == 'global':
        return x.mean(axis=(2, 3), keepdims=True)
    e = extent
    oh, ow = math.ceil(h / e), math.ceil(w / e)
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            r0, r1 = max(0, e * i - (e - 1)), min(h, e * i + e)
            c0, c1 = max(0, e * j - (e - 1)), min(w, e * j + e)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


def batch_norm(x, bn, train):
    """BN from a torch BatchNorm2d's parameters (eval: running stats)."""
    if train:
        mean = x.mean(axis=(0, 2, 3))
        var = x.var(axis=(0, 2, 3))
    else:
        mean = bn.running_mean.detach().double().numpy()
        var = bn.running_var.detach().double().numpy()
    g = bn.weight.detach().double().numpy()
    b = bn.bias.detach().double().numpy()
    scale = g / np.sqrt(var + bn.eps)
    return (x - mean[None, :, None, None]) * scale[None, :, None,
                                                     None] + b[None, :, None,
                                                               None]


def depthwise_3x3_s2(x, weight):
    """Depthwise 3x3 correlation, stride 2, zero padding 1."""
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + 2, w + 2))
    xp[:, :, 1:-1, 1:-1] = x
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            out[:, :, i, j] = (patch * weight[None, :, 0]).sum(axis=(2, 3))
    return out


def conv_gather(x, layer, extent, last_act, train=False):
    """GE-theta gather from the layer's own weights: depthwise convs + BN."""
    convs = list(layer.gather.convs)
    out = x
    for k, m in enumerate(convs):
        weight = m.conv.weight.detach().double().numpy()
        if extent == 'global':
            out = (out * weight[None, :, 0]).sum(axis=(2, 3),
                                                 keepdims=True)
        else:
            out = depthwise_3x3_s2(out, weight)
        out = batch_norm(out, m.bn, train)
        if k < len(convs) - 1 or last_act:
            out = np.maximum(out, 0)
    return out


def mlp(g, layer):
    """1x1 conv (bias), ReLU, 1x1 conv (bias), per cell."""
    c1, c2 = layer.excite.mlp[0].conv, layer.excite.mlp[1].conv
    w1 = c1.weight.detach().double().numpy()[:, :, 0, 0]
    b1 = c1.bias.detach().double().numpy()
    w2 = c2.weight.detach().double().numpy()[:, :, 0, 0]
    b2 = c2.bias.detach().double().numpy()
    hid = np.einsum('oc,nchw->nohw', w1, g) + b1[None, :, None, None]
    hid = np.maximum(hid, 0)
    return np.einsum('oc,nchw->nohw', w2, hid) + b2[None, :, None, None]


def excite(x, g):
    """x * sigmoid(nearest_resize(g, size of x))."""
    h, w = x.shape[-2:]
    rows = nearest_index(h, g.shape[2])
    cols = nearest_index(w, g.shape[3])
    g = g[:, :, rows][:, :, :, cols]
    return x * (1.0 / (1.0 + np.exp(-g)))


def gather_excite(x, layer, variant, extent, train=False):
    """The whole layer, per docs/operators.md's table of variants."""
    if variant == 'theta_minus':
        g = pool_gather(x, extent)
    else:
        g = conv_gather(
            x, layer, extent, last_act=variant == 'theta_plus', train=train)
    if variant == 'theta_plus':
        g = mlp(g, layer)
    return excite(x, g)
