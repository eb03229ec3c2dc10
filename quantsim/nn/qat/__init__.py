"""Single-operator QAT modules, their config and the swap helper.

See ``docs/qat_modules.md``. Public names (re-exported by :mod:`quantsim.nn`):
:class:`Conv2dQAT`, :class:`ConvTranspose2dQAT`, :class:`Conv3dQAT`, :class:`LinearQAT`,
:func:`replace_with_qat`, :func:`quantization_disabled`, :class:`QATConfig`.
"""
import warnings
from typing import Any

from quantsim.nn.qat.config import QATConfig, QATInputConfig, QATWeightConfig
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
    "QATInputConfig",
    "QATModuleMixin",
    "QATWeightConfig",
    "QAT_MODULES",
    "qat_modules",
    "quantization_disabled",
    "register_qat",
    "replace_with_qat",
]

#: names before the QAT sections were told apart from quantsim.retrain's config -> now
_RENAMED = {"RetrainDataConfig": QATInputConfig, "RetrainWeightConfig": QATWeightConfig}


def __getattr__(name: str) -> Any:
    """The renamed config sections under their old names, with a DeprecationWarning."""
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(f"quantsim.nn.qat.{name} is now quantsim.nn.qat.{new.__name__}",
                      DeprecationWarning, stacklevel=2)
        return new
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
