"""quantsim: simulate integer quantization of PyTorch models and export the encodings.

The public names mirror ``aimet_torch`` 2.x::

    from quantsim import QuantizationSimModel, QuantScheme, QuantizationDataType
"""
from quantsim.encoding import Encoding
from quantsim.errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    EncodingsError,
    ExportError,
    QuantizationSettingError,
    QuantSimError,
    UnsupportedModelError,
)
from quantsim.quantizer import Quantizer
from quantsim.sim import QuantizationDataType, QuantizationSimModel, QuantScheme

__version__ = "0.1.0"

__all__ = [
    "CalibrationError", "CheckpointError", "ConfigError", "Encoding", "EncodingsError",
    "ExportError", "QuantizationDataType", "QuantizationSettingError", "QuantizationSimModel",
    "QuantScheme", "QuantSimError", "Quantizer", "UnsupportedModelError",
]
