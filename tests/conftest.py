"""Shared test set-up.

The suite runs the eager fake-quant kernel by default so that it does not pay torch.compile's
start-up per process; ``tests/test_kernels.py`` checks that the compiled kernel gives
bit-identical results, and ``benchmarks/`` measure the compiled default.
"""
import os

import pytest
import torch

os.environ.setdefault("QUANTSIM_KERNEL", "eager")
torch.set_num_threads(min(2, torch.get_num_threads()))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
