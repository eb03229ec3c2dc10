"""Former home of the QAT-module ONNX conversion, now :mod:`quantsim.export.qat_onnx`; the
names importable from here before stay importable (``quantsim.convert_qat_model`` too)."""
from quantsim.export.qat_onnx import (  # noqa: F401
    DEPLOY_SUFFIX,
    FAKE_QUANT_SUFFIX,
    WEIGHT_DTYPES,
    ConvertedQATModel,
    _cpu_lacks_vnni,
    convert_qat_model,
    fold_constants,
)

__all__ = ["ConvertedQATModel", "DEPLOY_SUFFIX", "FAKE_QUANT_SUFFIX", "WEIGHT_DTYPES",
           "convert_qat_model", "fold_constants"]
