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
CALIBRATION    eval()      weights: encodings computed from them on entry, then
                           fake-quantized; activations: observe with the scheme's analyzer
                           and pass the float values on unchanged (quantsim.calibration)
QAT            train()     activations: moving average of min/max (``averaging_constant``,
                           default 0.01) and fake-quant; weights: the current weight's range
                           every step; learnable ranges (range-learning schemes) just train
VALIDATION     eval()      fake-quant with the frozen encodings
=============  ==========  ============================================================

Leaving CALIBRATION computes the encodings from what was observed, exactly as
``compute_encodings`` does. Each state checks the module
mode on every forward: a model evaluated in QAT state, or calibrated in train mode, raises
:class:`~quantsim.errors.FakeQuantStateError` instead of silently producing scales stuck at
their initial value.
"""
from __future__ import annotations

import enum
from typing import Iterable, List, Union

from torch import nn

from quantsim.calibration import Calibration, calibrates
from quantsim.checks import require_module
from quantsim.errors import FakeQuantStateError, QuantizationSettingError, UnsupportedModelError
from quantsim.quantizer import Quantizer, QuantizerRole, QuantizerState


class FakeQuantState(enum.Enum):
    """The three phases of quantization-aware fine-tuning."""

    CALIBRATION = "calibration"
    QAT = "qat"
    VALIDATION = "validation"

    @classmethod
    def parse(cls, value: Union["FakeQuantState", str], where: str) -> "FakeQuantState":
        """A member, its value (``'qat'``) or its name (``'QAT'``).

        Raises:
            QuantizationSettingError: anything else, naming ``where`` and the members.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            for member in cls:
                if value.lower() == member.value:
                    return member
        raise QuantizationSettingError(
            f"{where}: state {value!r} is not a FakeQuantState; allowed: "
            f"{', '.join(f'FakeQuantState.{m.name}' for m in cls)} (or their names as strings)")


_REQUIRED_MODE = {FakeQuantState.CALIBRATION: "eval", FakeQuantState.QAT: "train",
                  FakeQuantState.VALIDATION: "eval"}


def _model_of(model_or_sim, where: str) -> nn.Module:
    return require_module(getattr(model_or_sim, "model", model_or_sim), where)


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
        state: :class:`FakeQuantState` member (or its name, ``'QAT'``).

    Raises:
        FakeQuantStateError: the model is not in the mode the state needs (eval for
            CALIBRATION and VALIDATION, train for QAT); later forwards check it again.
        QuantizationSettingError: ``state`` is not a FakeQuantState.
        UnsupportedModelError: ``model_or_sim`` is neither a sim nor an ``nn.Module``, or
            has no quantizers.
    """
    state = FakeQuantState.parse(state, "set_fake_quantize")
    model = _model_of(model_or_sim, "set_fake_quantize")
    mode = "train" if model.training else "eval"
    if mode != _REQUIRED_MODE[state]:
        raise FakeQuantStateError(
            f"set_fake_quantize({state.name}) needs model.{_REQUIRED_MODE[state]}() first; the "
            f"model is in {mode}() mode")
    quantizers = [q for q in _quantizers(model) if q.enabled]
    graph = getattr(model_or_sim, "graph", None)
    if state is FakeQuantState.CALIBRATION:
        Calibration(model, graph).begin()
    else:
        Calibration(model, graph).finish()  # computes what a CALIBRATION phase observed
        apply_phase(quantizers, state)
    for q in quantizers:
        q.required_mode = _REQUIRED_MODE[state]
        q.fake_quant_state = state.name


def apply_phase(quantizers: Iterable[Quantizer], phase: FakeQuantState) -> None:
    """Set each quantizer's own state for ``phase`` (QAT or VALIDATION; CALIBRATION is
    :class:`~quantsim.calibration.Calibration`'s): in QAT the integer quantizers that calibrate
    (enabled, not frozen, range not fixed by the config) and do not learn their range follow the
    data with a moving average, weights following the current weight (averaging constant 1);
    every other quantizer quantizes with its encoding."""
    phase = FakeQuantState.parse(phase, "apply_phase")
    for q in quantizers:
        if (phase is FakeQuantState.QAT and calibrates(q) and q.data_type == "int"
                and not q.learnable):
            q.state = QuantizerState.QAT
            if q.role is QuantizerRole.PARAM:
                q.averaging_constant = 1.0
        else:
            q.state = QuantizerState.QUANTIZE


def set_high_precision_output(model_or_sim, *module_names: str) -> None:
    """Keep the outputs of the named modules in float (32-bit) precision.

    Typically the classifier head, whose logits a runtime can leave unquantized. A module
    reachable under several paths may be named by any of them.

    Raises:
        UnsupportedModelError: a name is not a quantized module of the model.
    """
    model = _model_of(model_or_sim, "set_high_precision_output")
    modules = dict(model.named_modules(remove_duplicate=False))
    for name in module_names:
        module = modules.get(name)
        if module is None or not hasattr(module, "output_quantizers"):
            known = [n for n, m in model.named_modules() if hasattr(m, "output_quantizers")]
            raise UnsupportedModelError(
                f"set_high_precision_output: {name!r} is not a quantized module; known: {known}")
        for q in module.output_quantizers:
            q.enabled = False
