"""quantsim.defs: aimet_common.defs' names and the callback forms the analysis accepts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from quantsim import defs
from quantsim.errors import CallbackError, QuantSimError
from quantsim.sim import QuantizationDataType, QuantScheme


def test_aimet_names():
    assert defs.QuantScheme is QuantScheme and defs.QuantizationDataType is QuantizationDataType
    assert defs.QuantScheme.post_training_tf_enhanced.value == 2   # aimet_common.defs' values
    assert {"CallbackFunc", "QuantScheme", "QuantizationDataType"} <= set(defs.__all__)


def test_callback_func_passes_its_args():
    seen = []
    cb = defs.CallbackFunc(lambda model, args: seen.append((model, args)) or 0.5, {"n": 3})
    model = nn.Linear(2, 2)
    assert cb(model) == 0.5 and seen == [(model, {"n": 3})]
    assert cb.func is not None and cb.args == {"n": 3}
    assert repr(cb).startswith("CallbackFunc(") and "{'n': 3}" in repr(cb)


def test_as_callback_forms():
    model = nn.Linear(2, 2)
    cb = defs.CallbackFunc(lambda m, a: a, 7)
    assert defs.as_callback(cb, "eval_callback") is cb

    one = defs.as_callback(lambda m: type(m).__name__, "eval_callback")
    assert isinstance(one, defs.CallbackFunc) and one(model) == "Linear"

    received = []
    two = defs.as_callback(lambda m, args: received.append(args) or 1.0, "eval_callback")
    assert two(model) == 1.0 and received == [None]      # aimet-torch passes None args

    class Metric:
        def __call__(self, m, args=None):      # defaulted second argument: called with one
            return args is None
    assert defs.as_callback(Metric(), "eval_callback")(model) is True

    assert defs.as_callback(len, "eval_callback")(nn.Sequential(nn.ReLU())) == 1  # a builtin

    @torch.no_grad()
    def decorated(m):
        return torch.is_grad_enabled()
    assert defs.as_callback(decorated, "eval_callback")(model) is False


@pytest.mark.parametrize("bad", [None, 3, "evaluate", [lambda m: 0]])
def test_refuses_what_is_not_callable(bad):
    with pytest.raises(CallbackError, match=r"eval_callback must be a CallbackFunc.*got"):
        defs.as_callback(bad, "eval_callback")
    with pytest.raises(CallbackError, match="CallbackFunc: func must be callable"):
        defs.CallbackFunc(bad)
    # still a TypeError for code written against the builtin, and a QuantSimError
    with pytest.raises(TypeError):
        defs.as_callback(bad, "eval_callback")
    assert issubclass(CallbackError, QuantSimError)
