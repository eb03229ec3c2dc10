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


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits as (x_train, y_train, x_test, y_test) (tests/models.py)."""
    from models import digits_data
    return digits_data()


@pytest.fixture(scope="session")
def trained_digits_cnn(digits):
    """tests/models.DigitsCNN trained 6 epochs on ``digits`` (eval mode). Tests must not change
    it: build a sim (a copy) or deepcopy it."""
    from models import DigitsCNN, train
    torch.manual_seed(0)
    return train(DigitsCNN(), digits[0], digits[1], epochs=6)


def assert_qdq_agrees(report, bitwidth: int = 8) -> None:
    """A :class:`quantsim.export.VerifyReport` within one quantization step: the outputs chained
    through the QDQ model, the outputs with every quantizer fed the sim's inputs, and each
    quantizer on its own; the default ORT session loads the model. ``bitwidth``: the widest
    grid in the model; two values k steps apart differ by k steps +- a float32 rounding of
    each (2^-23 of the range, 2^(bitwidth - 23) steps), visible on 16-bit grids."""
    tol = max(1.001, 1 + 2.0 ** (bitwidth - 22))
    assert report.output_scale is not None
    assert report.max_diff_lsb <= tol, str(report)
    assert report.isolated_max_diff_lsb <= tol, str(report)
    assert report.default_error is None
    assert report.quantizers and all(q.max_diff_lsb <= tol for q in report.quantizers), str(report)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run several times faster on one intra-op thread; use it per module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
