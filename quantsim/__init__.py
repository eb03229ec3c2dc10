"""quantsim: simulate integer quantization of PyTorch models and export the encodings.

The public names mirror ``aimet_torch`` 2.x::

    from quantsim import QuantizationSimModel, QuantScheme, QuantizationDataType
"""
from quantsim.encoding import Encoding
from quantsim.errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    DummyInputError,
    EncodingsError,
    ExportError,
    QuantizationSettingError,
    QuantSimError,
    UnsupportedModelError,
)
from quantsim.graph import KeywordInputs
from quantsim.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from quantsim.export.qat_onnx import ConvertedQATModel, convert_qat_model
from quantsim.quantizer import Quantizer
from quantsim.retrain import (create_quant_retrain_config, create_quant_retrain_model,
                              restore_quant_retrain_model, save_quant_retrain_model)
from quantsim.sim import QuantizationDataType, QuantizationSimModel, QuantScheme
from quantsim.export.verify import verify
from quantsim.states import FakeQuantState, set_fake_quantize, set_high_precision_output

__version__ = "0.1.0"

__all__ = [
    "CalibrationError", "CheckpointError", "ConfigError", "ConvertedQATModel", "DummyInputError",
    "Encoding", "EncodingsError", "ExportError", "FakeQuantState", "KeywordInputs",
    "QuantizationDataType",
    "QuantizationSettingError", "QuantizationSimModel", "QuantScheme", "QuantSimError",
    "Quantizer", "UnsupportedModelError", "convert_qat_model", "create_quant_retrain_config",
    "create_quant_retrain_model", "load_checkpoint", "restore_quant_retrain_model",
    "save_quant_retrain_model",
    "load_optimizer_state", "save_checkpoint", "set_fake_quantize", "set_high_precision_output",
    "verify",
]
