"""quantsim.convert: the integer model against the fake-quant sim it came from.

The acceptance bound is one quantization step: the integer model rounds the exact integer
accumulator once (a 31-bit multiplier, error < 2^-30 relative), the sim rounds a float32
value, so the two differ only where the real value lies within float32 error of a rounding
tie, by one code, and such a one-code difference can move a later layer by one code too.
"""
from __future__ import annotations

import copy
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from models import DigitsCNN, ResidualNet, accuracy, randomize_batch_norms
from quantsim import QuantizationSimModel
from quantsim.convert import IntegerModel, check_deployable, convert, ops
from quantsim.convert.fixed_point import quantize_multipliers, rounding_right_shift
from quantsim.errors import ConversionError, QuantizationSettingError, UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# fixed-point arithmetic
# ----------------------------------------------------------------------------------------------
def _exact_round(value: Fraction, rounding: str) -> int:
    floor = value.numerator // value.denominator
    rest = value - floor
    if rest > Fraction(1, 2):
        return floor + 1
    if rest < Fraction(1, 2):
        return floor
    if rounding == "half_to_even":
        return floor + (floor % 2)
    return floor + 1 if value > 0 else floor


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-2**62, 2**62 - 1), min_size=1, max_size=8),
       st.integers(0, 62), st.sampled_from(["half_to_even", "half_away_from_zero"]))
def test_rounding_right_shift_is_exact(values, shift, rounding):
    x = torch.tensor(values, dtype=torch.int64)
    got = rounding_right_shift(x, torch.tensor(shift), rounding).tolist()
    assert got == [_exact_round(Fraction(v, 2**shift), rounding) for v in values]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(1e-9, 1e3) | st.floats(-1e3, -1e-9), min_size=1, max_size=3))
def test_multipliers_are_31_bit_with_relative_error_below_2_pow_minus_30(factors):
    ts = [torch.tensor(f, dtype=torch.float64) for f in factors]
    multipliers, shift = quantize_multipliers(ts)
    largest = max(abs(int(m)) for m in multipliers)
    assert 2**30 <= largest < 2**31
    for f, m in zip(factors, multipliers):
        # a rounded integer multiplier: absolute error <= 1/2 of 2^-shift
        assert abs(int(m) * 2.0 ** -int(shift) - f) <= 2.0 ** -(int(shift) + 1) * (1 + 1e-12)
        if abs(f) == max(abs(g) for g in factors):
            assert abs(int(m) * 2.0 ** -int(shift) - f) / abs(f) <= 2.0 ** -30


def test_multiplier_of_2_pow_31_is_refused():
    with pytest.raises(QuantizationSettingError, match="2\\^31"):
        quantize_multipliers([torch.tensor(2.0 ** 32, dtype=torch.float64)])


# ----------------------------------------------------------------------------------------------
# the digits CNN
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_sim(trained_digits_cnn, digits):
    x_train = digits[0]
    sim = QuantizationSimModel(trained_digits_cnn, x_train[:32], quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x_train[:512]), None)
    return sim


def _codes_agree(int_model: IntegerModel, sim, x: torch.Tensor, min_fraction: float = 0.99):
    report = int_model.compare(sim, x)
    for layer in report.layers:
        if layer.within_1_lsb is not None:
            assert layer.within_1_lsb >= min_fraction, str(report)
    assert all(f is not None and f >= min_fraction for f in report.output_within_1_lsb), \
        str(report)
    return report


def test_digits_cnn_within_one_lsb_of_the_sim(digits_sim, digits):
    x_test, y_test = digits[2], digits[3]
    int_model = convert(digits_sim)
    report = _codes_agree(int_model, digits_sim, x_test)
    assert report.deployable and not report.float_ops
    ops_text = " ".join(layer.op for layer in report.layers)
    assert "ConvInteger2d + BatchNorm + ReLU" in ops_text and "MatMulInteger" in ops_text
    for layer in report.layers[1:]:
        assert 2**30 <= layer.multiplier[1] < 2**31 and layer.shift[0] > 0
    # accuracy: the deployed number, within a test image or two of the sim's
    n = len(y_test)
    assert abs(accuracy(int_model, x_test, y_test) - accuracy(digits_sim.model, x_test, y_test)) \
        <= 2 / n


def test_return_integers_gives_codes_and_encodings(digits_sim, digits):
    x = digits[2][:64]
    floats = convert(digits_sim)(x)
    int_model = convert(digits_sim, return_integers=True)
    codes = int_model(x)
    assert codes.dtype == torch.uint8
    (enc,) = int_model.output_encodings
    assert enc is not None and enc.bitwidth == 8
    assert torch.equal(enc.dequantize(codes.to(torch.float32)), floats)


def test_rounding_modes_differ_only_at_ties(digits_sim, digits):
    x = digits[2]
    even = convert(digits_sim, return_integers=True)(x).to(torch.int64)
    away = convert(digits_sim, rounding="half_away_from_zero", return_integers=True)(x)
    diff = (even - away.to(torch.int64)).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01


def _assert_integer_graph(int_model: IntegerModel, example: tuple) -> None:
    """Every tensor torch.export records is an integer (or bool) tensor, except inside the
    input Quantize, the output Dequantize and the float islands."""
    program = torch.export.export(int_model, example)
    allowed = ("Quantize", "Dequantize", "FloatIsland")
    checked = 0
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if node.op != "call_function" or not isinstance(val, torch.Tensor):
            continue
        checked += 1
        if val.dtype.is_floating_point:
            stack = node.meta.get("nn_module_stack", {})
            owners = [cls for _, cls in stack.values()]
            assert any(str(cls).rsplit(".", 1)[-1].strip("'>") in allowed for cls in owners), \
                f"{node.format_node()} is {val.dtype} outside a Quantize/Dequantize: {owners}"
    assert checked > 20


def test_every_intermediate_tensor_is_an_integer(digits_sim, digits):
    int_model = convert(digits_sim)
    _assert_integer_graph(int_model, (digits[2][:4],))


def test_traces_and_exports(digits_sim, digits):
    x = digits[2][:8]
    int_model = convert(digits_sim)
    traced = torch.jit.trace(int_model, (x[:2],))
    assert torch.equal(traced(x), int_model(x))
    program = torch.export.export(int_model, (x[:2],))
    assert torch.equal(program.module()(x[:2]), int_model(x[:2]))


def test_bad_arguments_raise_typed_errors(digits_sim):
    with pytest.raises(QuantizationSettingError, match="half_to_even"):
        convert(digits_sim, rounding="nearest")
    with pytest.raises(ConversionError, match="return_integers"):
        convert(digits_sim, return_integers="yes")
    with pytest.raises(UnsupportedModelError, match="QuantizationSimModel"):
        convert(nn.Linear(2, 2))


def test_uncalibrated_sim_is_named(trained_digits_cnn, digits):
    sim = QuantizationSimModel(trained_digits_cnn, digits[0][:4], quant_scheme="tf")
    with pytest.raises(ConversionError, match="without an encoding.*conv1.input_quantizers.0"):
        convert(sim)
