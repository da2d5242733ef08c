"""The benchmark scripts run and print their tables (no timing asserted)."""
import importlib.util
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _table(args):
    out = subprocess.run([sys.executable] + args, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split('|')[1:-1] for line in out.stdout.splitlines()
            if line.startswith('| ')]
    return [[c.strip() for c in r] for r in rows[2:]]


def _ratio(cell):
    return float(cell.rstrip('x'))


def test_benchmark_prints_every_row():
    rows = _table([
        'tools/benchmark/ge_benchmark.py', '--batch', '2', '--size', '64',
        '--repeats', '1', '--variants', 'theta'
    ])
    names = [r[0] for r in rows]
    expect = ['plain', 'plain, control', 'SE', 'theta formula',
              'theta mmge', 'theta mmge, memory-saving']
    assert [n for n in names if n != 'theta timm'] == expect
    by_name = dict(zip(names, rows))
    assert by_name['plain'][2] == '1.000x' and by_name['plain'][4] == '1.000x'
    assert by_name['plain'][6] == '1.000x'
    # the control is the plain network again: its memory is plain's
    assert by_name['plain, control'][6] == '1.000x'
    # on the native CPU path both modes keep the block norm's input, which
    # plain keeps too: nothing of GE's own but its (small) weights
    mmge, saving = by_name['theta mmge'], by_name['theta mmge, memory-saving']
    assert 1.0 < _ratio(mmge[6]) <= 1.03
    assert _ratio(mmge[6]) < _ratio(by_name['theta formula'][6])
    assert _ratio(saving[6]) == _ratio(mmge[6])


def _ge_benchmark():
    spec = importlib.util.spec_from_file_location(
        'ge_benchmark', osp.join(ROOT, 'tools/benchmark/ge_benchmark.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_every_model_between_two_plain_runs():
    module = _ge_benchmark()
    order = module.schedule(['a', 'b', 'c'], 2)
    assert order == ['plain', 'a', 'plain', 'b', 'plain', 'c', 'plain',
                     'b', 'plain', 'c', 'plain', 'a', 'plain']
    assert module.schedule([], 3) == ['plain']


def test_benchmark_ratio_is_over_the_neighbouring_plain_runs():
    """A run's ratio is its time over the mean of the plain runs on each
    side: a machine that slows down during the run slows both."""
    module = _ge_benchmark()
    # the machine got twice as slow from the fourth run on: 'a' ran at
    # plain's speed each time; 'b' at 1.1x plain, across the change
    runs = [('plain', 1.0), ('a', 1.0), ('plain', 1.0), ('b', 1.65),
            ('plain', 2.0), ('a', 2.0), ('plain', 2.0)]
    ratios = module.bracketed_ratios(runs)
    assert ratios['a'] == [1.0, 1.0]
    assert ratios['b'] == [pytest.approx(1.1)]
    with pytest.raises(ValueError,
                       match=r"run 1 \('a'\) has 'plain' before it and 'b'"):
        module.bracketed_ratios([('plain', 1.0), ('a', 1.0), ('b', 1.0),
                                 ('plain', 1.0)])
    with pytest.raises(ValueError, match=r"run 1 \('a'\).*None after"):
        module.bracketed_ratios([('plain', 1.0), ('a', 1.0)])


def test_benchmark_rows_option():
    module = _ge_benchmark()
    assert module.parse_args([]).rows == list(module.ROWS)
    assert module.parse_args(['--rows', 'mmge', 'control']).rows == \
        ['mmge', 'control']
    with pytest.raises(SystemExit):
        module.parse_args(['--rows', 'gc'])
    out = subprocess.run([
        sys.executable, 'tools/benchmark/ge_benchmark.py', '--batch', '2',
        '--size', '32', '--repeats', '1', '--variants', 'theta_minus',
        '--rows', 'mmge', '--channels-last'
    ], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert '32x32, channels-last, extent 8' in out.stdout.splitlines()[0]
    rows = [line.split('|')[1].strip() for line in out.stdout.splitlines()
            if line.startswith('| ')]
    assert rows[2:] == ['plain', 'theta_minus mmge']


def test_benchmark_device_amp_and_compile_options():
    """--amp bf16 runs the forwards under bfloat16 autocast (the header
    says so, and the saved tensors are then bfloat16: fewer bytes than the
    float32 run's); --device cuda without a GPU stops with a message that
    says so; --compile takes torch.compile's modes only."""
    module = _ge_benchmark()
    args = module.parse_args([])
    assert (args.device, args.amp, args.compile) == ('cpu', 'none', 'none')
    for bad in (['--amp', 'fp16'], ['--device', 'tpu'],
                ['--compile', 'fast']):
        with pytest.raises(SystemExit):
            module.parse_args(bad)
    assert module.parse_args(['--compile', 'reduce-overhead']).compile == \
        'reduce-overhead'
    common = ['tools/benchmark/ge_benchmark.py', '--batch', '2', '--size',
              '32', '--repeats', '1', '--variants', 'theta', '--rows',
              'mmge', 'memory-saving']
    tables = {}
    for amp in ('none', 'bf16'):
        out = subprocess.run([sys.executable] + common + ['--amp', amp],
                             cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        header = out.stdout.splitlines()[0]
        assert ('bf16 autocast' in header) == (amp == 'bf16')
        rows = [[c.strip() for c in line.split('|')[1:-1]]
                for line in out.stdout.splitlines() if line.startswith('| ')]
        tables[amp] = {r[0]: r for r in rows[2:]}
        assert list(tables[amp]) == ['plain', 'theta mmge',
                                     'theta mmge, memory-saving']
    assert float(tables['bf16']['plain'][5]) < \
        float(tables['none']['plain'][5])
    import torch
    if not torch.cuda.is_available():
        out = subprocess.run([sys.executable] + common + ['--device', 'cuda'],
                             cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode != 0
        assert '--device cuda: torch sees no CUDA device' in out.stderr


def test_benchmark_allocator_option(monkeypatch):
    """--allocator takes steady or default; steady sets glibc's mallopt
    (the header says so), and says so where it cannot."""
    module = _ge_benchmark()
    assert module.parse_args([]).allocator == 'steady'
    assert module.parse_args(['--allocator', 'default']).allocator == \
        'default'
    with pytest.raises(SystemExit):
        module.parse_args(['--allocator', 'jemalloc'])
    calls, answer = [], [1]

    def mallopt(param, value):
        calls.append((param, value))
        return answer[0]

    libc = type('Libc', (), {})()
    libc.mallopt = mallopt
    monkeypatch.setattr(module.ctypes, 'CDLL', lambda name: libc)
    assert module.steady_allocator().startswith('glibc malloc steady')
    assert calls == list(module.STEADY)
    answer[0] = 0
    assert 'refused' in module.steady_allocator()


def test_detection_benchmark_prints_every_row():
    rows = _table([
        'tools/benchmark/detection_benchmark.py', '--size', '96', '128',
        '--repeats', '1', '--boxes', '2', '--rois', '8', '--memory-saving'
    ])
    names = [r[0] for r in rows]
    assert names == ['faster_rcnn_r50_c4', 'faster_rcnn_ge_theta_e8',
                     'faster_rcnn_ge_theta_e8, memory-saving']
    assert rows[0][2] == '1.00x' and rows[0][4] == '1.000x'
    # GE's weights; on the native CPU path both modes keep only the block
    # norm's input, as the baseline does
    assert 1.0 < _ratio(rows[1][4]) <= 1.03
    assert _ratio(rows[2][4]) == _ratio(rows[1][4])


def test_detection_benchmark_gives_every_model_the_same_rois(monkeypatch):
    """RoIAlign's cost grows with the RoIs' sizes: the baseline and the GE
    detector, whose random weights differ, pool the same RoIs."""
    import torch
    from mmcv import ops
    spec = importlib.util.spec_from_file_location(
        'detection_benchmark',
        osp.join(ROOT, 'tools/benchmark/detection_benchmark.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(['--size', '96', '128', '--boxes', '2',
                              '--rois', '8'])
    models = module.build_models(args)
    batch = module.make_batch(args)
    seen = []
    forward = ops.RoIAlign.forward

    def recorded(self, features, rois):
        seen.append(rois.clone())
        return forward(self, features, rois)

    monkeypatch.setattr(ops.RoIAlign, 'forward', recorded)
    with torch.no_grad():
        for model in models.values():
            module.losses(model, batch)
    assert len(seen) == 2 and seen[0].shape == (8, 5)
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)


def test_kernel_benchmark_prints_every_map():
    rows = _table([
        'tools/benchmark/kernel_benchmark.py', '--batch', '2', '--repeats',
        '1', '--maps', '16x20', '24x9'
    ])
    assert [r[0] for r in rows] == ['16 x 20x20', '24 x 9x9']
    assert all(len(r) == 5 and all(float(c) > 0 for c in r[1:])
               for r in rows)


@pytest.mark.parametrize('script,value,form', (
    ('kernel_benchmark.py', '16x', 'CHANNELSxSIZE'),
    ('block_benchmark.py', '16x20', 'CHANNELSxSIZE:BLOCKS')))
def test_benchmarks_refuse_a_bad_map(script, value, form):
    out = subprocess.run(
        [sys.executable, f'tools/benchmark/{script}', '--maps', value],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    assert form in out.stderr and repr(value) in out.stderr


def test_block_benchmark_prints_every_map_and_variant():
    out = subprocess.run([
        sys.executable, 'tools/benchmark/block_benchmark.py', '--batch', '2',
        '--repeats', '1', '--size', '64', '--maps', '16x20:2', '24x9:1',
        '--variants', 'theta', 'theta_minus'
    ], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [[c.strip() for c in line.split('|')[1:-1]]
            for line in out.stdout.splitlines()
            if line.startswith('| ') and not line.startswith('| ---')]
    maps, totals = rows[1:3], rows[4:]
    assert [r[:2] for r in maps] == [['16 x 20x20', '2'], ['24 x 9x9', '1']]
    assert all(len(r) == 5 for r in maps)
    assert [r[0] for r in totals] == ['theta', 'theta_minus']
    assert all(_ratio(r[2]) > 0 for r in totals)


def test_op_count_prints_every_row():
    """op_count.py counts one training step's operations per row; on the
    GPU's path (bf16 autocast) GE-theta's default mode keeps the gather's
    maps and makes fewer operations than the memory-saving mode, which
    makes the gather's convolutions again."""
    rows = _table([
        'tools/benchmark/op_count.py', '--batch', '2', '--size', '64',
        '--variants', 'theta', 'theta_minus', '--rows', 'formula', 'mmge',
        'memory-saving'
    ])
    by_name = {r[0]: r for r in rows}
    assert list(by_name) == [
        'plain', 'theta formula', 'theta mmge', 'theta mmge, memory-saving',
        'theta_minus formula', 'theta_minus mmge',
        'theta_minus mmge, memory-saving'
    ]
    assert by_name['plain'][2] == '1.000x' and by_name['plain'][4] == '1.000x'
    for name, (_, total, ratio, kernels, kernel_ratio) in by_name.items():
        assert 0 < int(kernels) < int(total)
        assert name == 'plain' or _ratio(ratio) > 1 and _ratio(
            kernel_ratio) > 1
    # GE-theta-minus's gather, a pool, is one op in both modes
    assert int(by_name['theta mmge'][3]) < \
        int(by_name['theta mmge, memory-saving'][3])
    assert int(by_name['theta_minus mmge'][3]) <= \
        int(by_name['theta_minus mmge, memory-saving'][3])


def test_op_count_refuses_a_batch_of_one():
    out = subprocess.run(
        [sys.executable, 'tools/benchmark/op_count.py', '--batch', '1'],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    assert '--batch must be at least 2' in out.stderr


def _gpu_check(*args):
    return subprocess.run(['bash', 'tools/benchmark/gpu_check.sh', *args],
                          cwd=ROOT, capture_output=True, text=True)


def test_gpu_check_refuses_unknown_arguments_and_a_missing_gpu(tmp_path):
    done = _gpu_check('--bogus')
    assert done.returncode == 2
    assert "unknown argument '--bogus'" in done.stderr
    assert '--report FILE, --dry-run' in done.stderr
    assert '--dry-run' in _gpu_check('--help').stdout
    import torch
    if not torch.cuda.is_available():
        report = tmp_path / 'report.md'
        done = _gpu_check('--report', str(report))
        assert done.returncode == 1
        assert 'torch sees no CUDA device' in done.stderr
        assert not report.exists()
