"""Single-operator QAT modules, their retrain config and the swap helper.

See ``docs/qat_modules.md``. Public names (re-exported by :mod:`quantsim.nn`):
:class:`Conv2dQAT`, :class:`ConvTranspose2dQAT`, :class:`Conv3dQAT`, :class:`LinearQAT`,
:func:`replace_with_qat`, :func:`quantization_disabled`, :class:`QATConfig`.
"""
from quantsim.nn.qat.config import QATConfig, RetrainDataConfig, RetrainWeightConfig
from quantsim.nn.qat.modules import (
    QAT_MODULES,
    Conv2dQAT,
    Conv3dQAT,
    ConvTranspose2dQAT,
    LinearQAT,
    QATModuleMixin,
    qat_modules,
    quantization_disabled,
    register_qat,
)
from quantsim.nn.qat.quantizers import ArqWeightQuantizer, LearnedClipQuantizer
from quantsim.nn.qat.replace import replace_with_qat

__all__ = [
    "ArqWeightQuantizer",
    "Conv2dQAT",
    "Conv3dQAT",
    "ConvTranspose2dQAT",
    "LearnedClipQuantizer",
    "LinearQAT",
    "QATConfig",
    "QATModuleMixin",
    "QAT_MODULES",
    "RetrainDataConfig",
    "RetrainWeightConfig",
    "qat_modules",
    "quantization_disabled",
    "register_qat",
    "replace_with_qat",
]
