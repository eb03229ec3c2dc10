"""quantsim: simulate integer quantization of PyTorch models and export the encodings.

The public names mirror ``aimet_torch`` 2.x::

    from quantsim import QuantizationSimModel, QuantScheme, QuantizationDataType

Importing quantsim loads torch and the simulation only: the names that need ONNX, onnxscript or
ONNX Runtime (``verify``, ``convert_qat_model``, the retrain workflow) are imported on first use
(PEP 562 ``__getattr__`` below), so a script that only simulates never pays for them.
"""
import importlib
from typing import Any

from quantsim.encoding import Encoding
from quantsim.errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    ConversionError,
    DummyInputError,
    EncodingsError,
    ExportError,
    QuantizationSettingError,
    QuantSimError,
    UnsupportedModelError,
)
from quantsim.graph import KeywordInputs
from quantsim.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
# the function shadows the subpackage's name here; import its parts as quantsim.convert.<x>
from quantsim.convert import ConversionReport, IntegerModel, check_deployable, convert
from quantsim.quantizer import Quantizer
from quantsim.sim import QuantizationDataType, QuantizationSimModel, QuantScheme
from quantsim.states import FakeQuantState, set_fake_quantize, set_high_precision_output

__version__ = "0.1.0"

#: Public names imported on first access: name -> module that defines it (they pull in ONNX).
_LAZY = {
    "ConvertedQATModel": "quantsim.export.qat_onnx",
    "convert_qat_model": "quantsim.export.qat_onnx",
    "create_quant_retrain_config": "quantsim.retrain",
    "create_quant_retrain_model": "quantsim.retrain",
    "restore_quant_retrain_model": "quantsim.retrain",
    "save_quant_retrain_model": "quantsim.retrain",
    "verify": "quantsim.export.verify",
}


def __getattr__(name: str) -> Any:
    """Import a name of :data:`_LAZY` on first access (and keep it for the next)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'quantsim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    """The module's names, the lazy ones included (for completion in notebooks)."""
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CalibrationError", "CheckpointError", "ConfigError", "ConversionError",
    "ConversionReport", "ConvertedQATModel", "DummyInputError",
    "Encoding", "EncodingsError", "ExportError", "FakeQuantState", "KeywordInputs",
    "QuantizationDataType",
    "QuantizationSettingError", "QuantizationSimModel", "QuantScheme", "QuantSimError",
    "Quantizer", "UnsupportedModelError", "IntegerModel", "check_deployable", "convert",
    "convert_qat_model", "create_quant_retrain_config",
    "create_quant_retrain_model", "load_checkpoint", "restore_quant_retrain_model",
    "save_quant_retrain_model",
    "load_optimizer_state", "save_checkpoint", "set_fake_quantize", "set_high_precision_output",
    "verify",
]
