"""Typed errors raised by quantsim.

Every error names what is at fault (a module path, a JSON path, a file) and what is allowed, so
a user can fix the input without reading our source.
"""
from __future__ import annotations


class QuantSimError(Exception):
    """Base class of every error quantsim raises on purpose."""


class QuantizationSettingError(QuantSimError, ValueError):
    """A quantizer setting (bitwidth, rounding mode, data type, scheme, ...) is not allowed."""


class CalibrationError(QuantSimError):
    """Calibration failed: no statistics, non-finite data that was refused, a failing callback."""


class ConfigError(QuantSimError):
    """A hardware config file is missing, not JSON, or violates the schema."""


class EncodingsError(QuantSimError):
    """An encodings file or dict is malformed or does not match the model."""


class ExportError(QuantSimError):
    """Export could not write a consistent set of files."""


class UnsupportedModelError(QuantSimError):
    """The model (or one of its modules) cannot be simulated as given."""


class DummyInputError(UnsupportedModelError, ValueError):
    """A dict ``dummy_input`` that the model's ``forward`` signature reads two ways, or none."""


class CheckpointError(QuantSimError):
    """A checkpoint file is truncated, foreign, or belongs to another architecture."""


class FakeQuantStateError(QuantSimError, RuntimeError):
    """A fake-quant state used with the wrong train/eval mode (see quantsim.states)."""


class BalanceError(UnsupportedModelError, ValueError):
    """A layer named for activation balancing cannot be balanced, or an argument is not allowed."""


class BalanceRecordError(CheckpointError, ValueError):
    """A balance record is malformed or was written for another architecture."""


class BatchNormFoldError(UnsupportedModelError, ValueError):
    """A BatchNorm cannot be folded: ``running_var + eps`` is not a finite number > 0 in some
    channel, so the folded weight would be inf or NaN."""


class AnalysisError(QuantSimError, ValueError):
    """An argument of the quantization analysis or of a metric is not allowed (a results
    folder that is a file, a one-shot iterator where batches are re-run, mismatched outputs)."""


class CallbackError(QuantSimError, TypeError):
    """A callback argument is neither a ``CallbackFunc`` nor a callable taking the model."""


class ConversionError(QuantSimError):
    """A sim cannot be converted to an integer model (``quantsim.convert``): an enabled
    quantizer without an encoding, a model torch.fx cannot trace, or float ops refused with
    ``allow_float=False``; the message lists each module at fault and why."""
