"""quantsim: simulate integer quantization of PyTorch models and export the encodings."""
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

__version__ = "0.1.0"
