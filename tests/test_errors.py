"""Tests of quantsim.errors and of the setting checks: typed errors that say what was wrong
and what is allowed (STYLE 12)."""
from __future__ import annotations

import inspect

import pytest
import torch

from quantsim import errors
from quantsim.encoding import Encoding, fake_quantize, quantize, validate_bitwidth
from quantsim.errors import QuantizationSettingError, QuantSimError
from quantsim.quantizer import Quantizer


def test_every_error_class_subclasses_quantsim_error():
    """Every exception class in quantsim.errors derives from QuantSimError, so one except
    clause catches all of them; QuantizationSettingError is also a ValueError."""
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, BaseException) and c.__module__ == errors.__name__]
    assert len(classes) >= 8
    for cls in classes:
        assert issubclass(cls, QuantSimError), cls
    assert issubclass(QuantizationSettingError, ValueError)
    import quantsim
    for name in ("QuantSimError", "QuantizationSettingError", "CalibrationError"):
        assert getattr(quantsim, name) is getattr(errors, name)


@pytest.mark.parametrize("bitwidth", [3, 32, 0, -8, 64])
def test_integer_bitwidth_out_of_range(bitwidth):
    """Integer bitwidths outside 4..31 are refused, naming the value, the quantizer and the
    allowed range."""
    with pytest.raises(QuantizationSettingError,
                       match=rf"conv1\.weight: integer bitwidth {bitwidth} is not supported; "
                             r"allowed: 4\.\.31"):
        Quantizer(bitwidth=bitwidth, name="conv1.weight")
    with pytest.raises(QuantizationSettingError, match=rf"bitwidth {bitwidth}.*4\.\.31"):
        Encoding.from_range(torch.tensor(-1.0), torch.tensor(1.0), bitwidth)
    with pytest.raises(QuantizationSettingError, match=rf"bitwidth {bitwidth}.*4\.\.31"):
        Encoding(bitwidth, torch.tensor(0.1), torch.tensor(0.0))


def test_bitwidth_setter_validates():
    """Assigning a bad bitwidth to a quantizer raises and leaves the old one in place."""
    q = Quantizer(8, name="act")
    with pytest.raises(QuantizationSettingError, match=r"act: integer bitwidth 32.*4\.\.31"):
        q.bitwidth = 32
    assert q.bitwidth == 8


@pytest.mark.parametrize("bitwidth", [8, 32, 4])
def test_float_bitwidth_other_than_16(bitwidth):
    """Float quantizers simulate IEEE half only: other bitwidths are refused with '16'."""
    with pytest.raises(QuantizationSettingError,
                       match=rf"float bitwidth {bitwidth} is not supported; allowed: 16"):
        Quantizer(bitwidth=bitwidth, data_type="float")


@pytest.mark.parametrize("bitwidth", [8.5, "8", True, None])
def test_non_integer_bitwidth(bitwidth):
    """A bitwidth that is not an integer (bools included) is refused, showing the value."""
    with pytest.raises(QuantizationSettingError, match="bitwidth must be an integer, got"):
        validate_bitwidth(bitwidth)
    assert validate_bitwidth(8.0) == 8


@pytest.mark.parametrize("rounding", ["round", "floor", "Nearest", ""])
def test_unknown_rounding_mode(rounding):
    """An unknown rounding mode is refused (quantizer, encoding and the free functions alike)
    with the allowed modes; it never silently falls back to another rounding."""
    allowed = r"allowed: \['nearest', 'stochastic'\]"
    with pytest.raises(QuantizationSettingError,
                       match=rf"fc: rounding mode '{rounding}' is not supported; {allowed}"):
        Quantizer(8, rounding=rounding, name="fc")
    enc = Encoding.from_range(torch.tensor(-1.0), torch.tensor(1.0), 8)
    x = torch.randn(4)
    with pytest.raises(QuantizationSettingError, match=allowed):
        enc.fake_quantize(x, rounding=rounding)
    with pytest.raises(QuantizationSettingError, match=allowed):
        enc.quantize(x, rounding=rounding)
    with pytest.raises(QuantizationSettingError, match=allowed):
        fake_quantize(x, enc.scale, enc.offset, 0, 255, rounding=rounding)
    with pytest.raises(QuantizationSettingError, match=allowed):
        quantize(x, enc.scale, enc.offset, 0, 255, rounding=rounding)


@pytest.mark.parametrize("data_type", ["fp8", "float16", "INT8", None, 3])
def test_unknown_data_type(data_type):
    """An unknown data type is refused with the allowed 'int' and 'float'."""
    with pytest.raises(QuantizationSettingError,
                       match=rf"w: data type {data_type!r} is not supported; "
                             r"allowed: 'int', 'float'"):
        Quantizer(8, data_type=data_type, name="w")


def test_data_type_accepts_enum_names():
    """Enum members named INT/FLOAT (like aimet's QuantizationDataType) are accepted."""
    import enum

    class QuantizationDataType(enum.Enum):
        int = 1
        float = 2

    assert Quantizer(16, data_type=QuantizationDataType.float).data_type == "float"
    assert Quantizer(8, data_type="INT").data_type == "int"


def test_unknown_calibration_scheme():
    """An unknown calibration scheme is refused with the allowed schemes."""
    with pytest.raises(QuantizationSettingError, match=r"unknown calibration scheme 'mse'.*tf"):
        Quantizer(8, scheme="mse")


@pytest.mark.parametrize("scale", [0.0, -0.1, float("inf"), float("nan")])
def test_invalid_scale(scale):
    """Encodings need finite scales > 0; the message shows the offending value."""
    with pytest.raises(QuantizationSettingError, match=r"finite and > 0, got \["):
        Encoding(8, torch.tensor([0.1, scale]), torch.zeros(2), axis=0)


def test_encoding_shape_errors_show_shapes():
    """Mismatched scale/offset shapes and per-channel without an axis are refused with the
    shapes involved."""
    with pytest.raises(QuantizationSettingError,
                       match=r"scale shape \(2,\) != offset shape \(3,\)"):
        Encoding(8, torch.ones(2), torch.zeros(3), axis=0)
    with pytest.raises(QuantizationSettingError, match=r"shape \(2,\) and axis None"):
        Encoding(8, torch.ones(2), torch.zeros(2))
    with pytest.raises(QuantizationSettingError, match="needs scale and offset"):
        Encoding(8)
    with pytest.raises(QuantizationSettingError, match=r"shape must be \(\) or \(channels,\)"):
        Quantizer(8, shape=(4,))
