import os
import sys

import pytest
import torch

# tests/ holds reference.py, the independent NumPy reference.
sys.path.insert(0, os.path.dirname(__file__))

import mmge  # noqa: E402,F401  (registers the layers and backbones)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
