"""The paper's ImageNet numbers per mmge config (its Tables 1-4).

Keys are config names under configs/classification/imagenet/. Error rates in
%, GFLOPs and parameters (M) as printed in the paper (Table 4 prints MFLOPs;
they are converted). :func:`baseline_of` names the row a FLOP increment is
measured against, :func:`targets` the tolerances docs/model_zoo.md states.
"""
PAPER = {
    # Table 2: ResNet-50
    'resnet50_8xb32_in1k': dict(
        table='2', top1=23.30, top5=6.55, gflops=3.86, params=25.6),
    'resnet50_se_8xb32_in1k': dict(
        table='2', top1=22.12, top5=5.99, gflops=3.87, params=28.1),
    'resnet50_ge_theta_minus_global_8xb32_in1k': dict(
        table='2', top1=22.14, top5=6.24, gflops=3.86, params=25.6),
    'resnet50_ge_theta_global_8xb32_in1k': dict(
        table='1, 2', top1=22.00, top5=5.87, gflops=3.87, params=31.2),
    'resnet50_ge_theta_plus_8xb32_in1k': dict(
        table='2', top1=21.88, top5=5.80, gflops=3.87, params=33.7),
    # Table 1: GE-theta (global) in one stage
    'resnet50_ge_theta_global_stage2_8xb32_in1k': dict(
        table='1', top1=23.29, top5=6.50, gflops=3.86, params=28.0),
    'resnet50_ge_theta_global_stage3_8xb32_in1k': dict(
        table='1', top1=22.70, top5=6.24, gflops=3.86, params=27.2),
    'resnet50_ge_theta_global_stage4_8xb32_in1k': dict(
        table='1', top1=22.50, top5=6.20, gflops=3.86, params=26.8),
    # Table 3: ResNet-101 (and ResNet-152 as reference)
    'resnet101_8xb32_in1k': dict(
        table='2, 3', top1=22.20, top5=6.14, gflops=7.57, params=44.6),
    'resnet101_se_8xb32_in1k': dict(
        table='3', top1=20.94, top5=5.50, gflops=7.58, params=49.4),
    'resnet101_ge_theta_minus_global_8xb32_in1k': dict(
        table='3', top1=21.47, top5=5.69, gflops=7.58, params=44.6),
    'resnet101_ge_theta_global_8xb32_in1k': dict(
        table='3', top1=21.46, top5=5.45, gflops=7.59, params=53.7),
    'resnet101_ge_theta_plus_8xb32_in1k': dict(
        table='3', top1=20.74, top5=5.29, gflops=7.59, params=58.4),
    'resnet152_8xb32_in1k': dict(
        table='3', top1=21.87, top5=5.78, gflops=11.28, params=60.3),
    # Table 4: ShuffleNet 1x (g = 3)
    'shufflenet_v1_1x_16xb64_in1k': dict(
        table='4', top1=32.60, top5=12.40, gflops=0.1375, params=1.9),
    'shufflenet_v1_1x_se_16xb64_in1k': dict(
        table='4', top1=31.24, top5=11.38, gflops=0.1399, params=2.5),
    'shufflenet_v1_1x_ge_theta_e2_16xb64_in1k': dict(
        table='4', top1=32.40, top5=12.31, gflops=0.1389, params=2.0),
    'shufflenet_v1_1x_ge_theta_e4_16xb64_in1k': dict(
        table='4', top1=32.32, top5=12.24, gflops=0.1391, params=2.1),
    'shufflenet_v1_1x_ge_theta_e8_16xb64_in1k': dict(
        table='4', top1=32.12, top5=12.11, gflops=0.1392, params=2.2),
    'shufflenet_v1_1x_ge_theta_global_16xb64_in1k': dict(
        table='4', top1=31.80, top5=11.98, gflops=0.1408, params=3.6),
    'shufflenet_v1_1x_ge_theta_plus_16xb64_in1k': dict(
        table='4', top1=30.12, top5=10.70, gflops=0.1416, params=4.4),
}


# Table 5: CIFAR error % (no complexity columns); config names under
# configs/classification/cifar/
_CIFAR = {
    'preact_resnet110': ((6.37, 26.88), (5.21, 23.85), (6.01, 26.58),
                         (5.57, 24.29), (4.93, 23.36)),
    'preact_resnet164': ((5.46, 24.33), (4.39, 21.31), (5.12, 23.94),
                         (4.67, 21.86), (4.07, 20.85)),
    'wrn16_8': ((4.27, 20.43), (3.88, 19.14), (4.12, 20.25), (4.02, 19.76),
                (3.72, 18.87)),
}
for _net, _rows in _CIFAR.items():
    for _tag, (_c10, _c100) in zip(
            ('', '_se', '_ge_theta_minus', '_ge_theta', '_ge_theta_plus'),
            _rows):
        PAPER[f'{_net}{_tag}_cifar10'] = dict(table='5', top1=_c10)
        PAPER[f'{_net}{_tag}_cifar100'] = dict(table='5', top1=_c100)


def baseline_of(name: str) -> str:
    """The table baseline a row's FLOP increment is measured against."""
    for prefix, base in (('resnet101', 'resnet101_8xb32_in1k'),
                         ('resnet152', 'resnet152_8xb32_in1k'),
                         ('shufflenet', 'shufflenet_v1_1x_16xb64_in1k')):
        if name.startswith(prefix):
            return base
    return 'resnet50_8xb32_in1k'


def targets(name: str) -> tuple:
    """(parameters in M, FLOP increment in G) a row must be within."""
    return (0.1, 0.001) if name.startswith('shufflenet') else (0.15, 0.01)
