"""Launcher scripts and the CPU distributed set-up."""
import os
import os.path as osp
import subprocess
import sys
import textwrap

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _fake(tmp_path, name):
    """A fake ``name`` on PATH that prints its arguments."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    exe.write_text('#!/bin/bash\necho "$@"\n')
    exe.chmod(0o755)
    return dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}')


def test_slurm_scripts_pass_arguments(tmp_path):
    env = _fake(tmp_path, 'srun')
    env['GPUS'] = '16'
    out = subprocess.run(
        ['bash', 'tools/slurm_train.sh', 'part', 'job', 'cfg.py', 'wd',
         '--amp'], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0
    assert '-p part --job-name=job --gres=gpu:8 --ntasks=16' in out.stdout
    assert out.stdout.strip().endswith(
        'tools/train.py cfg.py --work-dir=wd --amp --launcher=slurm')
    out = subprocess.run(
        ['bash', 'tools/slurm_test.sh', 'part', 'job', 'cfg.py', 'ck.pth',
         '--json-prefix', 'r'], cwd=ROOT, env=env, capture_output=True,
        text=True)
    assert out.stdout.strip().endswith(
        'tools/test.py cfg.py ck.pth --json-prefix r --launcher=slurm')


def test_dist_scripts_pass_arguments(tmp_path):
    env = _fake(tmp_path, 'fakepython')
    env.update(PYTHON='fakepython', NNODES='2', NODE_RANK='1',
               MASTER_ADDR='10.0.0.1', PORT='29999')
    out = subprocess.run(['bash', 'tools/dist_test.sh', 'cfg.py', 'ck.pth',
                          '4', '--json-prefix', 'r'], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0
    assert ('-m torch.distributed.run --nnodes=2 --node_rank=1 '
            '--master_addr=10.0.0.1 --nproc_per_node=4 --master_port=29999'
            ) in out.stdout
    assert out.stdout.strip().endswith(
        'tools/test.py cfg.py ck.pth --json-prefix r --launcher pytorch')


def test_slurm_launcher_on_cpu_starts_gloo():
    code = textwrap.dedent("""
        import torch.distributed as dist
        from mmengine.config import Config
        from mmge.engine import setup_runtime
        cfg = setup_runtime(Config(dict()), 'slurm')
        print(dist.get_backend(), dist.get_world_size(), dist.get_rank(),
              cfg.model_wrapper_cfg.device_ids, cfg.env_cfg.dist_cfg.backend)
        dist.destroy_process_group()
        """)
    env = dict(os.environ, SLURM_PROCID='0', SLURM_NTASKS='1',
               SLURM_NODELIST='localhost', MASTER_ADDR='127.0.0.1',
               MASTER_PORT='29533', PYTHONWARNINGS='ignore')
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        env.pop(k, None)
    out = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ['gloo', '1', '0', 'None', 'gloo']


def test_pytorch_launcher_without_torchrun_env_says_so():
    code = ('from mmengine.config import Config\n'
            'from mmge.engine import setup_runtime\n'
            "setup_runtime(Config(dict()), 'pytorch')\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}
    out = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert 'are not set; start through tools/dist_train.sh' in out.stderr
