"""The benchmark script runs and prints its table (no timing asserted)."""
import os.path as osp
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def test_benchmark_prints_every_row():
    out = subprocess.run([
        sys.executable, 'tools/benchmark/ge_benchmark.py', '--batch', '2',
        '--size', '64', '--repeats', '1', '--variants', 'theta'
    ], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith('| ')]
    names = [r.split('|')[1].strip() for r in rows[2:]]
    assert names == ['plain', 'SE', 'theta formula', 'theta mmge']
    plain = rows[2].split('|')
    assert plain[3].strip() == '1.00x' and plain[7].strip() == '1.00x'
    # GE saves more for backward than the plain network
    ge_ratio = float(rows[5].split('|')[7].strip().rstrip('x'))
    assert ge_ratio > 1.0
