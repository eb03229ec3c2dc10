"""Shared test set-up.

The suite runs the eager fake-quant kernel by default so that it does not pay torch.compile's
start-up per process; ``tests/test_kernels.py`` checks that the compiled kernel gives
bit-identical results, and ``benchmarks/`` measure the compiled default.
"""
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("QUANTSIM_KERNEL", "eager")
torch.set_num_threads(min(2, torch.get_num_threads()))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

#: devices to parametrize a test over (``@pytest.mark.parametrize("device", DEVICES)``): the CPU
#: always, CUDA where there is one
DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.gpu])]

#: the repository root, and AIMET's example config / encodings files (tests/data/aimet/README.md)
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "tests" / "data" / "aimet"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run several times faster on one intra-op thread; use it per module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
