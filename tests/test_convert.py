"""quantsim.convert: the integer model against the fake-quant sim it came from.

The acceptance bound is one quantization step: the integer model rounds the exact integer
accumulator once (a 31-bit multiplier, error < 2^-30 relative), the sim rounds a float32
value, so the two differ only where the real value lies within float32 error of a rounding
tie, by one code, and such a one-code difference can move a later layer by one code too.
"""
from __future__ import annotations

import copy
import io
from contextlib import nullcontext
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from models import ResidualNet, accuracy, randomize_batch_norms
from quantsim import QuantizationSimModel
from quantsim.convert import IntegerModel, check_deployable, convert
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


def _step_bound(layer) -> float:
    """One code, plus, where one accumulator step spans M > 1 output steps (a coarse weight
    grid and a fine output grid), the int32 bias's rounding to an accumulator step: M / 2."""
    if layer.multiplier is None or layer.bias_step is None:
        return 1
    return 1 + max(0.0, layer.bias_step / 2)


def _each_step_within_one_lsb(report) -> None:
    """Fed the sim's codes, every step's own arithmetic is within one code of the sim's (and
    the int32 bias's rounding, where an accumulator step is coarser than the output's)."""
    compared = [layer for layer in report.layers if layer.max_diff_lsb is not None]
    assert compared and all(layer.max_diff_lsb <= _step_bound(layer) for layer in compared), \
        str(report)


def _codes_agree(int_model: IntegerModel, sim, x: torch.Tensor, min_fraction: float = 0.99):
    report = int_model.compare(sim, x)
    _each_step_within_one_lsb(report)
    for layer in report.layers:
        if layer.chained_within_1_lsb is not None:
            assert layer.chained_within_1_lsb >= min_fraction, str(report)
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
    buffer = io.BytesIO()  # and pickles (torch.save / torch.load) with its report
    torch.save(int_model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), int_model(x)) and str(loaded.report) == str(int_model.report)


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


# ----------------------------------------------------------------------------------------------
# a residual net, int8 and int16, with and without prepare_model
# ----------------------------------------------------------------------------------------------
def _residual_sim(prepared: bool, bitwidth: int):
    from quantsim.prepare import prepare_model
    torch.manual_seed(0)
    model = randomize_batch_norms(ResidualNet(width=8)).eval()
    if prepared:
        model = prepare_model(model)
    x = torch.rand(48, 3, 16, 16)
    with pytest.warns(UserWarning, match="functional ops") if not prepared else nullcontext():
        sim = QuantizationSimModel(model, x[:2], quant_scheme="tf", default_output_bw=bitwidth)
    sim.compute_encodings(lambda m, _: m(x[:24]), None)
    return sim, x[24:]


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "functional-add"])
@pytest.mark.parametrize("bitwidth", [8, 16])
def test_residual_net_within_one_lsb_of_the_sim(prepared, bitwidth):
    sim, x = _residual_sim(prepared, bitwidth)
    int_model = convert(sim)
    report = int_model.compare(sim, x)
    assert report.deployable, str(report)
    assert report.output_within_1_lsb[0] >= 0.99, str(report)
    text = str(report)
    assert "Add" in text and "sum-pool / 64" in text
    codes = convert(sim, return_integers=True)(x)
    assert codes.dtype == (torch.uint8 if bitwidth == 8 else torch.int16) or \
        codes.dtype == torch.int32
    _each_step_within_one_lsb(report)
    # end to end, each step carries the earlier steps' one-code differences: a few codes at
    # most, rarely
    for layer in report.layers:
        if layer.chained_max_diff_lsb is not None:
            assert layer.chained_max_diff_lsb <= 3 and layer.chained_within_1_lsb >= 0.97, text


def test_residual_net_graph_is_integer():
    sim, x = _residual_sim(True, 8)
    _assert_integer_graph(convert(sim), (x[:2],))


# ----------------------------------------------------------------------------------------------
# the other ops: ConvTranspose2d, AvgPool, Concat, Sub, ReLU6, lookup tables, float islands
# ----------------------------------------------------------------------------------------------
class OpsNet(nn.Module):
    """Every op kind the converter knows, and three without an integer form."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.relu_a = nn.ReLU6()
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.pool_up = nn.AvgPool2d(2)
        self.conv_b = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.relu_b = nn.ReLU()
        self.mix = nn.Conv2d(16, 8, 1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(8 * 8 * 8, 32)
        self.gelu = nn.GELU()
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 10)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        a = self.pool_up(self.up(self.relu_a(self.conv_a(x))))
        b = self.relu_b(self.conv_b(x))
        y = self.mix(torch.cat([a, b], dim=1)) - a
        return self.softmax(self.fc2(self.norm(self.gelu(self.fc1(self.flatten(y))))))


class Net1d(nn.Module):
    """Conv1d - BatchNorm1d - ReLU6 - AvgPool1d - Conv1d - ReLU - AdaptiveAvgPool1d - Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.act = nn.ReLU6()
        self.pool = nn.AvgPool1d(2)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.pool(self.act(self.bn(self.conv1(x))))
        return self.fc(self.flatten(self.gap(self.relu(self.conv2(x)))))


def _sim_of(model: nn.Module, x: torch.Tensor, **kwargs):
    from quantsim.prepare import prepare_model
    sim = QuantizationSimModel(prepare_model(model.eval()), x[:2], quant_scheme="tf", **kwargs)
    sim.compute_encodings(lambda m, _: m(x[:32]), None)
    return sim


@pytest.fixture(scope="module")
def ops_sim():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    return _sim_of(OpsNet(), x), x[32:]


def test_ops_net_integer_ops_and_float_islands(ops_sim):
    sim, x = ops_sim
    plan = check_deployable(sim)
    assert not plan.deployable
    assert [name for name, _ in plan.float_ops] == ["norm", "softmax"]
    assert all("no integer form" in why for _, why in plan.float_ops)
    int_model = convert(sim)
    report = int_model.compare(sim, x)
    ops_text = {layer.name: layer.op for layer in report.layers}
    assert ops_text["relu_a"].startswith("ConvInteger2d + ReLU6")
    assert ops_text["up"].startswith("ConvTransposeInteger2d")
    assert ops_text["pool_up"].startswith("sum-pool / 4")
    assert ops_text["sub"].startswith("Sub")
    assert ops_text["gelu"].startswith("GELU lookup table (256 entries)")
    assert "cat (input 0)" in ops_text and "cat (input 1)" in ops_text
    _each_step_within_one_lsb(report)  # float islands included: the same float op
    assert next(r for r in report.layers if r.name == "gelu").max_diff_lsb == 0
    # the float islands are the only float ops between the input quantize and output dequantize
    _assert_integer_graph(int_model, (x[:2],))
    with pytest.raises(ConversionError, match="norm: LayerNorm has no integer form"):
        convert(sim, allow_float=False)


def test_lookup_table_equals_the_sim_bit_for_bit(ops_sim):
    sim, x = ops_sim
    int_model = convert(sim)
    gelu = int_model.graph_module.get_submodule("gelu_lut")
    enc_in = sim.model.fc1.output_quantizers[0].encoding
    enc_out = sim.model.gelu.output_quantizers[0].encoding
    codes = torch.arange(enc_in.qmin, enc_in.qmax + 1)
    sim_codes = enc_out.quantize(sim.model.gelu(enc_in.dequantize(codes.float())))
    assert torch.equal(gelu(codes).to(torch.int64), sim_codes.to(torch.int64))


def test_conv1d_net_within_one_lsb():
    torch.manual_seed(0)
    x = torch.randn(64, 4, 16)
    sim = _sim_of(randomize_batch_norms(Net1d()), x)
    int_model = convert(sim)
    report = int_model.compare(sim, x[32:])
    assert report.deployable and report.output_within_1_lsb[0] >= 0.99, str(report)
    _each_step_within_one_lsb(report)
    assert report.layers[1].op.startswith("ConvInteger1d + BatchNorm + ReLU6")
    assert any(layer.op.startswith("sum-pool / 8") for layer in report.layers)
    _assert_integer_graph(int_model, (x[:2],))


def test_unmappable_quantization_is_reported_not_raised(trained_digits_cnn, digits):
    x = digits[0]
    sim = QuantizationSimModel(trained_digits_cnn, x[:4], quant_scheme="tf")
    sim.model.relu1.output_quantizers[0].enabled = False  # pool gets an unquantized tensor
    sim.exclude_layers_from_quantization(["fc"])          # fc keeps a float weight
    sim.compute_encodings(lambda m, _: m(x[:256]), None)
    plan = check_deployable(sim)
    reasons = dict(plan.float_ops)
    assert "not on a grid" in reasons["pool"]
    assert "weight is not quantized" in reasons["fc"]
    int_model = convert(sim)
    report = int_model.compare(sim, digits[2])
    assert report.float_ops == plan.float_ops
    _each_step_within_one_lsb(report)
    # fc runs in float on the same relu2 codes up to one code each: the logits differ by at
    # most sum|w| * one step of relu2's output (plus float32 rounding)
    step = float(sim.model.relu2.output_quantizers[0].encoding.scale)
    bound = float(sim.model.fc.weight.abs().sum(dim=1).max()) * step * (1 + 1e-5)
    with torch.no_grad():
        assert float((int_model(digits[2]) - sim.model(digits[2])).abs().max()) <= bound


# ----------------------------------------------------------------------------------------------
# every path that produces a calibrated sim
# ----------------------------------------------------------------------------------------------
def _qat(sim, x, y, steps: int = 20) -> None:
    """A few Adam steps of QAT on sim.model, then eval mode."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(sim.model.parameters(), lr=1e-3)
    sim.model.train()
    for i in range(steps):
        idx = torch.randint(0, len(x), (64,))
        opt.zero_grad()
        nn.functional.cross_entropy(sim.model(x[idx]), y[idx]).backward()
        opt.step()
    sim.model.eval()


def _agrees(sim, x) -> IntegerModel:
    int_model = convert(sim)
    report = int_model.compare(sim, x)
    assert report.output_within_1_lsb[0] >= 0.99, str(report)
    _each_step_within_one_lsb(report)
    return int_model


def test_from_range_learning_qat(trained_digits_cnn, digits):
    x, y = digits[0], digits[1]
    sim = QuantizationSimModel(trained_digits_cnn, x[:4], quant_scheme="range_learning_tf")
    sim.compute_encodings(lambda m, _: m(x[:256]), None)
    before = float(sim.model.relu1.output_quantizers[0].encoding.scale)
    _qat(sim, x, y)
    assert float(sim.model.relu1.output_quantizers[0].encoding.scale) != before  # ranges moved
    _agrees(sim, digits[2])


def test_from_fused_conv_bn_qat(trained_digits_cnn, digits):
    from quantsim.prepare import fuse_all_conv_bn
    x, y = digits[0], digits[1]
    model = copy.deepcopy(trained_digits_cnn)
    assert fuse_all_conv_bn(model, dummy_input=x[:2])
    sim = QuantizationSimModel(model, x[:4], quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x[:256]), None)
    _qat(sim, x, y)  # the BatchNorm statistics move: conversion folds the current ones
    int_model = _agrees(sim, digits[2])
    assert int_model.report.layers[1].op.startswith("ConvInteger2d + folded BatchNorm + ReLU")


def test_from_aimet_encodings_file():
    from conftest import EXAMPLES
    from test_export import _PeerCNN
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8)
    sim = QuantizationSimModel(_PeerCNN().eval(), x[:2])
    sim.load_encodings(EXAMPLES / "example_encodings_v2.0.0.json")
    assert float(sim.model.conv1.input_quantizers[0].encoding.scale) == \
        pytest.approx(0.030594557523727417)
    _agrees(sim, x)


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_mixed_8_and_16_bit(trained_digits_cnn, digits, weight_bits):
    x = digits[0]
    sim = QuantizationSimModel(trained_digits_cnn, x[:4], quant_scheme="tf",
                               default_param_bw=weight_bits)
    sim.model.relu1.output_quantizers[0].bitwidth = 16   # int16 between conv1 and conv2
    sim.model.conv2.param_quantizers["weight"].bitwidth = 8
    sim.compute_encodings(lambda m, _: m(x[:256]), None)
    int_model = _agrees(sim, digits[2])
    ops_text = [layer.op for layer in int_model.report.layers]
    assert ops_text[1].endswith("requantize int16") and ops_text[2].endswith("requantize int8")


class TwoInputs(nn.Module):
    """Two inputs, each quantized on entry, added after their convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_x = nn.Conv2d(2, 4, 3, padding=1)
        self.conv_y = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.relu(self.conv_x(x) + self.conv_y(y))


def test_two_inputs():
    torch.manual_seed(0)
    x, y = torch.randn(32, 2, 6, 6), torch.randn(32, 3, 6, 6)
    from quantsim.prepare import prepare_model
    sim = QuantizationSimModel(prepare_model(TwoInputs().eval()), (x[:2], y[:2]),
                               quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x[:16], y[:16]), None)
    int_model = convert(sim)
    report = int_model.compare(sim, x[16:], y[16:])
    assert report.deployable and report.output_within_1_lsb[0] >= 0.99, str(report)
    entries = [layer.name for layer in report.layers if layer.op == "quantize float -> int8"]
    assert entries == ["conv_x (input 0)", "conv_y (input 0)"]


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_untraceable_model_is_a_conversion_error():
    sim = QuantizationSimModel(Branchy(), torch.ones(2, 4), quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(torch.ones(8, 4)), None)
    with pytest.raises(ConversionError, match="torch.fx cannot trace Branchy.*prepare_model"):
        check_deployable(sim)


def test_a_running_qat_phase_is_refused_until_validation(trained_digits_cnn, digits):
    from quantsim import FakeQuantState, set_fake_quantize
    x = digits[0]
    sim = QuantizationSimModel(trained_digits_cnn, x[:4], quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x[:256]), None)
    sim.model.train()
    set_fake_quantize(sim, FakeQuantState.QAT)
    sim.model(x[:64])
    with pytest.raises(ConversionError, match="QAT phase.*FakeQuantState.VALIDATION"):
        convert(sim)
    sim.model.eval()
    set_fake_quantize(sim, FakeQuantState.VALIDATION)
    _agrees(sim, digits[2])
