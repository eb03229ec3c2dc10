"""Calibration / QAT / validation states, as users of Horizon's plugin know them.

::

    set_fake_quantize(sim, FakeQuantState.CALIBRATION)   # model.eval(): observe only
    for x in calibration_data: sim.model(x)
    set_fake_quantize(sim, FakeQuantState.QAT)           # model.train(): observe + fake-quant
    ... train ...
    set_fake_quantize(sim, FakeQuantState.VALIDATION)    # model.eval(): fake-quant only

=============  ==========  ============================================================
state          mode        quantizers
=============  ==========  ============================================================
CALIBRATION    eval()      observe with the scheme's analyzer; values pass unchanged
                           (a weight is observed once, again only if it changes)
QAT            train()     activations: moving average of min/max (``averaging_constant``,
                           default 0.01) and fake-quant; weights: the current weight's range
                           every step; learnable ranges (range-learning schemes) just train
VALIDATION     eval()      fake-quant with the frozen encodings
=============  ==========  ============================================================

Leaving CALIBRATION computes the encodings from what was observed. Each state checks the module
mode on every forward: a model evaluated in QAT state, or calibrated in train mode, raises
:class:`~quantsim.errors.FakeQuantStateError` instead of silently producing scales stuck at
their initial value.
"""
from __future__ import annotations

import enum
from typing import Iterable, List, Union

import torch
from torch import nn

from quantsim.errors import FakeQuantStateError, UnsupportedModelError
from quantsim.quantizer import Quantizer


class FakeQuantState(enum.Enum):
    """The three phases of quantization-aware fine-tuning."""

    CALIBRATION = "calibration"
    QAT = "qat"
    VALIDATION = "validation"


_REQUIRED_MODE = {FakeQuantState.CALIBRATION: "eval", FakeQuantState.QAT: "train",
                  FakeQuantState.VALIDATION: "eval"}


def _model_of(model_or_sim) -> nn.Module:
    return getattr(model_or_sim, "model", model_or_sim)


def _quantizers(model: nn.Module) -> List[Quantizer]:
    found = [m for m in model.modules() if isinstance(m, Quantizer)]
    if not found:
        raise UnsupportedModelError(
            "set_fake_quantize: the model has no quantizers; pass a QuantizationSimModel or its "
            ".model")
    return found


def set_fake_quantize(model_or_sim: Union[nn.Module, object], state: FakeQuantState) -> None:
    """Switch every quantizer of a sim (or ``sim.model``) to ``state``.

    Args:
        model_or_sim: a ``QuantizationSimModel`` or its ``.model``.
        state: :class:`FakeQuantState` member.

    Raises:
        FakeQuantStateError: the model is not in the mode the state needs (eval for
            CALIBRATION and VALIDATION, train for QAT); later forwards check it again.
    """
    state = FakeQuantState(state)
    model = _model_of(model_or_sim)
    mode = "train" if model.training else "eval"
    if mode != _REQUIRED_MODE[state]:
        raise FakeQuantStateError(
            f"set_fake_quantize({state.name}) needs model.{_REQUIRED_MODE[state]}() first; the "
            f"model is in {mode}() mode")
    quantizers = [q for q in _quantizers(model) if q.enabled]
    if state is FakeQuantState.CALIBRATION:
        for q in quantizers:
            q.reset_statistics()
            q.state = "observe"
    else:
        finish_calibration(quantizers)
        for q in quantizers:
            is_param = ".param_quantizers." in q.name
            if state is FakeQuantState.QAT and not q.learnable:
                q.state = "qat"
                if is_param:
                    q.averaging_constant = 1.0  # weights: follow the current weights
            else:
                q.state = "quantize"
    for q in quantizers:
        q.required_mode = _REQUIRED_MODE[state]
        q.fake_quant_state = state.name


def all_reduce_statistics(quantizers: Iterable[Quantizer]) -> None:
    """With an initialized process group, make every rank's statistics the merged ones, so
    every rank computes identical encodings (no-op otherwise)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for q in quantizers:
        q.analyzer.all_reduce_()


def finish_calibration(quantizers: Iterable[Quantizer]) -> None:
    """Compute encodings for quantizers that observed data (merging ranks when distributed)."""
    observing = [q for q in quantizers if q.state == "observe"]
    all_reduce_statistics(observing)
    for q in observing:
        if q.analyzer.has_stats:
            q.compute_encoding()


def set_high_precision_output(model_or_sim, *module_names: str) -> None:
    """Keep the outputs of the named modules in float (32-bit) precision.

    Typically the classifier head, whose logits a runtime can leave unquantized.

    Raises:
        UnsupportedModelError: a name is not a quantized module of the model.
    """
    model = _model_of(model_or_sim)
    modules = dict(model.named_modules())
    for name in module_names:
        module = modules.get(name)
        if module is None or not hasattr(module, "output_quantizers"):
            known = [n for n, m in modules.items() if hasattr(m, "output_quantizers")]
            raise UnsupportedModelError(
                f"set_high_precision_output: {name!r} is not a quantized module; known: {known}")
        for q in module.output_quantizers:
            q.enabled = False
