"""mmge: Gather-Excite for MMDetection and MMPretrain.

Install the OpenMMLab stack first as docs/get_started.md says (mmcv must be
built with its ops, against the installed torch); ``tools/setup_env.sh`` does
all of it on a CPU machine.
"""
import os.path as osp

from setuptools import Extension, find_packages, setup
from setuptools.command.build_py import build_py

# Installed next to the package: Python runs its one line at start-up, so that
# `_base_ = 'mmge::configs/...'` parses in tools that never import mmge
# themselves (mmdet's and mmpretrain's own tools/train.py); see
# _mmge_config_prefix.py.
PREFIX_PTH = 'mmge-config-prefix.pth'


class BuildPyWithPth(build_py):
    """``build_py`` that also puts :data:`PREFIX_PTH` into site-packages."""

    def run(self) -> None:
        super().run()
        self.copy_file(
            osp.join(osp.dirname(osp.abspath(__file__)), PREFIX_PTH),
            osp.join(self.build_lib, PREFIX_PTH))


def read_version() -> str:
    ns = {}
    with open(osp.join(osp.dirname(__file__), 'mmge', 'version.py')) as f:
        exec(f.read(), ns)
    return ns['__version__']


# Lower bounds: the oldest releases the test suite was run with (how: see
# docs/get_started.md, "Versions"). Upper bounds keep out releases that break
# the stack: mmdet 3.x asserts mmcv < 2.2.0, and mmcv 2.1 / mmdet 3.3 /
# mmpretrain 1.2 predate numpy 2.
install_requires = [
    'torch>=2.13',
    'torchvision>=0.28',
    'numpy>=1.26,<2',
    'mmengine>=0.10.0,<1.0',
    'mmcv>=2.1.0,<2.2.0',
    'mmdet>=3.2.0,<3.4.0',
    'mmpretrain>=1.1.0,<2.0',
    'pycocotools>=2.0.11',
]

# GE's CPU kernels: plain C called through ctypes (mmge/models/layers/
# cpu_kernels.py), so they need no torch headers and build in a second.
# OpenMP: loaded after torch, the library binds to torch's libgomp.so.1 and
# shares its threads. Optional: without a C compiler with OpenMP mmge still
# installs and GE takes its ATen path (tests/test_cpu_kernels.py fails then).
ge_cpu = Extension(
    'mmge._ge_cpu',
    sources=['mmge/csrc/ge_cpu.c', 'mmge/csrc/ge_conv_gather.c',
             'mmge/csrc/ge_mlp.c'],
    depends=['mmge/csrc/ge_parallel.h', 'mmge/csrc/ge_simd.h',
             'mmge/csrc/ge_excite.h'],
    extra_compile_args=['-O3', '-fopenmp', '-Wno-psabi'],
    extra_link_args=['-fopenmp'],
    optional=True)

setup(
    name='mmge',
    version=read_version(),
    description='Gather-Excite (Hu et al., NeurIPS 2018) for MMDetection '
    'and MMPretrain',
    long_description=open('README.md', encoding='utf-8').read()
    if osp.exists('README.md') else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=find_packages(include=['mmge', 'mmge.*']),
    py_modules=['_mmge_config_prefix'],
    cmdclass={'build_py': BuildPyWithPth},
    # the configs, for _base_ = 'mmge::configs/<file>.py' (mmge/.mim/configs/
    # configs links to configs/; a built wheel holds a copy)
    package_data={
        'mmge': ['.mim/model-index.yml'] + [
            f'.mim/configs/configs/{d}{f}'
            for d in ('', '*/', '*/*/', '*/*/*/')
            for f in ('*.py', 'metafile.yml')
        ]
    },
    python_requires='>=3.11',
    ext_modules=[ge_cpu],
    install_requires=install_requires,
    extras_require={
        # onnx, onnxruntime and onnxscript: the ONNX export test
        'tests': ['pytest>=7', 'onnx', 'onnxruntime', 'onnxscript']
    },
    zip_safe=False,
)
